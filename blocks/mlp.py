"""Feed-forward blocks: the one plain MLP and the one gated MLP of the toolkit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

ActLayer = Callable[[], nn.Module]

#: tanh-approximated GELU, the activation of Gemma's GeGLU and of GR00T's feed-forward.
GeluTanh: ActLayer = partial(nn.GELU, approximate="tanh")

class SigmoidGeluTanh(nn.Module):
    """The tanh-approximated GELU written as ``x * sigmoid(2 z)``, ``z = sqrt(2 / pi) (x +
    0.044715 x^3)`` (``0.5 (1 + tanh z) = sigmoid(2 z)``): the same function as
    :data:`GeluTanh` up to float rounding, about twice as fast on CPUs whose ``tanh`` is slow.
    Inference swaps it in (:func:`vlablocks.policy.inference.optimize_for_inference`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * x
        z.mul_(2 * 0.7978845608028654 * 0.044715).add_(2 * 0.7978845608028654).mul_(x)
        return z.sigmoid_().mul_(x)


#: activation names (as recipes spell them) -> activation classes.
ACTIVATIONS: dict[str, ActLayer] = {"silu": nn.SiLU, "gelu_tanh": GeluTanh, "gelu": nn.GELU}


def input_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer takes: its weight's, or float32 for a dynamically quantised one
    (:class:`~vlablocks.blocks.quantized.Int8DynamicLinear` has no float weight)."""
    weight = getattr(linear, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def stacked_linear(parts: Sequence[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` computing ``parts`` side by side: their weights (and biases) stacked along
    the output, ``[..., in] -> [..., sum(out)]`` (split the result to get each part's output)."""
    first = parts[0]
    stacked = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                        device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([p.weight for p in parts]))
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat([p.bias for p in parts]))
    return stacked


def get_activation(name: str) -> ActLayer:
    """The activation called ``name``; ValueError lists the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """Two linear layers with an activation between them: ``fc2(act(fc1(x)))``.

    Args:
        in_features: input width.
        hidden_features: hidden width (``None``: ``in_features``).
        out_features: output width (``None``: ``in_features``).
        act_layer: activation class or factory, e.g. ``nn.SiLU``.
        bias: whether both linear layers have a bias.

    Shapes: ``[..., in_features] -> [..., out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: ActLayer = nn.SiLU,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """Gated feed-forward of LLaMA / Gemma: ``down(act(gate(x)) * up(x))``.

    ``act_layer=nn.SiLU`` gives SwiGLU (LLaMA, Mistral); ``act_layer=GeluTanh`` gives the
    tanh-GeGLU of Gemma. Parameter names follow transformers (``gate_proj``, ``up_proj``,
    ``down_proj``) so checkpoints map one to one.

    Shapes: ``[..., dim] -> [..., dim]``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act_layer: ActLayer = nn.SiLU,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias, **factory)
        self.act = act_layer()

    @property
    def fused(self) -> bool:
        """Whether gate and up are one ``gate_up_proj`` (:meth:`fuse`)."""
        return hasattr(self, "gate_up_proj")

    def fuse(self) -> None:
        """Replace ``gate_proj`` and ``up_proj`` by one ``gate_up_proj`` with their stacked
        weights (one matmul instead of two, for inference; the same outputs up to float
        rounding). The parameter names change: checkpoints are written before fusing."""
        if self.fused:
            return
        self.gate_up_proj = stacked_linear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
