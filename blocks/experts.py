"""Expert specs and layer maps: the shape and flavour of one stream of a deep-fusion stack.

An :class:`ExpertSpec` says an expert's width, MLP, head space, norm flavour (RMSNorm, Gemma's
``(1 + w)``, AdaRMS) and its layer map: the base layers at which it has a layer
(:func:`every_layer`, :func:`every_kth_layer`, :func:`first_n_layers` or any increasing tuple).
:func:`apply_norm` and :func:`gated_residual` run its norms and residuals the same way for
plain and adaptive norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlablocks.blocks.attention import HeadSpace
from vlablocks.blocks.mlp import ActLayer
from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm, check_norm_eps


# ------------------------------------------------------------------------------- layer maps


def every_layer(num_layers: int) -> tuple[int, ...]:
    """An expert as deep as the base: a layer at every base layer."""
    return tuple(range(num_layers))


def every_kth_layer(num_layers: int, k: int) -> tuple[int, ...]:
    """An expert with a layer at base layers 0, k, 2k, ... (SmolVLA pairs expert layer j with base layer j*k)."""
    if k < 1:
        raise ValueError(f"every_kth_layer needs k >= 1; got {k}")
    return tuple(range(0, num_layers, k))


def first_n_layers(num_layers: int, n: int) -> tuple[int, ...]:
    """An expert with a layer at each of the first ``n`` base layers."""
    if not 1 <= n <= num_layers:
        raise ValueError(f"first_n_layers needs 1 <= n <= num_layers ({num_layers}); got {n}")
    return tuple(range(n))


# ------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ExpertSpec:
    """Shape and flavour of one expert stream.

    Attributes:
        name: label used in messages (``"vlm"``, ``"action"``, ...).
        width: hidden width.
        mlp_dim: gated-MLP hidden width.
        head_space: the attention head space; every expert of a stack must use the base's.
        layers: base-layer indices at which this expert has a layer (``None``: every layer).
            The base expert (index 0) always has every layer.
        act_layer: MLP activation (``nn.SiLU``: SwiGLU; ``GeluTanh``: Gemma's GeGLU).
        norm_eps: RMSNorm epsilon.
        norm_unit_offset: Gemma's ``(1 + w)`` RMSNorm instead of LLaMA's ``w``.
        adarms_cond_dim: if set, every norm of this expert is an :class:`AdaRMSNorm`
            conditioned on a ``[B, adarms_cond_dim]`` vector (pi0.5 time conditioning) with
            gated residuals.
        attention_bias: biases on q/k/v/o.
        share_base_weights: reuse the base's layer weights (norms, projections, MLP) at every
            layer this expert has; only its final norm is its own. Its shape fields must then
            equal the base's.
    """

    name: str
    width: int
    mlp_dim: int
    head_space: HeadSpace
    layers: tuple[int, ...] | None = None
    act_layer: ActLayer = nn.SiLU
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False
    adarms_cond_dim: int | None = None
    attention_bias: bool = False
    share_base_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ExpertSpec {self.name!r}: {name} must be an int >= 1; got {value!r}")
        check_norm_eps(self.norm_eps)

    def make_norm(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """This expert's norm layer (RMSNorm or AdaRMSNorm)."""
        if self.adarms_cond_dim is not None:
            return AdaRMSNorm(self.width, self.adarms_cond_dim, eps=self.norm_eps, device=device, dtype=dtype)
        return RMSNorm(self.width, eps=self.norm_eps, unit_offset=self.norm_unit_offset, device=device, dtype=dtype)


def apply_norm(
    norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a plain or adaptive norm: ``-> (normed, gate or None)``."""
    if isinstance(norm, AdaRMSNorm):
        return norm(x, cond)
    return norm(x), None


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + y`` or, with an AdaRMS gate, ``x + y * gate``."""
    return x + y if gate is None else x + y * gate
