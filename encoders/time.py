"""Flow-matching time embedding: pi0's sinusoid, then an MLP.

``sinusoidal_embedding`` is the one sinusoid of the toolkit; ``TimestepEmbedder`` is the thin
module around it.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from vlablocks.blocks.mlp import ActLayer, Mlp


def _check_dim(dim: int) -> None:
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(f"dim must be a positive even integer ([sin, cos] halves), got {dim}")


def sinusoidal_embedding(
    t: torch.Tensor,
    dim: int,
    min_period: float = 4e-3,
    max_period: float = 4.0,
) -> torch.Tensor:
    """pi0's sine-cosine embedding of a scalar time per sample.

    ``fraction = linspace(0, 1, dim / 2)``, ``period = min_period * (max_period / min_period) **
    fraction`` and the output is ``[sin(2 pi t / period), cos(2 pi t / period)]`` (all sines, then
    all cosines), computed in float64 and returned in float32.

    Shapes: ``t [B]`` -> ``[B, dim]`` float32.
    """
    _check_dim(dim)
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got {tuple(t.shape)}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2.0 * math.pi) * t.to(torch.float64)[:, None] / period
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(torch.float32)


class TimestepEmbedder(nn.Module):
    """Embeds a flow-matching time: ``mlp(sinusoidal_embedding(t))``.

    Args:
        dim: width of the sinusoid (even).
        hidden_dim: hidden width of the MLP (``None``: ``dim``).
        out_dim: output width (``None``: ``dim``).
        act_layer: activation of the MLP.
        min_period: shortest sinusoid period.
        max_period: longest sinusoid period.

    Shapes: ``t [B]`` -> ``[B, out_dim]`` in the MLP's dtype (the float32 sinusoid is cast to
    the MLP's weight dtype first).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        act_layer: ActLayer = nn.SiLU,
        min_period: float = 4e-3,
        max_period: float = 4.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_dim(dim)
        self.dim = dim
        self.min_period = min_period
        self.max_period = max_period
        self.mlp = Mlp(dim, hidden_dim, out_dim, act_layer, device=device, dtype=dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.dim, self.min_period, self.max_period)
        return self.mlp(emb.to(self.mlp.fc1.weight.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, min_period={self.min_period}, max_period={self.max_period}"


class DiffusersTimestepEmbedder(nn.Module):
    """GR00T's time embedding on diffusers parts, fed from the toolkit's time convention.

    vlablocks uses ``t = 1`` for noise; GR00T uses ``tau = 1 - t`` (``tau = 1`` is data) scaled to
    ``[0, 1000]``. The conversion happens here, at the edge:
    ``TimestepEmbedding(Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=1)(1000 * (1 - t)))``
    (continuous; GR00T additionally rounds to 1000 buckets).

    Args:
        dim: output width.
        num_channels: width of the diffusers sinusoid (GR00T: 256).

    Shapes: ``t [B]`` -> ``[B, dim]``.
    """

    def __init__(
        self,
        dim: int,
        num_channels: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.sinusoid = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.mlp = TimestepEmbedding(num_channels, dim).to(device=device, dtype=dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(1000.0 * (1.0 - t.float()))
        return self.mlp(emb.to(self.mlp.linear_1.weight.dtype))


#: time-embedding names (as recipes spell them) -> embedder classes ``(dim) -> module``.
TIME_EMBEDDERS: dict[str, type[nn.Module]] = {"pi0": TimestepEmbedder, "diffusers": DiffusersTimestepEmbedder}


def get_time_embedder(name: str) -> type[nn.Module]:
    """The time embedder called ``name``; ValueError lists the valid names."""
    if name not in TIME_EMBEDDERS:
        raise ValueError(f"unknown time embedding {name!r}; valid: {sorted(TIME_EMBEDDERS)}")
    return TIME_EMBEDDERS[name]
