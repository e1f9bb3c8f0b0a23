"""The suffix: robot state, noisy action chunk and flow time as tokens for an action expert.

Token layout ``[state?, action_1 .. action_H, time?]`` with block-causal marks (see
:mod:`vlablocks.blocks.masks`):

    state token       ar 1            sees the prefix and itself
    action tokens     ar 1, c, c, ... one block (c = 0, pi0 / pi0.5) or causal (c = 1, SmolVLA)
    time token        ar c            the seed design's separate time token, after the actions

How the flow time enters is a small swappable module (``time_fusion``):

- :class:`ConcatMlpTimeFusion` (pi0): ``out(silu(in([action_emb, sinusoid(t)])))`` per action token;
- :class:`TimeTokenFusion` (the seed design): one extra token ``mlp(sinusoid(t))``;
- :class:`AdaRMSTimeFusion` (pi0.5): a condition vector ``silu(mlp(sinusoid(t)))`` for the
  expert's AdaRMS norms; action tokens are the action embeddings alone.

The same encoder serves deep-fusion experts and DiT heads; ``decode`` reads the velocity back
from the action tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlablocks.blocks.mlp import Mlp
from vlablocks.encoders.time import TimestepEmbedder, sinusoidal_embedding

Factory = dict[str, torch.device | str | torch.dtype | None]


class ConcatMlpTimeFusion(nn.Module):
    """pi0: each action token is ``Mlp(2W -> W -> W)([action_emb, sinusoid(t)])``.

    Args:
        width: the expert width ``W``.
        min_period: shortest period of the time sinusoid.
        max_period: longest period of the time sinusoid.
    """

    num_time_tokens = 0
    cond_dim: int | None = None

    def __init__(
        self,
        width: int,
        min_period: float = 4e-3,
        max_period: float = 4.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.width, self.min_period, self.max_period = width, min_period, max_period
        self.mlp = Mlp(2 * width, width, width, nn.SiLU, device=device, dtype=dtype)

    def forward(
        self, action_emb: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``action_emb [B, H, W]``, ``t [B]`` -> ``(action tokens [B, H, W], time tokens [B, 0, W], None)``."""
        time_emb = sinusoidal_embedding(t, self.width, self.min_period, self.max_period).to(action_emb.dtype)
        time_emb = time_emb[:, None].expand_as(action_emb)
        tokens = self.mlp(torch.cat([action_emb, time_emb], dim=-1))
        return tokens, tokens.new_zeros(tokens.shape[0], 0, tokens.shape[-1]), None


class _EmbeddedTimeFusion(nn.Module):
    """Shared part of the token and AdaRMS fusions: ``embedder(t) = mlp(sinusoid(t))`` of width W.

    Args:
        width: the expert width ``W``.
        min_period: shortest period of the time sinusoid.
        max_period: longest period of the time sinusoid.
    """

    def __init__(
        self,
        width: int,
        min_period: float = 4e-3,
        max_period: float = 4.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.width = width
        self.embedder = TimestepEmbedder(width, min_period=min_period, max_period=max_period, device=device, dtype=dtype)


class TimeTokenFusion(_EmbeddedTimeFusion):
    """The seed design: a separate time token ``time_mlp_out(silu(time_mlp_in(sinusoid(t))))``."""

    num_time_tokens = 1
    cond_dim: int | None = None

    def forward(
        self, action_emb: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``-> (action_emb, time token [B, 1, W], None)``."""
        return action_emb, self.embedder(t).to(action_emb.dtype)[:, None], None


class AdaRMSTimeFusion(_EmbeddedTimeFusion):
    """pi0.5: the condition ``silu(mlp(sinusoid(t)))`` for AdaRMS norms; no time in the tokens."""

    num_time_tokens = 0

    @property
    def cond_dim(self) -> int:
        """Width of the condition: the expert's width."""
        return self.width

    def forward(
        self, action_emb: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``-> (action_emb, time tokens [B, 0, W], cond [B, W])``."""
        cond = F.silu(self.embedder(t))
        return action_emb, action_emb.new_zeros(action_emb.shape[0], 0, action_emb.shape[-1]), cond


TimeFusion = ConcatMlpTimeFusion | TimeTokenFusion | AdaRMSTimeFusion


@dataclass(frozen=True)
class SuffixTokens:
    """Output of :class:`SuffixEncoder`.

    Attributes:
        tokens: ``[B, S, W]`` suffix tokens.
        cond: ``[B, W]`` AdaRMS condition (pi0.5), else ``None``.
    """

    tokens: torch.Tensor
    cond: torch.Tensor | None


class SuffixEncoder(nn.Module):
    """Encodes ``(x_t, t, state)`` as suffix tokens and decodes velocity from them.

    Args:
        action_dim: ``A``, the (padded) action width.
        width: ``W``, the token width: derived from the action expert for deep-fusion
            denoiser recipes, the DiT width (required) for DiT denoisers.
        horizon: ``H``, actions per chunk.
        time_fusion: a built time-fusion module of width ``W`` (see the module docstring).
        state_dim: ``S``; ``None`` means no state token (pi0.5, SmolVLA put state elsewhere).
        causal: action tokens attend causally (SmolVLA) instead of as one block (pi0).
        learned_positions: add a learned embedding per suffix token (GR00T-style).
    """

    def __init__(
        self,
        action_dim: int,
        width: int,
        horizon: int,
        time_fusion: TimeFusion,
        state_dim: int | None = None,
        causal: bool = False,
        learned_positions: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if causal and time_fusion.num_time_tokens:
            raise ValueError(
                "causal=True with a time token after the actions would hide the flow time from every "
                "action token; use causal=False (one action block) or a ConcatMlp/AdaRMS time fusion"
            )
        factory = {"device": device, "dtype": dtype}
        self.action_dim, self.width, self.horizon = action_dim, width, horizon
        self.time_fusion = time_fusion
        self.state_proj = nn.Linear(state_dim, width, **factory) if state_dim is not None else None
        self.action_in_proj = nn.Linear(action_dim, width, **factory)
        self.action_out_proj = nn.Linear(width, action_dim, **factory)
        num_state = int(state_dim is not None)
        self.action_start = num_state
        length = num_state + horizon + time_fusion.num_time_tokens
        action_marks = [1] + [int(causal)] * (horizon - 1)
        ar = [1] * num_state + action_marks + [int(causal)] * time_fusion.num_time_tokens
        self.register_buffer("ar", torch.tensor(ar, dtype=torch.long, device=device), persistent=False)
        self.positions = nn.Parameter(torch.zeros(length, width, **factory)) if learned_positions else None
        if self.positions is not None:
            nn.init.normal_(self.positions, std=0.02)

    @property
    def length(self) -> int:
        """``S``, the number of suffix tokens."""
        return self.ar.shape[0]

    @property
    def cond_dim(self) -> int | None:
        """Width of the AdaRMS condition this encoder emits (``None``: none)."""
        return self.time_fusion.cond_dim

    def layout(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pad [B, S] bool, ar [B, S] long)`` of the suffix; fixed, so computable before the tokens."""
        pad = torch.ones(batch_size, self.length, dtype=torch.bool, device=self.ar.device)
        return pad, self.ar.expand(batch_size, -1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None = None) -> SuffixTokens:
        """``x_t [B, H, A]``, ``t [B]``, ``state [B, S_dim] | None`` -> :class:`SuffixTokens` ``[B, S, W]``."""
        if x_t.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"x_t must be [B, {self.horizon}, {self.action_dim}]; got {list(x_t.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be [B] = [{x_t.shape[0]}]; got {list(t.shape)}")
        action_tokens, time_tokens, cond = self.time_fusion(self.action_in_proj(x_t), t)
        parts = [action_tokens, time_tokens]
        if self.state_proj is not None:
            if state is None:
                raise ValueError("this SuffixEncoder has a state token (state_dim set) but state is None")
            parts.insert(0, self.state_proj(state.to(action_tokens.dtype))[:, None])
        elif state is not None:
            raise ValueError("state was given but this SuffixEncoder has no state token (state_dim=None)")
        tokens = torch.cat(parts, dim=1)
        if self.positions is not None:
            tokens = tokens + self.positions.to(tokens.dtype)
        return SuffixTokens(tokens=tokens, cond=cond)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Velocity from the expert's output: ``[B, S, W] -> [B, H, A]``, computed in
        ``action_out_proj``'s dtype (a bf16 expert's output is cast to fp32 first, as LeRobot does)."""
        hidden = hidden[:, self.action_start : self.action_start + self.horizon]
        return self.action_out_proj(hidden.to(self.action_out_proj.weight.dtype))
