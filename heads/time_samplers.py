"""Flow-matching time samplers: ``t ~ U(low, high)`` and pi0's ``Beta(1.5, 1) * 0.999 + 0.001``.

Every random number comes from the caller's ``torch.Generator``, so a seeded generator gives
reproducible times (``torch.distributions`` cannot take a generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

Device = torch.device | str


class TimeSampler(Protocol):
    """Draws one flow-matching time per sample: ``batch_size -> t [B]`` float32."""

    def __call__(
        self, batch_size: int, device: Device, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def sample_gamma(
    concentration: float,
    num_samples: int,
    device: Device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``Gamma(concentration, 1)`` samples drawn from ``generator``: ``[num_samples]`` float32.

    Marsaglia & Tsang (2000) squeeze-rejection method, vectorised: rejected samples are redrawn
    until every sample is accepted (acceptance > 95% per round). ``concentration < 1`` uses
    ``Gamma(a) = Gamma(a + 1) * U ** (1 / a)``. Unlike ``torch.distributions.Gamma``, every
    random number comes from ``generator``, so a seeded generator gives reproducible samples.
    The generator must live on ``device``.
    """
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    boosted = concentration < 1.0
    d = (concentration + 1.0 if boosted else concentration) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    samples = torch.empty(num_samples, device=device)
    pending = torch.arange(num_samples, device=device)
    while pending.numel() > 0:
        x = torch.randn(pending.numel(), generator=generator, device=device)
        u = torch.rand(pending.numel(), generator=generator, device=device)
        v = (1.0 + c * x) ** 3
        accept = (v > 0) & (u.log() < 0.5 * x**2 + d - d * v + d * v.log())
        samples[pending[accept]] = d * v[accept]
        pending = pending[~accept]
    if boosted:
        u = torch.rand(num_samples, generator=generator, device=device)
        samples = samples * u ** (1.0 / concentration)
    return samples


def sample_beta(
    alpha: float,
    beta: float,
    num_samples: int,
    device: Device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``Beta(alpha, beta)`` samples drawn from ``generator``: ``[num_samples]`` float32.

    ``beta == 1`` (pi0's ``Beta(1.5, 1)``) is sampled by inverting the CDF ``x ** alpha``: one
    uniform draw, no host synchronisation. Otherwise ``X / (X + Y)`` with
    ``X ~ Gamma(alpha)``, ``Y ~ Gamma(beta)`` from ``sample_gamma``.
    """
    if beta == 1.0:
        u = torch.rand(num_samples, generator=generator, device=device)
        return u ** (1.0 / alpha)
    x = sample_gamma(alpha, num_samples, device, generator)
    y = sample_gamma(beta, num_samples, device, generator)
    return x / (x + y)


@dataclass(frozen=True)
class UniformTimeSampler:
    """``t ~ U(low, high)``, with ``0 <= low < high <= 1``.

    Attributes:
        low: lower bound of ``t``.
        high: upper bound of ``t``.
    """

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(
                f"UniformTimeSampler needs 0 <= low < high <= 1, got low={self.low}, "
                f"high={self.high}"
            )

    def __call__(
        self, batch_size: int, device: Device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        u = torch.rand(batch_size, generator=generator, device=device)
        return self.low + (self.high - self.low) * u


@dataclass(frozen=True)
class BetaTimeSampler:
    """``t = Beta(alpha, beta) * scale + offset``; the defaults are pi0's (``t`` in
    ``[0.001, 1]``, weighted towards the noisy end). Reproducible with a seeded generator (see
    ``sample_beta``).

    Attributes:
        alpha: first Beta shape parameter (pi0: 1.5).
        beta: second Beta shape parameter (pi0: 1.0).
        scale: multiplies the Beta sample (pi0: 0.999).
        offset: added after scaling, so ``t >= offset`` (pi0: 0.001).
    """

    alpha: float = 1.5
    beta: float = 1.0
    scale: float = 0.999
    offset: float = 0.001

    def __post_init__(self) -> None:
        if not (0 < self.alpha < math.inf and 0 < self.beta < math.inf):  # NaN fails too
            raise ValueError(
                f"BetaTimeSampler needs alpha > 0 and beta > 0, got alpha={self.alpha}, "
                f"beta={self.beta}"
            )
        if not (self.scale > 0 and self.offset >= 0 and self.offset + self.scale <= 1.0):
            raise ValueError(
                "BetaTimeSampler needs scale > 0, offset >= 0 and offset + scale <= 1 (t in "
                f"[0, 1]), got scale={self.scale}, offset={self.offset}"
            )

    def __call__(
        self, batch_size: int, device: Device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        z = sample_beta(self.alpha, self.beta, batch_size, device, generator)
        return z * self.scale + self.offset
