"""Load a transformers LLaMA / Mistral / Gemma decoder as the base expert of a DeepFusionStack.

The mapping is by key, layer by layer (transformers name -> vlablocks name):

    layers.{i}.input_layernorm.weight           -> layers.{i}.input_norms.0.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.*       -> layers.{i}.attention.experts.0.{q,k,v,o}_proj.*
    layers.{i}.post_attention_layernorm.weight  -> layers.{i}.post_attention_norms.0.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight   -> layers.{i}.mlps.0.{gate,up,down}_proj.weight
    norm.weight                                 -> final_norms.0.weight

Gemma's ``(1 + w)`` norm weights load unchanged into ``RMSNorm(unit_offset=True)``. The
token embedding is not part of the stack (text encoders own it) and is returned untouched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from vlablocks.blocks.attention import HeadSpace
from vlablocks.blocks.fusion import DeepFusionStack, ExpertSpec
from vlablocks.blocks.mlp import get_activation

logger = logging.getLogger(__name__)

#: transformers ``hidden_act`` names -> vlablocks activation names.
HIDDEN_ACTIVATIONS: dict[str, str] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

#: decoder families whose layers map one to one onto a DeepFusionBlock, and whether their
#: RMSNorm uses Gemma's ``(1 + w)`` convention.
SUPPORTED_MODEL_TYPES: dict[str, bool] = {"llama": False, "mistral": False, "gemma": True}

_LAYER_KEY = re.compile(
    r"^layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(weight|bias)$"
)
_RENAMES = {
    "input_layernorm": "input_norms.0",
    "post_attention_layernorm": "post_attention_norms.0",
    "self_attn.q_proj": "attention.experts.0.q_proj",
    "self_attn.k_proj": "attention.experts.0.k_proj",
    "self_attn.v_proj": "attention.experts.0.v_proj",
    "self_attn.o_proj": "attention.experts.0.o_proj",
    "mlp.gate_proj": "mlps.0.gate_proj",
    "mlp.up_proj": "mlps.0.up_proj",
    "mlp.down_proj": "mlps.0.down_proj",
}


def base_spec_from_config(config: Any, name: str = "base") -> tuple[ExpertSpec, int]:
    """The base :class:`ExpertSpec` and depth equivalent to a transformers decoder config.

    Args:
        config: a ``LlamaConfig``, ``MistralConfig`` or ``GemmaConfig`` (or their text configs).
        name: the expert's label.

    Returns:
        ``(spec, num_layers)``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported decoder model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    act = getattr(config, "hidden_act", "silu")
    if act not in HIDDEN_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(HIDDEN_ACTIVATIONS)}")
    if getattr(config, "sliding_window", None):
        logger.warning(
            "config.sliding_window=%s is ignored: vlablocks attends over the full sequence, which is "
            "identical as long as sequences are shorter than the window",
            config.sliding_window,
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is supported; config has rope_type {rope.get('rope_type')!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    head_space = HeadSpace(
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
    )
    spec = ExpertSpec(
        name=name,
        width=config.hidden_size,
        mlp_dim=config.intermediate_size,
        head_space=head_space,
        act_layer=get_activation(HIDDEN_ACTIVATIONS[act]),
        norm_eps=config.rms_norm_eps,
        norm_unit_offset=SUPPORTED_MODEL_TYPES[model_type],
        attention_bias=bool(getattr(config, "attention_bias", False)),
    )
    return spec, config.num_hidden_layers


def decoder_key(key: str, expert: int = 0) -> str | None:
    """The stack key of a transformers decoder key (prefix removed: ``layers.{i}.self_attn.q_proj.weight``,
    ``norm.weight``) for expert ``expert``; ``None`` for a key that is not a decoder layer or the
    final norm (the embedding, the LM head)."""
    match = _LAYER_KEY.match(key)
    if match:
        layer, module, kind = match.groups()
        return f"layers.{layer}.{_RENAMES[module].replace('.0', f'.{expert}', 1)}.{kind}"
    return f"final_norms.{expert}.weight" if key == "norm.weight" else None


def load_base_from_transformers(
    stack: DeepFusionStack,
    state_dict: Mapping[str, torch.Tensor],
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Copy a transformers decoder's weights into the stack's base expert (expert 0).

    Args:
        stack: the stack; its base spec must match the checkpoint's shapes
            (:func:`base_spec_from_config` builds one that does).
        state_dict: a ``LlamaModel``/``MistralModel``/``GemmaModel`` state dict, or a
            ``*ForCausalLM`` one (keys under ``model.``).
        prefix: key prefix of the decoder (``""`` or ``"model."``); ``None`` detects which.

    Returns:
        The entries that are not decoder layers (e.g. ``embed_tokens.weight``, ``lm_head.weight``),
        with the prefix stripped, for the caller to place.
    """
    if prefix is None:
        prefix = "model." if any(k.startswith("model.layers.") for k in state_dict) else ""
    mapped: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            rest[key] = tensor
            continue
        short = key[len(prefix) :]
        target = decoder_key(short)
        if target is not None:
            mapped[target] = tensor
        else:
            rest[short] = tensor

    own = stack.state_dict()
    base_keys = {k for k in own if _is_base_key(k)}
    missing = sorted(base_keys - mapped.keys())
    unexpected = sorted(mapped.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit the stack's base expert: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"(stack has {stack.num_layers} layers; checkpoint key prefix {prefix!r})"
        )
    for key, tensor in mapped.items():
        if own[key].shape != tensor.shape:
            raise ValueError(f"shape mismatch for {key}: stack {list(own[key].shape)}, checkpoint {list(tensor.shape)}")
    stack.load_state_dict(mapped, strict=False)
    return rest


def _is_base_key(key: str) -> bool:
    """True for the stack parameters that belong to expert 0."""
    return key == "final_norms.0.weight" or bool(
        re.match(r"^layers\.\d+\.(input_norms\.0|post_attention_norms\.0|attention\.experts\.0|mlps\.0)\.", key)
    )
