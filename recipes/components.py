"""The registered block types, and the recipe-facing factories that turn names into classes.

Blocks take classes and explicit arguments; recipes speak in names. This module is where one
becomes the other (activation names, norm names, layer maps), and where every ``type:`` name
is registered.
"""

from __future__ import annotations

from typing import Literal

from vlablocks.blocks.attention import HeadSpace
from vlablocks.blocks.fusion import DeepFusionStack, ExpertSpec, every_kth_layer as _every_kth, first_n_layers as _first_n
from vlablocks.blocks.mlp import get_activation
from vlablocks.encoders.geometry import FrequencyPositionEncoding, LLaVA3DPositionEncoding
from vlablocks.encoders.suffix import AdaRMSTimeFusion, ConcatMlpTimeFusion, TimeTokenFusion
from vlablocks.encoders.text import ByteTokenizer, HFTokenizer
from vlablocks.encoders.projectors import LinearProjector, Mlp2xGeluProjector, PixelShuffleProjector
from vlablocks.encoders.siglip import SiglipVision
from vlablocks.encoders.timm_vision import TimmVision
from vlablocks.encoders.vision import ConvNet, PatchViT
from vlablocks.heads.deep_fusion import DeepFusionDenoiser
from vlablocks.heads.dit import HybridDenoiser, LastLayerDiTDenoiser, LayerwiseDiTDenoiser
from vlablocks.heads.time_samplers import BetaTimeSampler, UniformTimeSampler
from vlablocks.recipes.registry import REGISTRIES

def expert(
    name: str,
    width: int,
    mlp_dim: int,
    head_space: HeadSpace,
    num_layers: int,
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu",
    norm: Literal["rms", "gemma"] = "rms",
    norm_eps: float = 1e-6,
    adarms: bool = False,
    attention_bias: bool = False,
    share_base_weights: bool = False,
    layers: list[int] | None = None,
    every_kth_layer: int | None = None,
    first_n_layers: int | None = None,
) -> ExpertSpec:
    """One expert of a ``deep_fusion`` backbone (an item of ``backbone.experts``).

    Args:
        name: label (``vlm``, ``action``, ...).
        width, mlp_dim: hidden and gated-MLP widths.
        head_space: ``{num_heads, num_kv_heads, head_dim, rope_theta}``; must equal the base's.
        num_layers: the base depth (derived from ``backbone.num_layers``).
        activation: MLP activation (``silu`` = SwiGLU, ``gelu_tanh`` = Gemma's GeGLU).
        norm: ``rms`` (LLaMA ``w * n``) or ``gemma`` (``(1 + w) * n``).
        norm_eps: RMSNorm epsilon (LLaMA-2 / Vicuna: 1e-5, Gemma: 1e-6).
        attention_bias: biases on the q/k/v/o projections.
        adarms: AdaRMS norms conditioned on the flow time (pi0.5); needs ``suffix.time_fusion: adarms``.
        share_base_weights: reuse the base's layer weights (the parameter-shared expert).
        layers / every_kth_layer / first_n_layers: the layer map (at most one; none = every layer).
    """
    given = {k: v for k, v in (("layers", layers), ("every_kth_layer", every_kth_layer), ("first_n_layers", first_n_layers)) if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one of layers / every_kth_layer / first_n_layers; got {sorted(given)}")
    layer_map = tuple(layers) if layers is not None else None
    if every_kth_layer is not None:
        layer_map = _every_kth(num_layers, every_kth_layer)
    if first_n_layers is not None:
        layer_map = _first_n(num_layers, first_n_layers)
    return ExpertSpec(
        name=name,
        width=width,
        mlp_dim=mlp_dim,
        head_space=head_space,
        layers=layer_map,
        act_layer=get_activation(activation),
        norm_eps=norm_eps,
        norm_unit_offset=norm == "gemma",
        adarms_cond_dim=width if adarms else None,
        attention_bias=attention_bias,
        share_base_weights=share_base_weights,
    )


def _register_all() -> None:
    table = {
        "vision": {"patch_vit": PatchViT, "convnet": ConvNet, "siglip": SiglipVision, "timm": TimmVision},
        "projector": {"linear": LinearProjector, "mlp2x_gelu": Mlp2xGeluProjector, "pixel_shuffle": PixelShuffleProjector},
        "geometry_encoding": {"llava3d": LLaVA3DPositionEncoding, "frequency": FrequencyPositionEncoding},
        "tokenizer": {"byte": ByteTokenizer, "hf": HFTokenizer},
        "backbone": {"deep_fusion": DeepFusionStack},
        "time_fusion": {"concat_mlp": ConcatMlpTimeFusion, "token": TimeTokenFusion, "adarms": AdaRMSTimeFusion},
        "time_sampler": {"beta": BetaTimeSampler, "uniform": UniformTimeSampler},
        "denoiser": {
            "deep_fusion": DeepFusionDenoiser,
            "layerwise_dit": LayerwiseDiTDenoiser,
            "last_layer_dit": LastLayerDiTDenoiser,
            "hybrid": HybridDenoiser,
        },
    }
    for family, entries in table.items():
        for name, fn in entries.items():
            REGISTRIES[family].register(name, fn)


_register_all()
