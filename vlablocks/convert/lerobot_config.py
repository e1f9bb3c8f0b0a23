"""Recipes for LeRobot policies: which bundled recipe a policy type starts from, and the
overrides that make it the policy a LeRobot directory holds.

Sizes come from the weights' shapes (LeRobot's ``config.json`` names variants such as
``gemma_2b`` whose sizes live in LeRobot's code, and checkpoints built at other sizes carry none);
chunk, steps, features, normalisation and the tokenizer's length come from ``config.json``.
Numbers neither can give (attention head counts) are LeRobot's constants, which a caller's
overrides replace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vlablocks.convert import lerobot_keys, smolvla_keys
from vlablocks.convert.common import ConversionError, KeyTable, count_layers, norm_mode, tensor_shape

Shapes = Mapping[str, Sequence[int]]

#: pi0 / pi0.5 run 8 query heads (``compute_layer_complete`` reshapes to ``8 * head_dim``).
PI0_HEADS = 8
#: SigLIP so400m's heads (LeRobot builds PaliGemma's default vision config).
PI0_VISION_HEADS = 16




@dataclass(frozen=True)
class Family:
    """How one LeRobot policy type converts.

    Attributes:
        recipe: the bundled recipe it starts from.
        keys: ``(config, shapes) ->`` the key table of that policy: LeRobot key -> vlablocks
            key (``None``: declared unused; KeyError: unknown).
        overrides: ``(config, shapes, vlm_config) -> recipe overrides``; ``vlm_config`` is the
            VLM's own ``config.json`` when the tokenizer's repository has one (head counts).
        tokenizer: ``config -> the Hub id of the tokenizer the policy was trained with``.
        tied: vlablocks key -> the LeRobot key that fills it when its own key is absent (a
            token embedding tied to the language-model head).
    """

    recipe: str
    keys: Callable[[Mapping[str, Any], Shapes], KeyTable]
    overrides: Callable[[Mapping[str, Any], Shapes, Mapping[str, Any] | None], list[str]]
    tokenizer: Callable[[Mapping[str, Any]], str]
    tied: Mapping[str, str] = field(default_factory=dict)








def _common(config: Mapping[str, Any]) -> list[str]:
    """Overrides every flow-matching LeRobot policy shares (chunk, padded widths, steps, norms)."""
    return [
        f"policy.horizon={config['chunk_size']}",
        f"policy.action_dim={config['max_action_dim']}",
        f"policy.action_norm={norm_mode(config, 'ACTION')}",
        f"policy.state_norm={norm_mode(config, 'STATE')}",
        "policy.norm_convention=lerobot",
        f"head.num_steps={config['num_inference_steps' if 'num_inference_steps' in config else 'num_steps']}",
    ]


def pi0_overrides(config: Mapping[str, Any], shapes: Shapes, vlm_config: Mapping[str, Any] | None = None) -> list[str]:
    """Overrides of the ``pi0`` / ``pi05`` recipe for a LeRobot ``PI0Policy`` / ``PI05Policy``
    (LeRobot builds PaliGemma's sizes itself: ``vlm_config`` is not read)."""
    shapes = {k.removeprefix(lerobot_keys.POLICY_PREFIX): v for k, v in shapes.items()}
    language, expert, vision = lerobot_keys.LANGUAGE, lerobot_keys.EXPERT, lerobot_keys.VISION
    candidates = (language + "embed_tokens.weight", lerobot_keys.TIED["text.embedding.weight"])
    embedding = next((k for k in candidates if k in shapes), None)
    if embedding is None:
        raise ConversionError(f"model.safetensors: missing the token embedding: neither {candidates[0]!r} nor the tied "
                              f"{candidates[1]!r} is there (the policy's language conditioning would be random)")
    vocab, width = tensor_shape(shapes, embedding)
    q_rows = tensor_shape(shapes, language + "layers.0.self_attn.q_proj.weight")[0]
    head_dim = q_rows // PI0_HEADS
    kv_heads = tensor_shape(shapes, language + "layers.0.self_attn.k_proj.weight")[0] // head_dim
    mlp_vlm = tensor_shape(shapes, language + "layers.0.mlp.gate_proj.weight")[0]
    mlp_expert, width_expert = tensor_shape(shapes, expert + "layers.0.mlp.gate_proj.weight")
    patch = tensor_shape(shapes, vision + "embeddings.patch_embedding.weight")
    positions = tensor_shape(shapes, vision + "embeddings.position_embedding.weight")[0]
    hidden = patch[0]
    if hidden % PI0_VISION_HEADS:
        raise ConversionError(f"SigLIP width {hidden} is not a multiple of LeRobot's {PI0_VISION_HEADS} heads: "
                              "give vision.config.num_attention_heads=N")
    head_space = f"{{num_heads: {PI0_HEADS}, num_kv_heads: {kv_heads}, head_dim: {head_dim}, rope_theta: 10000.0}}"
    overrides = _common(config) + [
        "policy.resize_images=pad_center",
        f"text.vocab_size={vocab}",
        f"text.tokenizer.max_length={config['tokenizer_max_length']}",
        f"backbone.num_layers={count_layers(shapes, language + 'layers.')}",
        f"backbone.experts.0.width={width}", f"backbone.experts.0.mlp_dim={mlp_vlm}",
        f"backbone.experts.0.head_space={head_space}",
        f"backbone.experts.1.width={width_expert}", f"backbone.experts.1.mlp_dim={mlp_expert}",
        f"backbone.experts.1.head_space={head_space}",
        f"vision.config.hidden_size={hidden}",
        f"vision.config.patch_size={patch[-1]}",
        f"vision.config.image_size={math.isqrt(positions) * patch[-1]}",
        f"vision.config.num_hidden_layers={count_layers(shapes, vision + 'encoder.layers.')}",
        f"vision.config.intermediate_size={tensor_shape(shapes, vision + 'encoder.layers.0.mlp.fc1.weight')[0]}",
        f"vision.config.num_attention_heads={PI0_VISION_HEADS}",
        f"suffix.time_fusion.min_period={config.get('min_period', 4e-3)}",
        f"suffix.time_fusion.max_period={config.get('max_period', 4.0)}",
    ]
    if config["type"] == "pi0":
        overrides += [f"policy.state_dim={config['max_state_dim']}", "policy.task_newline=true"]
    else:  # pi0.5: the state is binned into the prompt; LeRobot pads it to max_state_dim before normalising
        overrides += [f"policy.state_dim={config['max_state_dim']}"]
    return overrides


def _pi0_tokenizer(config: Mapping[str, Any]) -> str:
    return "google/paligemma-3b-pt-224"  # LeRobot's pi0 / pi0.5 processors hard-code it


def _pi0_keys(config: Mapping[str, Any], shapes: Shapes) -> KeyTable:
    return lerobot_keys.pi0_key


def _smolvla_keys(config: Mapping[str, Any], shapes: Shapes) -> KeyTable:
    return partial(smolvla_keys.smolvla_key, layout=smolvla_keys.smolvla_layout(config, shapes))


def _smolvla_overrides(config: Mapping[str, Any], shapes: Shapes, vlm_config: Mapping[str, Any] | None) -> list[str]:
    return smolvla_keys.smolvla_overrides(config, shapes, vlm_config=vlm_config)


#: LeRobot policy types (``config.json`` ``type``) -> how they convert.
FAMILIES: dict[str, Family] = {
    "pi0": Family("pi0", _pi0_keys, pi0_overrides, _pi0_tokenizer, lerobot_keys.TIED),
    "pi05": Family("pi05", _pi0_keys, pi0_overrides, _pi0_tokenizer, lerobot_keys.TIED),
    "smolvla": Family("smolvla", _smolvla_keys, _smolvla_overrides, smolvla_keys.smolvla_tokenizer),
}


def family(config: Mapping[str, Any], source: str) -> Family:
    """The :class:`Family` of a policy's ``config.json`` (ConversionError naming the type otherwise)."""
    kind = config.get("type")
    if kind not in FAMILIES:
        raise ConversionError(f"{source}: type: expected one of {sorted(FAMILIES)}; got {kind!r}")
    return FAMILIES[kind]
