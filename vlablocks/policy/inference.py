"""Inference-time optimisation of a :class:`~vlablocks.policy.vla.VLA` (``vlablocks serve``,
``vlablocks bench``, ``benchmarks/vs_lerobot.py``).

What :func:`optimize_for_inference` does, each part optional (:class:`InferenceOptions`):

- ``fuse``: the per-step work gets cheaper, with the same function up to float rounding:
  every expert's ``q_proj`` / ``k_proj`` / ``v_proj`` become one matmul, and every gated MLP's
  ``gate_proj`` / ``up_proj`` another
  (:meth:`~vlablocks.blocks.attention.ExpertProjections.fuse`,
  :meth:`~vlablocks.blocks.mlp.GatedMlp.fuse`); attention runs as two matmuls with each key /
  value group's query heads stacked as rows for short queries (the suffix over the cache), and
  as torch's fused SDPA kernel for long ones (the prefix pass; the ``auto`` backend of
  :mod:`vlablocks.blocks.attention`); the tanh GELU runs as ``x * sigmoid(2 z)`` (the same
  function; ``tanh`` is slow on CPUs without AVX-512).
- ``quantize="int8"``: dynamic int8 quantisation (weights per output channel, activations per
  call; fbgemm kernels, :mod:`vlablocks.blocks.quantized`, which ``torch.compile`` traces
  without a graph break) of the linears that carry the FLOPs: the fusion stack's attention and
  MLP projections and the vision tower's. The suffix encoder's projections, the token
  embedding and the norms stay float32. For inference on a CPU; its action error against
  float32 is measured in docs/benchmarks.md.
- ``compile="step"``: ``torch.compile`` (static shapes) the vision tower, the prefix pass and
  the denoise step; the first chunk compiles them (inductor caches the compiled artefacts on
  disk, so a later process compiles faster: ``TORCHINDUCTOR_CACHE_DIR``).

Everything that depends only on the observation is computed once per chunk by the denoiser
itself (the prefix cache, the suffix masks and RoPE tables). An optimised policy is for
inference only: its parameter names changed, so :meth:`VLA.save_pretrained` refuses it.

bfloat16 on a CPU is ``policy.precision=bfloat16`` (:mod:`vlablocks.policy.precision`); it is
fast only where the CPU computes bf16 natively (AMX or AVX512-BF16): :func:`cpu_native_bf16`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vlablocks.blocks.attention import ExpertProjections
from vlablocks.blocks.mlp import GatedMlp, SigmoidGeluTanh
from vlablocks.blocks.quantized import quantize_linears
from vlablocks.heads.deep_fusion import DeepFusionDenoiser
from vlablocks.policy.vla import VLA

logger = logging.getLogger(__name__)

#: valid ``quantize`` / ``compile`` values.
QUANTIZE: tuple[str, ...] = ("none", "int8")
COMPILE: tuple[str, ...] = ("off", "step")
#: /proc/cpuinfo flags of native bfloat16 arithmetic.
BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class InferenceOptions:
    """How :func:`optimize_for_inference` changes a policy (see the module docstring).

    Attributes:
        fuse: fused projections, grouped-matmul attention, sigmoid-form GELU.
        quantize: ``"none"`` or ``"int8"`` (dynamic, CPU).
        compile: ``"off"`` or ``"step"``.
    """

    fuse: bool = True
    quantize: Literal["none", "int8"] = "none"
    compile: Literal["off", "step"] = "off"

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)}; got {self.quantize!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {list(COMPILE)}; got {self.compile!r}")

    @property
    def name(self) -> str:
        """A short label: ``fused+int8+compiled``, ``plain`` for nothing."""
        parts = ["fused"] if self.fuse else []
        parts += ["int8"] if self.quantize == "int8" else []
        parts += ["compiled"] if self.compile == "step" else []
        return "+".join(parts) or "plain"


def cpu_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16), read from ``cpuinfo``'s
    flags; ``False`` where the file cannot be read (not Linux). Without it, torch emulates bf16
    matmuls and they run slower than float32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in BF16_FLAGS)


def fuse_for_inference(module: nn.Module) -> None:
    """Fuse every expert's q/k/v and every gated MLP's gate/up, and switch the tanh GELUs of the
    gated MLPs to the sigmoid form, in place (:func:`optimize_for_inference` also picks the
    ``auto`` attention backend)."""
    for sub in list(module.modules()):
        if isinstance(sub, (ExpertProjections, GatedMlp)):
            sub.fuse()
        if isinstance(sub, GatedMlp) and isinstance(sub.act, nn.GELU) and sub.act.approximate == "tanh":
            sub.act = SigmoidGeluTanh()


def quantize_int8(vla: VLA) -> int:
    """Dynamic int8 quantisation of the fusion stack's, the vision tower's and the projector's
    linears, in place (:class:`~vlablocks.blocks.quantized.Int8DynamicLinear`: fbgemm, per-channel
    weights; CPU only); returns how many were quantised."""
    parts = [vla.backbone] + [part for part in (vla.vision, vla.projector) if part is not None]
    return sum(quantize_linears(part) for part in parts)


def compile_policy(vla: VLA) -> None:
    """``torch.compile`` (static shapes) the vision tower, the denoiser's prefix pass and its
    denoise step in place (as ``vlablocks bench --compile step`` does for the latter two); the
    first chunk compiles them."""
    denoiser = vla.denoiser
    denoiser.prepare = torch.compile(denoiser.prepare, dynamic=False)
    denoiser.velocity = torch.compile(denoiser.velocity, dynamic=False)
    if vla.vision is not None:
        vla.vision.forward = torch.compile(vla.vision.forward, dynamic=False)


def optimize_for_inference(vla: VLA, options: InferenceOptions = InferenceOptions()) -> VLA:
    """``vla`` changed in place for fast inference as ``options`` say, in eval mode; returned.

    Raises:
        ValueError: int8 asked for a policy that is not on the CPU, or a policy that was
            optimised already.
    """
    if vla.inference_options is not None:
        raise ValueError(f"this policy was optimised for inference already ({vla.inference_options.name})")
    device = next(vla.parameters()).device
    if options.quantize == "int8" and device.type != "cpu":
        raise ValueError(f"quantize='int8' is dynamic CPU quantisation; the policy is on {device}")
    if not isinstance(vla.denoiser, DeepFusionDenoiser) and options.fuse:
        logger.info("the denoiser is not a deep-fusion one: only its gated MLPs and attention projections fuse")
    vla.eval()
    if options.fuse:
        fuse_for_inference(vla)
        vla.backbone.set_attention_backend("auto")
    if options.quantize == "int8":
        quantize_int8(vla)
    if options.compile == "step":
        compile_policy(vla)
    vla.inference_options = options
    logger.info("optimised for inference: %s", options.name)
    return vla
