"""DeepFusionDenoiser: the action expert of a DeepFusionStack as a flow-matching denoiser.

``prepare`` runs the base (VLM) stream over the prefix once and keeps the immutable
:class:`~vlablocks.blocks.fusion.PrefixCache`, together with the suffix's attention mask and
positions (they do not depend on ``x_t``). ``velocity`` runs only the expert stream over the
suffix tokens, attending ``[cached prefix ; suffix]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlablocks.blocks.fusion import DeepFusionStack, PrefixCache
from vlablocks.blocks.masks import block_causal_mask, positions_from_pad, suffix_mask_and_positions
from vlablocks.encoders.suffix import SuffixEncoder
from vlablocks.heads.denoiser import Prefix


@dataclass(frozen=True)
class DeepFusionContext:
    """What ``prepare`` computes once per observation.

    Attributes:
        cache: post-RoPE prefix keys/values per layer.
        suffix_mask: ``[B, S, P + S]`` bool, suffix rows of the joint mask.
        suffix_positions: ``[B, S]`` RoPE positions, continuing after the real prefix tokens.
        prefix_hidden: ``[B, P, D_base]`` the base's final-normed prefix output (what a
            refinement head or a language-model head reads), or ``None`` when ``prepare``
            was not asked for it (the prefix pass then stops at the last cached keys/values).
    """

    cache: PrefixCache
    suffix_mask: torch.Tensor
    suffix_positions: torch.Tensor
    prefix_hidden: torch.Tensor | None = None


class DeepFusionDenoiser(nn.Module):
    """Velocity from the ``expert``-th stream of a deep-fusion stack.

    Args:
        stack: the fusion stack; expert 0 takes the prefix.
        suffix_encoder: builds the suffix tokens; its width must be the expert's.
        expert: index of the action expert in ``stack.experts``.
    """

    #: the suffix encoder's width is the action expert's (recipes derive it).
    suffix_width_from_expert = True

    def __init__(self, stack: DeepFusionStack, suffix_encoder: SuffixEncoder, expert: int = 1) -> None:
        super().__init__()
        if not 1 <= expert < len(stack.experts):
            raise ValueError(f"expert must index a non-base expert (1..{len(stack.experts) - 1}); got {expert}")
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

    def prepare(self, prefix: Prefix, prefix_output: bool = False) -> DeepFusionContext:
        """Run the prefix once: ``embeds [B, P, D_base]`` -> cache + suffix mask/positions.

        ``prefix_output``: also run the base to its final norm and keep ``prefix_hidden``;
        otherwise the pass does only what the cache needs (``cache_only``).
        """
        streams: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        streams[0] = prefix.embeds
        mask = block_causal_mask(prefix.pad, prefix.ar)
        out = self.stack(streams, mask, positions_from_pad(prefix.pad), return_cache=True, cache_only=not prefix_output)
        suffix_pad, suffix_ar = self.suffix_encoder.layout(prefix.embeds.shape[0])
        suffix_mask, suffix_positions = suffix_mask_and_positions(prefix.pad, prefix.ar, suffix_pad, suffix_ar)
        return DeepFusionContext(out.cache, suffix_mask, suffix_positions, out.hidden_states[0])

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
        streams: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        conds: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        streams[0] = prefix.embeds
        streams[self.expert], conds[self.expert] = suffix.tokens, suffix.cond
        out = self.stack(streams, block_causal_mask(pad, ar), positions_from_pad(pad), conds=conds)
        return self.suffix_encoder.decode(out.hidden_states[self.expert])

    def expert_hidden(
        self,
        context: DeepFusionContext,
        x_t: torch.Tensor,
        t: torch.Tensor,
        state: torch.Tensor | None,
    ) -> torch.Tensor:
        """The expert's final-normed suffix output ``[B, S, W]`` (before the velocity projection)."""
        suffix = self.suffix_encoder(x_t, t, state)
        streams: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        conds: list[torch.Tensor | None] = [None] * len(self.stack.experts)
        streams[self.expert], conds[self.expert] = suffix.tokens, suffix.cond
        out = self.stack(streams, context.suffix_mask, context.suffix_positions, cache=context.cache, conds=conds)
        return out.hidden_states[self.expert]
