"""RMS norms: LLaMA's ``w * n``, Gemma's ``(1 + w) * n``, and pi0.5's adaptive AdaRMS.

All of them normalise in float32 and cast back to the input dtype, so they are safe under
bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_norm_eps(eps: float) -> None:
    """ValueError unless ``eps`` is a finite number > 0 (a zero, negative or NaN epsilon divides
    by zero or takes the root of a negative number on an all-zero row)."""
    if isinstance(eps, bool) or not 0 < eps < math.inf:
        raise ValueError(f"the norm epsilon must be a finite number > 0; got {eps!r}")


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps)`` computed in float32. ``[..., D] -> [..., D]`` (fp32)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale.

    Args:
        dim: normalised width.
        eps: added to the mean square.
        unit_offset: ``False`` gives LLaMA's ``w * n`` (``w`` initialised to 1); ``True`` gives
            Gemma's ``(1 + w) * n`` (``w`` initialised to 0). Checkpoint weights load unchanged
            in both conventions.

    Shapes: ``[..., dim] -> [..., dim]`` in the input dtype.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        unit_offset: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_norm_eps(eps)
        self.eps = eps
        self.unit_offset = unit_offset
        init = torch.zeros if unit_offset else torch.ones
        self.weight = nn.Parameter(init(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.float() + 1.0 if self.unit_offset else self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


class AdaRMSNorm(nn.Module):
    """Adaptive RMSNorm of pi0.5: scale, shift and gate come from a condition vector.

    ``(scale, shift, gate) = Linear(cond).chunk(3)``; the output is ``n * (1 + scale) + shift``
    and the gate multiplies the branch output in the residual (``x + y * gate``). The linear
    layer is zero-initialised, so at initialisation the norm is a plain RMS normalisation and
    every gated residual branch is closed (adaLN-Zero).

    Args:
        dim: normalised width.
        cond_dim: width of the condition vector.
        eps: added to the mean square.

    Shapes: ``x [B, L, dim]``, ``cond [B, cond_dim]`` -> ``(y [B, L, dim], gate [B, 1, dim])``.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_norm_eps(eps)
        self.eps = eps
        self.modulation = nn.Linear(cond_dim, 3 * dim, device=device, dtype=dtype)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = self.modulation(cond).unsqueeze(1).chunk(3, dim=-1)
        y = rms_normalize(x, self.eps) * (1.0 + scale.float()) + shift.float()
        return y.to(x.dtype), gate.to(x.dtype)
