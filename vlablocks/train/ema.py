"""The exponential moving average (EMA) of the trainable weights: what a run deploys
(``load_ema_policy(checkpoint)``, or on the live model ``with trainer.ema_weights(): ...``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay used after optimizer step ``step`` (0-based): warmed up from 0.1 towards ``decay``."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """An EMA copy of ``params``: ``ema = lerp(ema, param, 1 - ema_decay_at(decay, step))``.

    Args:
        params: the trainable parameters (the EMA starts as a copy of them).
        decay: the EMA decay after the warm-up of :func:`ema_decay_at`.
    """

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the EMA towards the current weights after 0-based optimizer step ``step``."""
        live = [p.detach() for p in self.params]
        torch._foreach_lerp_(self.shadow, live, 1.0 - ema_decay_at(self.decay, step))

    @torch.no_grad()
    def reset(self) -> None:
        """EMA := the current weights."""
        torch._foreach_copy_(self.shadow, [p.detach() for p in self.params])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights (the live ones come back after)."""
        params = [p.detach() for p in self.params]
        with torch.no_grad():
            live = [p.clone() for p in params]
            torch._foreach_copy_(params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, live)
