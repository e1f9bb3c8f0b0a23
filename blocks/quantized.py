"""Dynamic int8 linear layers for CPU inference, on torch's fbgemm kernels.

:class:`Int8DynamicLinear` is what ``torch.ao.quantization.quantize_dynamic`` makes of an
``nn.Linear`` (weights int8 per output channel, activations quantised per call, fbgemm's
``quantized::linear_dynamic``), with one difference: its kernel is called through a custom op
(``torch.ops.vlablocks.int8_linear``) that takes the packed weights' handle as an int, so
``torch.compile`` traces a model full of them as one graph (torch.ao's module breaks the graph
at every layer: dynamo cannot trace its packed-weights object).

torch 2.14 still ships these kernels but announces the removal of quantized tensors (issue
pytorch#184982; torchao is their successor, not installed here). The module keeps the whole
dependency in :meth:`Int8DynamicLinear.from_linear` and ``_int8_linear``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import torch
from torch import nn

#: packed fbgemm weights by handle (the custom op's int argument).
_PACKED: dict[int, torch.ScriptObject] = {}
_HANDLES = itertools.count()


def _int8_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """``x [..., in]`` float32 -> ``[..., out_features]`` through the packed int8 weights ``handle``."""
    return torch.ops.quantized.linear_dynamic(x, _PACKED[handle], True)  # reduce_range: fbgemm's 7-bit activations


# A plain library definition: its dispatch costs ~5 us a call, torch.library.custom_op's ~20 us.
_LIBRARY = torch.library.Library("vlablocks", "DEF")
_LIBRARY.define("int8_linear(Tensor x, int handle, int out_features) -> Tensor")
_LIBRARY.impl("int8_linear", _int8_linear, "CPU")


@torch.library.register_fake("vlablocks::int8_linear")
def _int8_linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class Int8DynamicLinear(nn.Module):
    """An ``nn.Linear`` with int8 weights (symmetric, per output channel, torch.ao's default
    per-channel observer) and activations quantised per call; float32 in and out.

    Build it with :meth:`from_linear`. It holds no parameters (the packed weights live in the
    fbgemm object); it is for inference, not training or saving.
    """

    def __init__(self, handle: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.handle = handle
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8DynamicLinear:
        """Quantise ``linear``'s weight (and keep its bias in float32)."""
        weight = linear.weight.detach().float().cpu()
        observer = torch.ao.quantization.default_per_channel_weight_observer()
        observer(weight)
        scale, zero_point = observer.calculate_qparams()
        with warnings.catch_warnings():  # torch 2.14 announces quantized tensors' removal (torchao replaces them)
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
            qweight = torch.quantize_per_channel(weight, scale.double(), zero_point, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        handle = next(_HANDLES)
        _PACKED[handle] = torch.ops.quantized.linear_prepack(qweight, bias)
        return cls(handle, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one op in the graph
            return torch.ops.vlablocks.int8_linear(x, self.handle, self.out_features)
        return _int8_linear(x, self.handle, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_linears(module: nn.Module, keep: Callable[[str, nn.Linear], bool] = lambda name, linear: False) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an :class:`Int8DynamicLinear`, in place,
    except those for which ``keep(qualified_name, linear)`` is true; returns how many changed."""
    count = 0
    for name, child in list(module.named_modules()):
        for child_name, linear in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(linear) is nn.Linear and not keep(full, linear):
                setattr(child, child_name, Int8DynamicLinear.from_linear(linear))
                count += 1
    return count
