"""vlablocks.blocks: transformer parts that know nothing about robots.

Masks and positions (:mod:`.masks`), RoPE (:mod:`.rope`), norms (:mod:`.norms`), MLPs
(:mod:`.mlp`), multi-expert attention (:mod:`.attention`), the deep-fusion stack
(:mod:`.fusion`) and weight import from transformers decoders (:mod:`.transformers_import`).
"""

from vlablocks.blocks.attention import ATTENTION_BACKENDS, HeadSpace, MultiExpertAttention
from vlablocks.blocks.fusion import (
    DeepFusionBlock,
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
    "apply_rope",
    "as_additive_mask",
    "base_spec_from_config",
    "block_causal_mask",
    "every_kth_layer",
    "every_layer",
    "first_n_layers",
    "load_base_from_transformers",
    "positions_from_pad",
    "rope_cos_sin",
    "suffix_mask_and_positions",
]
