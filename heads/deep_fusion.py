"""DeepFusionDenoiser: the action expert of a DeepFusionStack as a flow-matching denoiser.

``prepare`` runs the base (VLM) stream over the prefix once and keeps everything the suffix
pass reads that does not depend on ``x_t``: the immutable
:class:`~vlablocks.blocks.fusion.PrefixCache` (with, at SmolVLA's cross-attention layers, the
cached keys/values already re-projected by the expert), and the suffix's per-layer additive
masks and RoPE tables (an :class:`~vlablocks.blocks.attention_layout.AttentionLayout`).
``velocity`` runs only the expert stream over the suffix tokens, attending
``[cached prefix ; suffix]``: per ODE step nothing is rebuilt but the suffix's own work.

With ``state_expert``, the suffix's state token goes to an expert of its own (a third stream:
VLM, state, action) and the action and time tokens to the action expert; the two streams
attend jointly under the suffix mask, exactly as one stream would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlablocks.blocks.attention_layout import AttentionLayout, attention_dtype
from vlablocks.blocks.fusion import DeepFusionStack, PrefixCache
from vlablocks.blocks.masks import block_causal_mask, positions_from_pad, suffix_mask_and_positions
from vlablocks.encoders.suffix import SuffixEncoder, SuffixTokens
from vlablocks.heads.denoiser import Prefix


@dataclass(frozen=True)
class DeepFusionContext:
    """What ``prepare`` computes once per observation.

    Attributes:
        cache: post-RoPE prefix keys/values per layer, with the cross-attention layers'
            re-projected ones (:meth:`~vlablocks.blocks.fusion.DeepFusionStack.project_cross_key_values`).
        suffix_mask: ``[B, S, P + S]`` bool, suffix rows of the joint mask.
        suffix_positions: ``[B, S]`` RoPE positions, continuing after the real prefix tokens.
        layout: ``suffix_mask`` (made additive in the expert's query dtype) and the RoPE tables
            of ``suffix_positions``, per layer, as the suffix pass uses them.
        prefix_hidden: ``[B, P, D_base]`` the base's final-normed prefix output (what a
            refinement head or a language-model head reads), or ``None`` when ``prepare``
            was not asked for it (the prefix pass then stops at the last cached keys/values).
    """

    cache: PrefixCache
    suffix_mask: torch.Tensor
    suffix_positions: torch.Tensor
    layout: AttentionLayout
    prefix_hidden: torch.Tensor | None = None


class DeepFusionDenoiser(nn.Module):
    """Velocity from the ``expert``-th stream of a deep-fusion stack.

    Args:
        stack: the fusion stack; expert 0 takes the prefix.
        suffix_encoder: builds the suffix tokens; its width must be the expert's.
        expert: index of the action expert in ``stack.experts``.
        state_expert: index of an expert that takes the suffix's state token (``None``: the
            action expert takes it). It must come before the action expert (the streams form
            the sequence in expert order), have the action expert's width and no AdaRMS.
    """

    #: the suffix encoder's width is the action expert's (recipes derive it).
    suffix_width_from_expert = True

    def __init__(
        self, stack: DeepFusionStack, suffix_encoder: SuffixEncoder, expert: int = 1, state_expert: int | None = None
    ) -> None:
        super().__init__()
        if not 1 <= expert < len(stack.experts):
            raise ValueError(f"expert must index a non-base expert (1..{len(stack.experts) - 1}); got {expert}")
        if state_expert is not None:
            _check_state_expert(stack, suffix_encoder, expert, state_expert)
        spec = stack.experts[expert]
        if suffix_encoder.width != spec.width:
            raise ValueError(
                f"suffix_encoder.width ({suffix_encoder.width}) must equal the width of expert "
                f"{expert} ({spec.name!r}: {spec.width})"
            )
        if suffix_encoder.cond_dim != spec.adarms_cond_dim:
            raise ValueError(
                f"the suffix encoder emits an AdaRMS condition of width {suffix_encoder.cond_dim} but expert "
                f"{expert} ({spec.name!r}) has adarms_cond_dim={spec.adarms_cond_dim}; they must match "
                "(AdaRMSTimeFusion goes with an AdaRMS expert, other time fusions with plain norms)"
            )
        self.stack = stack
        self.suffix_encoder = suffix_encoder
        self.expert = expert
        self.state_expert = state_expert

    def prepare(self, prefix: Prefix, prefix_output: bool = False) -> DeepFusionContext:
        """Run the prefix once: ``embeds [B, P, D_base]`` -> cache + the suffix's masks/RoPE tables.

        ``prefix_output``: also run the base to its final norm and keep ``prefix_hidden``;
        otherwise the pass does only what the cache needs (``cache_only``). Run ``velocity``
        under the same autocast setting: the suffix mask is made additive in its query dtype.
        """
        streams: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        streams[0] = prefix.embeds
        mask = block_causal_mask(prefix.pad, prefix.ar)
        out = self.stack(streams, mask, positions_from_pad(prefix.pad), return_cache=True, cache_only=not prefix_output)
        cache = self.stack.project_cross_key_values(out.cache)
        suffix_pad, suffix_ar = self.suffix_encoder.layout(prefix.embeds.shape[0])
        suffix_mask, suffix_positions = suffix_mask_and_positions(prefix.pad, prefix.ar, suffix_pad, suffix_ar)
        layout = self.stack.layout(suffix_mask, suffix_positions, self._suffix_lengths(suffix_pad.shape[1]),
                                   past_len=cache.length, mask_dtype=self._query_dtype())
        return DeepFusionContext(cache, suffix_mask, suffix_positions, layout, out.hidden_states[0])

    def velocity(
        self,
        context: DeepFusionContext,
        x_t: torch.Tensor,
        t: torch.Tensor,
        state: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x_t [B, H, A]``, ``t [B]``, ``state [B, S] | None`` -> ``v [B, H, A]``; expert weights only."""
        return self.suffix_encoder.decode(self.expert_hidden(context, x_t, t, state))

    def joint_velocity(
        self,
        prefix: Prefix,
        x_t: torch.Tensor,
        t: torch.Tensor,
        state: torch.Tensor | None,
    ) -> torch.Tensor:
        """The same velocity from one joint pass over ``[prefix ; suffix]``, without a cache.

        What a port that recomputes the prefix at every ODE step does: the reference for the
        cache's speed-up (``vlablocks bench``) and for its exactness (the two agree to float
        rounding). Shapes as in :meth:`velocity`.
        """
        suffix = self.suffix_encoder(x_t, t, state)
        suffix_pad, suffix_ar = self.suffix_encoder.layout(prefix.embeds.shape[0])
        pad = torch.cat([prefix.pad, suffix_pad.to(prefix.pad.device)], dim=1)
        ar = torch.cat([prefix.ar, suffix_ar.to(prefix.ar.device)], dim=1)
        streams, conds = self._suffix_streams(suffix)
        streams[0] = prefix.embeds
        out = self.stack(streams, block_causal_mask(pad, ar), positions_from_pad(pad), conds=conds)
        return self.suffix_encoder.decode(self._suffix_hidden(out.hidden_states))

    def expert_hidden(
        self,
        context: DeepFusionContext,
        x_t: torch.Tensor,
        t: torch.Tensor,
        state: torch.Tensor | None,
    ) -> torch.Tensor:
        """The expert's final-normed suffix output ``[B, S, W]`` (before the velocity projection)."""
        streams, conds = self._suffix_streams(self.suffix_encoder(x_t, t, state))
        out = self.stack(streams, cache=context.cache, conds=conds, layout=context.layout)
        return self._suffix_hidden(out.hidden_states)

    def _suffix_lengths(self, suffix_len: int) -> tuple[int, ...]:
        """Tokens per expert stream of a suffix of ``suffix_len`` tokens (see :meth:`_suffix_streams`)."""
        lengths = [0] * len(self.stack.experts)
        if self.state_expert is None:
            lengths[self.expert] = suffix_len
        else:
            lengths[self.state_expert], lengths[self.expert] = 1, suffix_len - 1
        return tuple(lengths)

    def _query_dtype(self) -> torch.dtype:
        """The dtype of the action expert's attention queries (its weights', or autocast's)."""
        device_type = self.suffix_encoder.action_out_proj.weight.device.type
        return attention_dtype(self.stack.expert_dtype(self.expert), device_type)

    def _suffix_streams(self, suffix: SuffixTokens) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Per-expert streams and AdaRMS conditions of the suffix tokens ``[B, S, W]``."""
        streams: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        conds: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        if self.state_expert is None:
            streams[self.expert] = suffix.tokens
        else:  # the state token first, as in the suffix layout and the expert order
            streams[self.state_expert], streams[self.expert] = suffix.tokens[:, :1], suffix.tokens[:, 1:]
        conds[self.expert] = suffix.cond
        return streams, conds

    def _suffix_hidden(self, hidden_states: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The suffix's final-normed output ``[B, S, W]``, in suffix order."""
        if self.state_expert is None:
            return hidden_states[self.expert]
        return torch.cat([hidden_states[self.state_expert], hidden_states[self.expert]], dim=1)


def _check_state_expert(stack: DeepFusionStack, suffix_encoder: SuffixEncoder, expert: int, state_expert: int) -> None:
    """ValueError unless ``state_expert`` can take the suffix's state token (see DeepFusionDenoiser)."""
    if not 1 <= state_expert < expert:
        raise ValueError(f"state_expert must index an expert after the base and before the action expert "
                         f"(1..{expert - 1}); got {state_expert}")
    if suffix_encoder.state_proj is None:
        raise ValueError("state_expert needs a state token in the suffix: give the suffix encoder a state_dim "
                         "(policy.state_mode: suffix)")
    spec = stack.experts[state_expert]
    if spec.width != suffix_encoder.width:
        raise ValueError(f"the state expert {spec.name!r} must have the action expert's width "
                         f"{suffix_encoder.width} (the state token comes from the suffix encoder); got {spec.width}")
    if spec.adarms_cond_dim is not None:
        raise ValueError(f"the state expert {spec.name!r} must not be an AdaRMS expert: the time condition is the "
                         "action expert's")
