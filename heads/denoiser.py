"""The Denoiser protocol: what a flow-matching head needs from the network that predicts velocity.

A denoiser splits its work in two so that the observation is encoded once and reused:

- ``prepare(prefix) -> context``: once per observation (the prefix KV cache for deep fusion, the
  per-layer backbone features for a layerwise DiT);
- ``velocity(context, x_t, t, state) -> v``: once per ODE step (and once per noise sample in
  training), running only the action part of the network.

Because the prefix never attends to the suffix, training through these two methods is exactly
the joint pass, and several noise samples can share one prefix computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Prefix:
    """The prefix tokens of a batch of observations.

    Attributes:
        embeds: ``[B, P, D]`` token embeddings (image, geometry, text, ...).
        pad: ``[B, P]`` bool, True for real tokens, False for padding.
        ar: ``[B, P]`` int, the block-causal "autoregressive" marks of the pi0 / big_vision
            convention (all 0 for a bidirectional prefix-LM prefix).
    """

    embeds: torch.Tensor
    pad: torch.Tensor
    ar: torch.Tensor


@runtime_checkable
class Denoiser(Protocol):
    """Predicts the flow-matching velocity; see the module docstring."""

    def prepare(self, prefix: Prefix) -> Any:
        """Encode the observation once: ``prefix -> context`` (opaque to the head)."""
        ...

    def velocity(
        self,
        context: Any,
        x_t: torch.Tensor,
        t: torch.Tensor,
        state: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x_t [B, H, A]``, ``t [B]``, ``state [B, S] | None`` -> velocity ``[B, H, A]``."""
        ...
