"""vlablocks.blocks: transformer parts that know nothing about robots.

Masks and positions (:mod:`.masks`), RoPE (:mod:`.rope`), norms (:mod:`.norms`), MLPs
(:mod:`.mlp`), multi-expert attention (:mod:`.attention`), per-layer masks and RoPE tables
precomputed once per token layout (:mod:`.attention_layout`), expert specs and layer maps
(:mod:`.experts`), the deep-fusion stack (:mod:`.fusion`), int8 linears for CPU inference
(:mod:`.quantized`), the device context for parameter
creation (:mod:`.device`) and weight import from transformers decoders (:mod:`.transformers_import`).
"""

from vlablocks.blocks.attention import ATTENTION_BACKENDS, HeadSpace, MultiExpertAttention
from vlablocks.blocks.attention_layout import AttentionLayout, RopeTables, attention_dtype, attention_layout
from vlablocks.blocks.device import device_context
from vlablocks.blocks.fusion_layers import DeepFusionBlock
from vlablocks.blocks.fusion import (
    DeepFusionStack,
    ExpertSpec,
    FusionOutput,
    PrefixCache,
    every_kth_layer,
    every_layer,
    first_n_layers,
)
from vlablocks.blocks.masks import as_additive_mask, block_causal_mask, positions_from_pad, suffix_mask_and_positions
from vlablocks.blocks.mlp import GatedMlp, GeluTanh, Mlp
from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm
from vlablocks.blocks.rope import apply_rope, rope_cos_sin
from vlablocks.blocks.transformers_import import base_spec_from_config, load_base_from_transformers

__all__ = [
    "ATTENTION_BACKENDS",
    "AdaRMSNorm",
    "AttentionLayout",
    "DeepFusionBlock",
    "DeepFusionStack",
    "ExpertSpec",
    "FusionOutput",
    "GatedMlp",
    "GeluTanh",
    "HeadSpace",
    "Mlp",
    "MultiExpertAttention",
    "PrefixCache",
    "RMSNorm",
    "RopeTables",
    "apply_rope",
    "as_additive_mask",
    "attention_dtype",
    "attention_layout",
    "base_spec_from_config",
    "block_causal_mask",
    "device_context",
    "every_kth_layer",
    "every_layer",
    "first_n_layers",
    "load_base_from_transformers",
    "positions_from_pad",
    "rope_cos_sin",
    "suffix_mask_and_positions",
]
