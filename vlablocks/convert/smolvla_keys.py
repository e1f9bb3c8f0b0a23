"""LeRobot SmolVLA (``SmolVLAPolicy``) -> a vlablocks VLA built from the ``smolvla`` recipe: the
declared key table (:func:`smolvla_key`) and the recipe overrides that size the recipe from the
policy's ``config.json`` and weights (:func:`smolvla_overrides`).

LeRobot's layout and where it goes::

    vlm_with_expert.vlm.model.vision_model.*          -> vision.model.*        (SigLIP-shaped tower)
    vlm_with_expert.vlm.model.connector.modality_projection.proj.weight
                                                       -> projector.proj.weight (pixel shuffle + Linear)
    vlm_with_expert.vlm.model.text_model.embed_tokens  -> text.embedding
    vlm_with_expert.vlm.model.text_model.layers.{i}.*  -> stack expert 0, layer i
    vlm_with_expert.lm_expert.layers.{j}.*             -> stack expert 1, base layer j * stride; at a
                                                          cross-attention layer its q/k/v/o are
                                                          ``cross_attention.0.*``
    state_proj / action_in_proj / action_out_proj / action_time_mlp_{in,out}
                                                       -> the prefix's state token / the suffix encoder

Every key is mapped or declared unused (:data:`UNUSED`); any other key is a KeyError naming it.
Which base layers cross-attend and where the expert's layers sit is a :class:`SmolVLALayout`
(LeRobot's defaults unless given; :func:`smolvla_layout` reads it from a policy).

LeRobot semantics the overrides encode (checked against LeRobot 0.6.1's code):

- RoPE base 10000 whatever the VLM's ``rope_theta`` (``smolvlm_with_expert.apply_rope`` hard-codes it);
- image resize with padding on the left and top, ``"\\n"`` after the task, eps 1e-8 normalisation;
- the expert shares the VLM's head space; its depth divides the VLM's (``num_expert_layers``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from vlablocks.blocks.transformers_import import decoder_key
from vlablocks.convert import common
from vlablocks.convert.common import POLICY_PREFIX, STACK, SUFFIX, count_layers, norm_mode, strip_prefix, tensor_shape

VLM = "vlm_with_expert.vlm.model."
VISION = VLM + "vision_model."
TEXT = VLM + "text_model."
EXPERT = "vlm_with_expert.lm_expert."

#: LeRobot keys (policy prefix removed) that have no vlablocks counterpart, and why.
UNUSED = {
    "vlm_with_expert.vlm.lm_head.weight": "SmolVLA never decodes text: the VLM's language-model head is not used",
}

#: one-to-one renames outside the decoders and the vision tower.
RENAMES = {
    TEXT + "embed_tokens.weight": "text.embedding.weight",
    VLM + "connector.modality_projection.proj.weight": "projector.proj.weight",
    **{f"state_proj.{kind}": f"state_proj.{kind}" for kind in ("weight", "bias")},
    **{f"{name}.{kind}": f"{SUFFIX}{name}.{kind}" for name in ("action_in_proj", "action_out_proj")
       for kind in ("weight", "bias")},
    **{f"action_time_mlp_{io}.{kind}": f"{SUFFIX}time_fusion.mlp.fc{n}.{kind}"
       for io, n in (("in", 1), ("out", 2)) for kind in ("weight", "bias")},
}

#: SmolVLM2's head width (SmolLM2 text models and the SigLIP-base vision tower of the 256M / 500M models).
HEAD_DIM = 64
#: RMSNorm epsilon of SmolVLM2's text model (``rms_norm_eps``).
RMS_NORM_EPS = 1e-5
#: LeRobot's RoPE base (``apply_rope(..., max_wavelength=10_000)``), whatever the VLM config says.
LEROBOT_ROPE_THETA = 10000.0

_EXPERT_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_ATTENTION = re.compile(r"^self_attn\.([qkvo]_proj)\.(weight|bias)$")


@dataclass(frozen=True)
class SmolVLALayout:
    """Where SmolVLA's expert layers sit (LeRobot's ``SmolVLMWithExpertModel``).

    Attributes:
        expert_stride: ``num_vlm_layers // num_expert_layers``: expert layer ``j`` runs beside
            VLM layer ``j * expert_stride`` (1: an expert layer at every VLM layer).
        cross_attention: ``"cross" in attention_mode``.
        self_attn_every_n_layers: with ``cross_attention``, VLM layers ``i`` with
            ``i % n == 0`` stay joint self-attention (``n <= 0``: every layer cross-attends).
    """

    expert_stride: int = 1
    cross_attention: bool = True
    self_attn_every_n_layers: int = 2

    def is_cross(self, layer: int) -> bool:
        """Whether VLM layer ``layer`` is a cross-attention layer."""
        n = self.self_attn_every_n_layers
        return self.cross_attention and not (n > 0 and layer % n == 0)

    def cross_attentioncount_layers(self, num_layers: int) -> list[int]:
        """The recipe's ``backbone.cross_attention_layers`` for a VLM of ``num_layers`` layers."""
        return [i for i in range(num_layers) if self.is_cross(i)]


def smolvla_key(key: str, layout: SmolVLALayout = SmolVLALayout()) -> str | None:
    """The vlablocks key of a LeRobot SmolVLA key (with or without the ``model.`` prefix);
    ``None`` for a key declared in :data:`UNUSED`. ``layout``: LeRobot's defaults unless given
    (:func:`smolvla_layout`).

    Raises:
        KeyError: a key the table does not know (naming it).
    """
    key = key.removeprefix(POLICY_PREFIX)
    known, target = common.common_key(key, UNUSED, RENAMES, VISION)
    if known:
        return target
    target = None
    if key.startswith(TEXT):
        target = decoder_key(key[len(TEXT):], 0)
    elif key.startswith(EXPERT):
        target = _expert_key(key[len(EXPERT):], layout)
    if target is not None:
        return STACK + target
    raise KeyError(f"LeRobot key {key!r} is neither mapped nor declared unused (vlablocks.convert.smolvla_keys)")


def _expert_key(short: str, layout: SmolVLALayout) -> str | None:
    """An ``lm_expert`` key: expert layer ``j`` -> base layer ``j * stride``; at a cross-attention
    layer the attention projections are the block's ``cross_attention.0``."""
    match = _EXPERT_LAYER.match(short)
    if match is None:
        return decoder_key(short, 1)  # norm.weight
    layer = int(match.group(1)) * layout.expert_stride
    attention = _ATTENTION.match(match.group(2))
    if attention is not None and layout.is_cross(layer):
        return f"layers.{layer}.cross_attention.0.{attention.group(1)}.{attention.group(2)}"
    return decoder_key(f"layers.{layer}.{match.group(2)}", 1)


def map_keys(keys: Iterable[str], layout: SmolVLALayout = SmolVLALayout()) -> tuple[dict[str, str], list[str]]:
    """``(LeRobot key -> vlablocks key, the keys declared unused)`` (KeyError for an unknown key)."""
    return common.map_keys(keys, partial(smolvla_key, layout=layout))


def check_shapes(lerobot: Mapping[str, Sequence[int]], vlablocks: Mapping[str, Sequence[int]],
                 layout: SmolVLALayout = SmolVLALayout()) -> list[str]:
    """:func:`vlablocks.convert.common.check_shapes` with the SmolVLA table of ``layout``."""
    return common.check_shapes(lerobot, vlablocks, partial(smolvla_key, layout=layout))


# ------------------------------------------------------------------------------- sizes








def smolvla_layout(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> SmolVLALayout:
    """The :class:`SmolVLALayout` of a policy from its ``config.json`` and weights' shapes.

    Raises:
        ValueError: the expert's depth does not divide the VLM's, or the expert's ``k_proj``
            shapes disagree with the cross-attention layers the config names.
    """
    shapes = strip_prefix(shapes)
    vlm_layers, expert_layers = count_layers(shapes, TEXT + "layers."), count_layers(shapes, EXPERT + "layers.")
    if vlm_layers % expert_layers:
        raise ValueError(f"the expert's {expert_layers} layers must divide the VLM's {vlm_layers} (num_expert_layers)")
    layout = SmolVLALayout(vlm_layers // expert_layers, "cross" in str(config.get("attention_mode", "cross_attn")),
                           int(config.get("self_attn_every_n_layers", 2)))
    kv_dim = tensor_shape(shapes, TEXT + "layers.0.self_attn.k_proj.weight")[0]
    width = tensor_shape(shapes, EXPERT + "layers.0.self_attn.q_proj.weight")[1]
    for j in range(expert_layers):
        found = tensor_shape(shapes, f"{EXPERT}layers.{j}.self_attn.k_proj.weight")[1]
        expected = kv_dim if layout.is_cross(j * layout.expert_stride) else width
        if found != expected:
            raise ValueError(
                f"expert layer {j} (VLM layer {j * layout.expert_stride}) has k_proj input width {found}, but "
                f"attention_mode={config.get('attention_mode')!r}, self_attn_every_n_layers="
                f"{config.get('self_attn_every_n_layers')} make it a "
                f"{'cross' if layout.is_cross(j * layout.expert_stride) else 'self'}-attention layer (input {expected})")
    return layout




def _heads(width: int, given: int | None, known: Mapping[str, Any], name: str, what: str) -> int:
    """Heads of a ``width``-wide projection: ``given``, else ``known[name]``, else ``width / HEAD_DIM``."""
    if given is None and name not in known:
        if width % HEAD_DIM:
            raise ValueError(f"{what}: width {width} is not a multiple of SmolVLM2's head width {HEAD_DIM}; "
                             "pass the head counts (or vlm_config)")
        return width // HEAD_DIM
    heads = int(given if given is not None else known[name])
    if heads < 1 or width % heads:
        raise ValueError(f"{what}: width {width} does not split into {heads} heads")
    return heads


def _check_supported(config: Mapping[str, Any]) -> None:
    """ValueError for the SmolVLA options vlablocks does not reproduce."""
    unsupported = {"add_image_special_tokens": False, "adapt_to_pi_aloha": False, "use_delta_joint_actions_aloha": False}
    bad = {k: config[k] for k, ok in unsupported.items() if config.get(k, ok) != ok}
    if bad:
        raise ValueError(f"config.json: SmolVLA options vlablocks does not reproduce: {bad} (expected false)")
    norm_mode(config, "STATE"), norm_mode(config, "ACTION")
    if (config.get("normalization_mapping") or {}).get("VISUAL", "IDENTITY") != "IDENTITY":
        raise ValueError("config.json: normalization_mapping.VISUAL must be IDENTITY (images reach SigLIP as 2x - 1)")


def _head_space(shapes: Mapping[str, list[int]], known: Mapping[str, Any], num_heads: int | None,
                num_kv_heads: int | None) -> str:
    """The shared head space (a YAML flow mapping) from the VLM's q/k shapes and the head counts."""
    q_dim = tensor_shape(shapes, TEXT + "layers.0.self_attn.q_proj.weight")[0]
    kv_dim = tensor_shape(shapes, TEXT + "layers.0.self_attn.k_proj.weight")[0]
    heads = _heads(q_dim, num_heads, known, "num_attention_heads", "the VLM's queries")
    head_dim = q_dim // heads
    kv_heads = int(num_kv_heads if num_kv_heads is not None else known.get("num_key_value_heads", kv_dim // head_dim))
    if kv_heads * head_dim != kv_dim:
        raise ValueError(f"the VLM's k_proj has {kv_dim} rows: not {kv_heads} key/value heads of width {head_dim} "
                         f"({heads} query heads); pass num_heads / num_kv_heads (or vlm_config)")
    expert_q = tensor_shape(shapes, EXPERT + "layers.0.self_attn.q_proj.weight")[0]
    if expert_q != q_dim:
        raise ValueError(f"the expert's queries ({expert_q}) must have the VLM's width ({q_dim}): they attend jointly")
    return _flow_mapping({"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
                          "rope_theta": LEROBOT_ROPE_THETA})


def _vision(shapes: Mapping[str, list[int]], resize: Sequence[int] | None, known: Mapping[str, Any],
            num_heads: int | None) -> tuple[dict[str, Any], int]:
    """``(vision.config, the pixel-shuffle factor)`` from the vision tower's and connector's shapes."""
    patch = tensor_shape(shapes, VISION + "embeddings.patch_embedding.weight")
    width, patch_size = patch[0], patch[-1]
    image_size = math.isqrt(tensor_shape(shapes, VISION + "embeddings.position_embedding.weight")[0]) * patch_size
    shuffle = math.isqrt(tensor_shape(shapes, VLM + "connector.modality_projection.proj.weight")[1] // width)
    if resize is not None and list(resize) != [image_size, image_size]:
        raise ValueError(f"config.json: resize_imgs_with_padding={list(resize)}, but the vision tower takes "
                         f"{image_size}x{image_size} images")
    vision = {
        "hidden_size": width, "patch_size": patch_size, "image_size": image_size,
        "num_hidden_layers": count_layers(shapes, VISION + "encoder.layers."),
        "intermediate_size": tensor_shape(shapes, VISION + "encoder.layers.0.mlp.fc1.weight")[0],
        "num_attention_heads": _heads(width, num_heads, known, "num_attention_heads", "the vision tower"),
    }
    if "layer_norm_eps" in known:  # else SigLIP's default, 1e-6, which is SmolVLM's
        vision["layer_norm_eps"] = float(known["layer_norm_eps"])
    return vision, shuffle


def _check_config_sizes(config: Mapping[str, Any], shapes: Mapping[str, list[int]], vlm_layers: int) -> None:
    """ValueError where ``config.json`` and the weights disagree on a size."""
    if config.get("num_vlm_layers", -1) > 0 and config["num_vlm_layers"] != vlm_layers:
        raise ValueError(f"config.json: num_vlm_layers={config['num_vlm_layers']} but the weights hold {vlm_layers} VLM layers")
    for name, dim in (("max_state_dim", tensor_shape(shapes, "state_proj.weight")[1]),
                      ("max_action_dim", tensor_shape(shapes, "action_in_proj.weight")[1])):
        if config.get(name, dim) != dim:
            raise ValueError(f"config.json: {name}={config[name]} but the weights take {dim}")


def smolvla_overrides(
    config: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    vision_num_heads: int | None = None,
    vlm_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Overrides (``"key.path=value"``) of the bundled ``smolvla`` recipe that make it the policy
    of ``config`` (LeRobot's ``config.json``) and ``shapes`` (its weights' shapes, keys with or
    without ``model.``); the tokenizer's type and path are the caller's (``text.tokenizer``).

    Widths, depths, MLP sizes, vocabulary, the vision tower, the pixel-shuffle factor, the
    expert's layer map and the cross-attention layers come from the shapes (checked against the
    config); chunk, padded widths, steps, tokenizer length, normalisation and the time
    sinusoid's periods from the config. Head counts, which shapes cannot give: the arguments,
    else ``vlm_config`` (the VLM's own config.json, ``text_config`` / ``vision_config``), else
    SmolVLM2's head width of 64 (SmolVLM2-500M: 15 heads, 5 key/value heads; vision 12).

    Raises:
        ValueError: an option vlablocks does not reproduce, or shapes that disagree with the config.
    """
    _check_supported(config)
    layout = smolvla_layout(config, shapes)
    shapes = strip_prefix(shapes)
    text_known = dict((vlm_config or {}).get("text_config") or {})
    embedding = TEXT + "embed_tokens.weight" if TEXT + "embed_tokens.weight" in shapes else "vlm_with_expert.vlm.lm_head.weight"
    vocab, width = tensor_shape(shapes, embedding)
    expert_width = tensor_shape(shapes, EXPERT + "layers.0.self_attn.q_proj.weight")[1]
    vlm_layers = count_layers(shapes, TEXT + "layers.")
    _check_config_sizes(config, shapes, vlm_layers)
    resize = config.get("resize_imgs_with_padding")
    vision, shuffle = _vision(shapes, resize, dict((vlm_config or {}).get("vision_config") or {}), vision_num_heads)
    head_space = _head_space(shapes, text_known, num_heads, num_kv_heads)
    eps = text_known.get("rms_norm_eps", RMS_NORM_EPS)
    overrides = [
        f"policy.horizon={config['chunk_size']}",
        f"policy.action_dim={tensor_shape(shapes, 'action_in_proj.weight')[1]}",
        f"policy.state_dim={tensor_shape(shapes, 'state_proj.weight')[1]}",
        f"policy.state_norm={norm_mode(config, 'STATE')}",
        f"policy.action_norm={norm_mode(config, 'ACTION')}",
        f"policy.resize_images={'none' if resize is None else 'pad_top_left'}",
        "policy.task_newline=true",
        "policy.norm_convention=lerobot",
        f"head.num_steps={config.get('num_steps', 10)}",
        f"text.vocab_size={vocab}",
        f"text.tokenizer.max_length={config.get('tokenizer_max_length', 48)}",
        f"vision.config={_flow_mapping(vision)}",
        f"projector.scale_factor={shuffle}",
        f"backbone.num_layers={vlm_layers}",
        f"backbone.cross_attention_layers={layout.cross_attentioncount_layers(vlm_layers)}",
        f"backbone.experts.0.width={width}",
        f"backbone.experts.0.mlp_dim={tensor_shape(shapes, TEXT + 'layers.0.mlp.gate_proj.weight')[0]}",
        f"backbone.experts.0.head_space={head_space}",
        f"backbone.experts.0.norm_eps={eps}",
        f"backbone.experts.1.width={expert_width}",
        f"backbone.experts.1.mlp_dim={tensor_shape(shapes, EXPERT + 'layers.0.mlp.gate_proj.weight')[0]}",
        f"backbone.experts.1.head_space={head_space}",
        f"backbone.experts.1.norm_eps={eps}",
        f"suffix.time_fusion.min_period={config.get('min_period', 4e-3)}",
        f"suffix.time_fusion.max_period={config.get('max_period', 4.0)}",
    ]
    if layout.expert_stride > 1:
        overrides.append(f"backbone.experts.1.every_kth_layer={layout.expert_stride}")
    return overrides


def _flow_mapping(values: Mapping[str, Any]) -> str:
    """A YAML flow mapping whose floats keep their dot (``1.0e-06``: YAML 1.1 reads ``1e-06`` as a string)."""
    def text(value: Any) -> str:
        if isinstance(value, float):
            mantissa, _, exponent = repr(value).partition("e")
            return mantissa + ("" if "." in mantissa else ".0") + (f"e{exponent}" if exponent else "")
        return json.dumps(value)
    return "{" + ", ".join(f"{key}: {text(value)}" for key, value in values.items()) + "}"


def smolvla_tokenizer(config: Mapping[str, Any]) -> str:
    """The tokenizer SmolVLA's processor loads: the VLM's (``vlm_model_name``)."""
    return str(config.get("vlm_model_name", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"))
