"""Parameter precision of a :class:`~vlablocks.policy.vla.VLA` (``policy.precision``).

``"float32"`` leaves every parameter in float32. ``"bfloat16"`` is LeRobot's precision policy for
pi0 / pi0.5 (``PaliGemmaWithExpertModel.to_bfloat16_for_selected_params``): the transformer's
weights in bfloat16, its precision-sensitive parts and the policy's own projections in float32.

============================================  ========  =======================================
part (:meth:`VLA.param_groups`)               dtype     computes on
============================================  ========  =======================================
``backbone.*``, ``experts.*`` attention, MLP  bfloat16  bf16 streams (the stack casts them in)
``text`` (token embedding)                    bfloat16
every norm of the stack (RMSNorm, AdaRMSNorm  float32   fp32 (hands bf16 to the next linear)
incl. its ``modulation``, final norms)
``vision``, ``projector``, ``geometry``       float32   fp32 images; tokens cast to bf16 at the prefix
``state_proj``, ``suffix`` (in/out            float32   fp32; the expert's output is cast to fp32
projections, time MLP)                                  before ``action_out_proj``
============================================  ========  =======================================

The suffix encoder stays float32 as in LeRobot, where ``state_proj``, ``action_in_proj``, the time
MLPs and ``action_out_proj`` live outside the cast model. Buffers (normalisation statistics, pixel
statistics) are not touched. Actions, velocities and the loss come out in float32.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm
from vlablocks.heads.deep_fusion import DeepFusionDenoiser
from vlablocks.policy.config import Precision

#: valid ``policy.precision`` values.
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: the norm layers ``"bfloat16"`` keeps in float32 (LeRobot: ``input_layernorm``,
#: ``post_attention_layernorm``, ``model.norm``, incl. pi0.5's adaRMS ``dense``).
NORM_TYPES: tuple[type[nn.Module], ...] = (RMSNorm, AdaRMSNorm)

#: the :meth:`VLA.param_groups` groups whose weights ``"bfloat16"`` casts (the transformer).
REDUCED_GROUPS: tuple[str, ...] = ("backbone.", "experts.", "text")


def reduced_precision_parameters(vla: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters ``"bfloat16"`` casts, by ``named_parameters()`` name: those of the
    transformer groups (:data:`REDUCED_GROUPS`) that do not belong to a norm of the fusion
    stack (:data:`NORM_TYPES`). Every other parameter stays float32."""
    norm_params = {id(p) for m in vla.backbone.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}
    return {
        name: param
        for group, params in vla.param_groups().items()
        if group.startswith(REDUCED_GROUPS)
        for name, param in params.items()
        if id(param) not in norm_params
    }


def apply_precision(vla: nn.Module, precision: Precision) -> None:
    """Set ``vla``'s parameter dtypes in place for ``precision`` (see the module docstring):
    ``"float32"`` leaves the model as built; ``"bfloat16"`` casts :func:`reduced_precision_parameters`.

    Works on any device, the meta device included; the parameters stay the same objects.

    Raises:
        ValueError: an unknown ``precision``, or ``"bfloat16"`` for a policy whose denoiser is
            not a :class:`~vlablocks.heads.deep_fusion.DeepFusionDenoiser` (DiT and hybrid heads
            read the bf16 stack through float32 projections: not supported).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"policy.precision must be one of {list(PRECISIONS)}; got {precision!r}")
    if precision == "bfloat16" and type(vla.denoiser) is not DeepFusionDenoiser:
        raise ValueError(
            f"policy.precision='bfloat16' needs a deep_fusion denoiser (pi0, pi0.5, SmolVLA); this policy's is "
            f"{type(vla.denoiser).__name__}: use precision 'float32' (train.mixed_precision: bf16 for autocast)"
        )
    if precision == "bfloat16":
        for param in reduced_precision_parameters(vla).values():
            param.data = param.data.to(torch.bfloat16)


def parameter_dtypes(vla: nn.Module) -> dict[str, torch.dtype]:
    """The dtype ``policy.precision`` declares for every parameter, by ``named_parameters()`` name."""
    reduced = reduced_precision_parameters(vla) if vla.config.precision == "bfloat16" else {}
    return {name: torch.bfloat16 if name in reduced else torch.float32 for name, _ in vla.named_parameters()}
