"""DiT denoisers: backbone features once per observation, a DiT over the suffix every step.

- :class:`LayerwiseDiTDenoiser` (starVLA, the seed design's experiment E2): DiT block ``i``
  cross-attends backbone layer ``i`` through its own LayerNorm + Linear; the backbone runs only
  the layers the head reads.
- :class:`LastLayerDiTDenoiser` (GR00T): one backbone layer feeds every cross-attention block;
  cross- and self-attention blocks interleave; optional learned "future" tokens between the
  state token and the actions.
- :class:`HybridDenoiser` (experiment E3): the deep-fusion expert's suffix output, refined by a
  shallow DiT that cross-attends the backbone's last layer.

All use the shared :class:`~vlablocks.encoders.suffix.SuffixEncoder` (tokens in, velocity out)
and the toolkit's time convention (``t = 1`` is noise); the DiT's adaptive norms read a time
embedding of their own (``time_embedding="pi0"``, or ``"diffusers"`` for GR00T's, converted at
the edge).

    prepare:  prefix -> backbone (prefix-only, first n layers) -> per-block LN + Linear -> features
    velocity: (x_t, t, state) -> suffix tokens -> DiT(tokens, temb(t), features) -> decode -> v
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlablocks.blocks.dit import DiT
from vlablocks.blocks.fusion import DeepFusionStack
from vlablocks.blocks.masks import block_causal_mask, positions_from_pad
from vlablocks.encoders.suffix import SuffixEncoder
from vlablocks.encoders.time import get_time_embedder
from vlablocks.heads.deep_fusion import DeepFusionContext, DeepFusionDenoiser
from vlablocks.heads.denoiser import Prefix

TimeEmbedding = Literal["pi0", "diffusers"]


@dataclass(frozen=True)
class FeatureContext:
    """What a DiT denoiser's ``prepare`` computes once per observation.

    Attributes:
        features: per DiT block, the projected backbone features ``[B, P, C]``.
        mask: ``[B, P]`` bool, True for real prefix tokens.
    """

    features: tuple[torch.Tensor, ...]
    mask: torch.Tensor


def _projection(width: int, out_dim: int) -> nn.Sequential:
    """The per-layer LayerNorm + Linear between the backbone and the DiT."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))


def backbone_features(stack: DeepFusionStack, prefix: Prefix, layers: Sequence[int]) -> list[torch.Tensor]:
    """The base stream's output after each of ``layers`` (running no layer beyond the deepest).

    The output of the stack's last layer is taken after the final norm (as transformers'
    ``hidden_states[-1]``), every other one before any norm. ``-> [B, P, D]`` per entry.
    """
    depth = max(layers) + 1
    streams: list[torch.Tensor | None] = [None] * len(stack.experts)
    streams[0] = prefix.embeds
    out = stack(
        streams, block_causal_mask(prefix.pad, prefix.ar), positions_from_pad(prefix.pad),
        output_layer_hidden_states=True, num_layers=depth,
    )
    per_layer = [layer[0] for layer in out.layer_hidden_states]
    if depth == stack.num_layers:
        per_layer[-1] = out.hidden_states[0]
    return [per_layer[i] for i in layers]


class _DiTDenoiser(nn.Module):
    """Shared machinery: backbone features in ``prepare``, the DiT over suffix tokens in ``velocity``."""

    #: the suffix encoder's width is the DiT width, chosen freely (a recipe sets ``suffix.width``).
    suffix_width_from_expert = False

    def __init__(
        self,
        stack: DeepFusionStack,
        suffix_encoder: SuffixEncoder,
        feature_layers: Sequence[int],
        block_layers: Sequence[int],
        num_layers: int,
        num_heads: int,
        head_dim: int,
        cross_attention_dim: int | None,
        interleave_self_attention: bool,
        num_future_tokens: int,
        ff_mult: int,
        dropout: float,
        time_embedding: TimeEmbedding,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        width = suffix_encoder.width
        cross_dim = cross_attention_dim or width
        if len(stack.experts) != 1:
            raise ValueError(
                f"a DiT head reads the backbone's base stream only: give a stack with one expert (got "
                f"{len(stack.experts)}: {[spec.name for spec in stack.experts]}); for deep fusion plus a DiT use HybridDenoiser"
            )
        bad = [i for i in feature_layers if not 0 <= i < stack.num_layers]
        if bad:
            raise ValueError(f"feature layers {bad} are out of range for a backbone of {stack.num_layers} layers")
        self.stack = stack
        self.suffix_encoder = suffix_encoder
        self.feature_layers = tuple(feature_layers)
        #: for each DiT block, the index into ``feature_layers`` of the features it reads.
        self.block_layers = tuple(block_layers)
        self.projections = nn.ModuleList(_projection(stack.experts[0].width, cross_dim) for _ in self.feature_layers)
        self.time_embedder = get_time_embedder(time_embedding)(width)
        self.dit = DiT(
            num_layers, width, num_heads, head_dim, temb_dim=width, cross_attention_dim=cross_dim,
            interleave_self_attention=interleave_self_attention, ff_mult=ff_mult, dropout=dropout,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.future_tokens = nn.Parameter(torch.randn(num_future_tokens, width) * 0.02) if num_future_tokens else None

    def prepare(self, prefix: Prefix) -> FeatureContext:
        """Run the backbone once: the projected features of every layer the DiT reads."""
        layers = backbone_features(self.stack, prefix, self.feature_layers)
        projected = [projection(h) for projection, h in zip(self.projections, layers)]
        return FeatureContext(tuple(projected[k] for k in self.block_layers), prefix.pad)

    def velocity(
        self, context: FeatureContext, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        """``x_t [B, H, A]``, ``t [B]``, ``state [B, S] | None`` -> ``v [B, H, A]``; the DiT only."""
        suffix = self.suffix_encoder(x_t, t, state)
        tokens, start = suffix.tokens, self.suffix_encoder.action_start
        if self.future_tokens is not None:
            future = self.future_tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :start], future, tokens[:, start:]], dim=1)
        hidden = self.dit(tokens, self.time_embedder(t), context.features, context.mask)
        if self.future_tokens is not None:
            hidden = torch.cat([hidden[:, :start], hidden[:, start + self.future_tokens.shape[0] :]], dim=1)
        return self.suffix_encoder.decode(hidden)


class LayerwiseDiTDenoiser(_DiTDenoiser):
    """Cross-attention block ``i`` reads backbone layer ``i`` (starVLA's layerwise head, experiment E2).

    With ``interleave_self_attention`` (the default) a self-attention block follows each
    cross-attention block, so the suffix tokens (state, actions, time token) see each other;
    without it every token only sees the backbone, so a state or time token could never reach
    the actions, and such a suffix is rejected.

    Args:
        stack: the backbone; only its base stream is used, and only its first ``num_layers`` layers run.
        suffix_encoder: tokens in, velocity out; its width is the DiT width.
        num_heads: DiT attention heads.
        head_dim: DiT width per head.
        num_layers: backbone layers read, one cross-attention block each (``None``: every layer).
        interleave_self_attention: add a self-attention block after each cross-attention block.
        cross_attention_dim: width the backbone features are projected to (``None``: the DiT width).
        ff_mult: DiT feed-forward multiple.
        dropout: DiT dropout.
        time_embedding: ``"pi0"`` (the toolkit sinusoid + MLP) or ``"diffusers"`` (GR00T's).
        gradient_checkpointing: recompute DiT blocks in the backward pass.
    """

    def __init__(
        self,
        stack: DeepFusionStack,
        suffix_encoder: SuffixEncoder,
        num_heads: int,
        head_dim: int,
        num_layers: int | None = None,
        interleave_self_attention: bool = True,
        cross_attention_dim: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        time_embedding: TimeEmbedding = "pi0",
        gradient_checkpointing: bool = False,
    ) -> None:
        depth = stack.num_layers if num_layers is None else num_layers
        if not 1 <= depth <= stack.num_layers:
            raise ValueError(f"num_layers must be in 1..{stack.num_layers} (one DiT block per backbone layer); got {depth}")
        if not interleave_self_attention and suffix_encoder.length != suffix_encoder.horizon:
            raise ValueError(
                "without self-attention blocks the suffix tokens never see each other, so the state / time "
                f"tokens ({suffix_encoder.length - suffix_encoder.horizon} of them) could not reach the actions: "
                "set interleave_self_attention=True or drop those tokens"
            )
        per_layer = 2 if interleave_self_attention else 1
        super().__init__(
            stack, suffix_encoder, feature_layers=range(depth),
            block_layers=[i // per_layer for i in range(per_layer * depth)], num_layers=per_layer * depth,
            num_heads=num_heads, head_dim=head_dim, cross_attention_dim=cross_attention_dim,
            interleave_self_attention=interleave_self_attention, num_future_tokens=0, ff_mult=ff_mult,
            dropout=dropout, time_embedding=time_embedding, gradient_checkpointing=gradient_checkpointing,
        )


class LastLayerDiTDenoiser(_DiTDenoiser):
    """GR00T's action head: every cross-attention block reads one backbone layer.

    Args:
        stack: the backbone; layers after ``feature_layer`` do not run.
        suffix_encoder: tokens in, velocity out; its width is the DiT width.
        num_layers: DiT blocks.
        num_heads: DiT attention heads.
        head_dim: DiT width per head.
        feature_layer: the backbone layer read (negative from the end; ``-1``: the last,
            after the final norm).
        num_future_tokens: learned tokens between the state token and the actions (GR00T N1.5: 32).
        interleave_self_attention: cross-attention on even blocks, self-attention on odd ones.
        cross_attention_dim: width the features are projected to (``None``: the DiT width).
        ff_mult: DiT feed-forward multiple.
        dropout: DiT dropout (GR00T: 0.2).
        time_embedding: ``"pi0"`` or ``"diffusers"`` (GR00T's).
        gradient_checkpointing: recompute DiT blocks in the backward pass.
    """

    def __init__(
        self,
        stack: DeepFusionStack,
        suffix_encoder: SuffixEncoder,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        feature_layer: int = -1,
        num_future_tokens: int = 0,
        interleave_self_attention: bool = True,
        cross_attention_dim: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        time_embedding: TimeEmbedding = "diffusers",
        gradient_checkpointing: bool = False,
    ) -> None:
        layer = feature_layer % stack.num_layers if -stack.num_layers <= feature_layer < stack.num_layers else feature_layer
        super().__init__(
            stack, suffix_encoder, feature_layers=[layer], block_layers=[0] * num_layers, num_layers=num_layers,
            num_heads=num_heads, head_dim=head_dim, cross_attention_dim=cross_attention_dim,
            interleave_self_attention=interleave_self_attention, num_future_tokens=num_future_tokens,
            ff_mult=ff_mult, dropout=dropout, time_embedding=time_embedding,
            gradient_checkpointing=gradient_checkpointing,
        )


@dataclass(frozen=True)
class HybridContext:
    """The deep-fusion context plus the projected last-layer features for the refinement DiT."""

    fusion: DeepFusionContext
    features: torch.Tensor
    mask: torch.Tensor


class HybridDenoiser(nn.Module):
    """Experiment E3: the deep-fusion expert, then a shallow DiT refinement of its suffix output.

    Args:
        stack: the deep-fusion backbone (base + action expert).
        suffix_encoder: tokens in, velocity out; width = the expert's.
        num_layers: refinement DiT blocks.
        num_heads: DiT attention heads.
        head_dim: DiT width per head.
        expert: index of the action expert in ``stack.experts``.
        interleave_self_attention: cross-attention on even blocks, self-attention on odd ones.
        ff_mult: DiT feed-forward multiple.
        dropout: DiT dropout.
        time_embedding: ``"pi0"`` or ``"diffusers"``.
        gradient_checkpointing: recompute DiT blocks in the backward pass.
    """

    #: the suffix encoder's width is the action expert's (recipes derive it).
    suffix_width_from_expert = True

    def __init__(
        self,
        stack: DeepFusionStack,
        suffix_encoder: SuffixEncoder,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        expert: int = 1,
        interleave_self_attention: bool = False,
        ff_mult: int = 4,
        dropout: float = 0.0,
        time_embedding: TimeEmbedding = "pi0",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.fusion = DeepFusionDenoiser(stack, suffix_encoder, expert)
        width = suffix_encoder.width
        self.projection = _projection(stack.experts[0].width, width)
        self.time_embedder = get_time_embedder(time_embedding)(width)
        self.dit = DiT(
            num_layers, width, num_heads, head_dim, temb_dim=width, cross_attention_dim=width,
            interleave_self_attention=interleave_self_attention, ff_mult=ff_mult, dropout=dropout,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def stack(self) -> DeepFusionStack:
        """The deep-fusion backbone."""
        return self.fusion.stack

    @property
    def suffix_encoder(self) -> SuffixEncoder:
        """The shared suffix encoder."""
        return self.fusion.suffix_encoder

    def prepare(self, prefix: Prefix) -> HybridContext:
        """The prefix cache (one backbone pass) and its last layer, projected for the DiT."""
        fusion = self.fusion.prepare(prefix, prefix_output=True)
        return HybridContext(fusion, self.projection(fusion.prefix_hidden), prefix.pad)

    def velocity(
        self, context: HybridContext, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        """Expert pass over the cache, DiT refinement, velocity: ``-> [B, H, A]``."""
        hidden = self.fusion.expert_hidden(context.fusion, x_t, t, state)
        hidden = self.dit(hidden, self.time_embedder(t), context.features, context.mask)
        return self.suffix_encoder.decode(hidden)
