"""Rotary position embedding in the split-halves convention of transformers' LLaMA.

``rotate_half([x1, x2]) = [-x2, x1]`` over the two halves of the head dimension, and
``x * cos + rotate_half(x) * sin``; angles are ``position * theta^(-2i / head_dim)``, computed in
float32 whatever the model dtype.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions.

    Args:
        positions: ``[B, L]`` integer positions.
        head_dim: even head dimension.
        theta: RoPE base.

    Returns:
        ``(cos, sin)``, each ``[B, L, head_dim]`` float32.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, L, D]`` by ``cos, sin [B, L, D]`` (cast to ``x``'s dtype)."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin
