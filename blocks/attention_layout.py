"""Attention inputs that depend only on the token layout: per-layer masks and RoPE tables.

A deep-fusion stack call's masks and RoPE tables depend on which experts' tokens are present,
their positions and the cache length, never on the token values. :func:`attention_layout`
builds them once, per base layer restricted to the tokens of the experts active there:

    mask [B, Lq, P + Lq], positions [B, Lq]
        -> rope_cos_sin (+ per-stream restarted tables for cross-attention layers)
        -> bool mask made additive once (optional)
        -> per layer: (mask rows/columns, RoPE rows) of its active experts

A denoiser builds its suffix's layout once per observation (``prepare``) and every ODE step
reuses it; a plain :class:`~vlablocks.blocks.fusion.DeepFusionStack` call builds one on the
fly from a bool (or additive) mask and positions. Either way the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vlablocks.blocks.attention import HeadSpace
from vlablocks.blocks.masks import as_additive_mask
from vlablocks.blocks.rope import rope_cos_sin


class RopeTables(NamedTuple):
    """RoPE tables for the tokens of one call, ``[B, Lq, head_dim]`` each.

    ``cos``/``sin`` follow the joint positions; ``stream_cos``/``stream_sin`` restart at 0 at
    the first token of every stream (the queries of SmolVLA's cross-attention layers), and are
    ``None`` in stacks without cross-attention layers.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    stream_cos: torch.Tensor | None = None
    stream_sin: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> RopeTables:
        """The tables of the tokens ``index`` (along the sequence)."""
        return RopeTables(*(None if t is None else t[:, index] for t in self))


#: One layer's attention inputs: ``(mask [B, Lq_i, P + Lq_i], rope tables [B, Lq_i, head_dim])``.
LayerInputs = tuple[torch.Tensor, RopeTables]


@dataclass(frozen=True)
class AttentionLayout:
    """Per-layer attention masks and RoPE tables of one stack call (see the module docstring).

    Attributes:
        lengths: tokens per expert stream ``L_e`` (0 for an absent stream) it was built for.
        past_len: cached prefix length ``P`` (0 without a cache).
        layers: per base layer, the :data:`LayerInputs` of the experts active there, or
            ``None`` where no present expert has a layer.
    """

    lengths: tuple[int, ...]
    past_len: int
    layers: tuple[LayerInputs | None, ...]


def rope_tables(
    position_ids: torch.Tensor, lengths: Sequence[int], head_space: HeadSpace, restart_streams: bool
) -> RopeTables:
    """RoPE tables for ``position_ids [B, Lq]``; with ``restart_streams`` also the tables of
    positions restarted at 0 in every present stream (``lengths`` per expert, 0 if absent)."""
    cos, sin = rope_cos_sin(position_ids, head_space.head_dim, head_space.rope_theta)
    if not restart_streams:
        return RopeTables(cos, sin)
    restarted = torch.cat(
        [p - p.min(dim=1, keepdim=True).values for p in position_ids.split([n for n in lengths if n], dim=1)], dim=1
    )
    return RopeTables(cos, sin, *rope_cos_sin(restarted, head_space.head_dim, head_space.rope_theta))


def attention_layout(
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    lengths: Sequence[int],
    layer_experts: Sequence[Sequence[int]],
    head_space: HeadSpace,
    past_len: int = 0,
    restart_streams: bool = False,
    mask_dtype: torch.dtype | None = None,
) -> AttentionLayout:
    """Build the :class:`AttentionLayout` of one call.

    Args:
        attention_mask: ``[B, Lq, P + Lq]`` bool (True = attend) or additive float.
        position_ids: ``[B, Lq]`` RoPE positions of the present tokens.
        lengths: tokens per expert stream (0 for an absent one); ``Lq = sum(lengths)``.
        layer_experts: per base layer, the experts with a layer there (stack order).
        head_space: the stack's head space (RoPE theta and head_dim).
        past_len: ``P``, the cached prefix length.
        restart_streams: also build per-stream restarted RoPE tables (cross-attention layers).
        mask_dtype: make a bool mask additive once, in this dtype (the dtype of the attention
            scores: the queries' dtype); ``None`` keeps the mask as given.
    """
    if mask_dtype is not None:
        attention_mask = as_additive_mask(attention_mask, mask_dtype)
    rope = rope_tables(position_ids, lengths, head_space, restart_streams)
    sliced: dict[tuple[int, ...], LayerInputs] = {}
    layers: list[LayerInputs | None] = []
    for experts in layer_experts:
        active = tuple(e for e in experts if lengths[e])
        if active and active not in sliced:
            sliced[active] = slice_tokens(attention_mask, rope, lengths, active, past_len)
        layers.append(sliced[active] if active else None)
    return AttentionLayout(tuple(lengths), past_len, tuple(layers))


def slice_tokens(
    mask: torch.Tensor,
    rope: RopeTables,
    lengths: Sequence[int],
    active: tuple[int, ...],
    past_len: int,
) -> LayerInputs:
    """Restrict ``mask [B, Lq, P + Lq]`` rows/columns and the RoPE rows to the tokens of the
    ``active`` experts: tokens of experts without a layer at this depth neither attend nor are
    attended to."""
    present = [e for e, n in enumerate(lengths) if n > 0]
    if list(active) == present:
        return mask, rope
    starts = [sum(lengths[:e]) for e in range(len(lengths))]
    rows = torch.cat([torch.arange(starts[e], starts[e] + lengths[e], device=mask.device) for e in active])
    cols = torch.cat([torch.arange(past_len, device=mask.device), rows + past_len])
    return mask[:, rows][:, :, cols], rope.rows(rows)


def attention_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype of queries projected by linears taking ``dtype`` on a ``device_type`` device:
    autocast's lower precision when autocast is on for that device, else ``dtype``."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype
