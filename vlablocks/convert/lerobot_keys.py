"""Declared key tables from LeRobot's pi0 / pi0.5 policies (``PI0Policy`` / ``PI05Policy``
``state_dict()``) to a vlablocks VLA built from the ``pi0`` / ``pi05`` recipes.

Every LeRobot key is mapped or declared unused (:data:`UNUSED`, with the reason); any other key is
an error, so nothing is dropped silently. The VLM's decoder layers go to expert 0 of the fusion
stack, the action expert's to expert 1 (:func:`~vlablocks.blocks.transformers_import.decoder_key`);
pi0.5's adaptive norms (``*.dense``) are the expert's ``modulation`` layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vlablocks.blocks.transformers_import import decoder_key
from vlablocks.convert import common
from vlablocks.convert.common import POLICY_PREFIX, STACK, SUFFIX

PALIGEMMA = "paligemma_with_expert.paligemma.model."
LANGUAGE = PALIGEMMA + "language_model."
VISION = PALIGEMMA + "vision_tower.vision_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."

#: LeRobot keys (policy prefix removed) that have no vlablocks counterpart, and why.
UNUSED = {
    "paligemma_with_expert.paligemma.lm_head.weight":
        "tied to the token embedding (it becomes text.embedding.weight where embed_tokens is absent)",
    "paligemma_with_expert.gemma_expert.lm_head.weight": "the action expert has no language-model head",
}

#: a vlablocks key -> the LeRobot key (prefix removed) that fills it when its own key is absent:
#: released pi0 checkpoints keep the token embedding only as the tied ``lm_head``.
TIED = {"text.embedding.weight": "paligemma_with_expert.paligemma.lm_head.weight"}

#: one-to-one renames outside the decoders.
RENAMES = {
    LANGUAGE + "embed_tokens.weight": "text.embedding.weight",
    PALIGEMMA + "multi_modal_projector.linear.weight": "projector.weight",
    PALIGEMMA + "multi_modal_projector.linear.bias": "projector.bias",
    **{f"{name}.{kind}": f"{SUFFIX}{name}.{kind}" for name in ("action_in_proj", "action_out_proj", "state_proj")
       for kind in ("weight", "bias")},
    **{f"action_time_mlp_{io}.{kind}": f"{SUFFIX}time_fusion.mlp.fc{n}.{kind}"  # pi0: MLP([action; time])
       for io, n in (("in", 1), ("out", 2)) for kind in ("weight", "bias")},
    **{f"time_mlp_{io}.{kind}": f"{SUFFIX}time_fusion.embedder.mlp.fc{n}.{kind}"  # pi0.5: adaRMS conditioning
       for io, n in (("in", 1), ("out", 2)) for kind in ("weight", "bias")},
}

_ADAPTIVE = {"input_layernorm": "input_norms", "post_attention_layernorm": "post_attention_norms"}


def pi0_key(key: str) -> str | None:
    """The vlablocks key of a LeRobot pi0 / pi0.5 key (with or without the ``model.`` prefix);
    ``None`` for a key declared in :data:`UNUSED`.

    Raises:
        KeyError: a key the table does not know (naming it).
    """
    key = key.removeprefix(POLICY_PREFIX)
    known, target = common.common_key(key, UNUSED, RENAMES, VISION)
    if known:
        return target
    for prefix, expert in ((LANGUAGE, 0), (EXPERT, 1)):
        if key.startswith(prefix):
            short = key[len(prefix):]
            target = decoder_key(short, expert) or _adaptive_norm(short, expert)
            if target is not None:
                return STACK + target
    raise KeyError(f"LeRobot key {key!r} is neither mapped nor declared unused (vlablocks.convert.lerobot_keys)")


def _adaptive_norm(short: str, expert: int) -> str | None:
    """pi0.5's adaRMS norms: ``layers.{i}.input_layernorm.dense.*`` / ``norm.dense.*`` -> the
    expert's ``modulation`` layer."""
    parts = short.split(".")
    if len(parts) == 5 and parts[0] == "layers" and parts[2] in _ADAPTIVE and parts[3] == "dense":
        return f"layers.{parts[1]}.{_ADAPTIVE[parts[2]]}.{expert}.modulation.{parts[4]}"
    if len(parts) == 3 and parts[:2] == ["norm", "dense"]:
        return f"final_norms.{expert}.modulation.{parts[2]}"
    return None


def map_keys(keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """``(LeRobot key -> vlablocks key, the keys declared unused)`` of pi0 / pi0.5 keys."""
    return common.map_keys(keys, pi0_key)


def check_shapes(lerobot: Mapping[str, list[int]], vlablocks: Mapping[str, list[int]]) -> list[str]:
    """:func:`vlablocks.convert.common.check_shapes` with the pi0 / pi0.5 table."""
    return common.check_shapes(lerobot, vlablocks, pi0_key)
