"""Projectors from the vision width to the LLM width: :class:`LinearProjector` (pi0 / PaliGemma),
:class:`Mlp2xGeluProjector` (LLaVA's ``mlp2x_gelu``; :func:`llava_projector_state_dict` renames
LLaVA checkpoint keys onto it) and :class:`PixelShuffleProjector` (SmolVLA)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from einops import rearrange
from torch import nn

from vlablocks.blocks.mlp import Mlp

from vlablocks.encoders.vision import Device

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------------


class LinearProjector(nn.Linear):
    """One linear layer from the vision width to the LLM width (pi0 / PaliGemma).

    Args:
        in_dim: vision width.
        out_dim: LLM width.
        bias: whether the layer has a bias.

    Shapes: ``[B, N, in_dim] -> [B, N, out_dim]``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, bias: bool = True, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(in_dim, out_dim, bias=bias, device=device, dtype=dtype)


class Mlp2xGeluProjector(Mlp):
    """LLaVA's ``mlp2x_gelu``: ``Linear(in_dim, out_dim)``, exact GELU, ``Linear(out_dim, out_dim)``.

    The toolkit :class:`~vlablocks.blocks.mlp.Mlp` (parameters ``fc1``, ``fc2``); LLaVA
    checkpoints load through :func:`llava_projector_state_dict`.

    Shapes: ``[B, N, in_dim] -> [B, N, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_dim, out_dim, out_dim, nn.GELU, device=device, dtype=dtype)


def pixel_shuffle(tokens: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """SmolVLM's pixel shuffle: merge each ``r x r`` block of a square token grid into one token.

    Token ``(i, j)`` of the ``s x s`` grid goes to token ``(i // r, j // r)``, channel block
    ``(i % r) * r + (j % r)`` (so SmolVLM connector weights apply unchanged).

    Shapes: ``[B, s * s, D] -> [B, (s / r)^2, D * r * r]``.
    """
    batch, length, dim = tokens.shape
    side = math.isqrt(length)
    if side * side != length or side % scale_factor:
        raise ValueError(
            f"pixel shuffle needs a square token grid whose side is a multiple of scale_factor={scale_factor}; "
            f"got {length} tokens"
        )
    return rearrange(tokens, "b (h r1 w r2) d -> b (h w) (r1 r2 d)", r1=scale_factor, r2=scale_factor, w=side // scale_factor)


class PixelShuffleProjector(nn.Module):
    """SmolVLM's connector: :func:`pixel_shuffle` (``r^2`` fewer tokens), then ``Linear(D r^2 -> out_dim)`` without bias.

    Args:
        in_dim: vision width ``D``.
        out_dim: LLM width.
        scale_factor: ``r``, the side of the merged token blocks (SmolVLM: 4, 1024 -> 64 tokens).

    Shapes: ``[B, s * s, in_dim] -> [B, (s / r)^2, out_dim]``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, scale_factor: int = 4, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if scale_factor < 1:
            raise ValueError(f"scale_factor must be >= 1; got {scale_factor}")
        self.scale_factor = scale_factor
        self.proj = nn.Linear(in_dim * scale_factor**2, out_dim, bias=False, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(tokens, self.scale_factor))


#: LLaVA ``nn.Sequential`` index -> projector parameter prefix (index 1 is the GELU).
_LLAVA_PROJECTOR_LAYERS = {"0": "fc1", "2": "fc2"}


def llava_projector_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename LLaVA projector keys for :class:`Mlp2xGeluProjector` or :class:`LinearProjector`.

    ``{prefix}0.weight -> fc1.weight``, ``{prefix}2.bias -> fc2.bias`` (mlp2x_gelu) and
    ``{prefix}weight -> weight`` (linear). With the default ``prefix=""`` the keys are the
    projector's own (``0.weight``, ...) and every key must be one; with
    ``prefix="model.mm_projector."`` the projector is picked out of a whole LLaVA checkpoint and
    other keys are ignored. A key under ``prefix`` that fits neither projector (e.g.
    ``mlp3x_gelu``'s ``4.weight``) raises. Load the result with ``projector.load_state_dict``.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        layer, _, param = rest.rpartition(".")
        if param not in ("weight", "bias") or (layer and layer not in _LLAVA_PROJECTOR_LAYERS):
            raise ValueError(
                f"state_dict key {key!r} is not a mlp2x_gelu ({prefix}{{0,2}}.{{weight,bias}}) or linear "
                f"({prefix}{{weight,bias}}) projector parameter"
            )
        renamed[f"{_LLAVA_PROJECTOR_LAYERS[layer]}.{param}" if layer else param] = value
    if not renamed:
        raise ValueError(f"state_dict has no key starting with prefix {prefix!r}")
    return renamed
