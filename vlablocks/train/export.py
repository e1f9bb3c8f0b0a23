"""``vlablocks export``: a run's policy as a plain vlablocks checkpoint, LoRA adapters merged.

:func:`merged_policy` loads a run (its latest checkpoint) or a checkpoint directory (EMA weights
when present), merges peft adapters into the base weights (:func:`~vlablocks.recipes.lora.merge_lora`)
and drops the fine-tuning settings from its recipe; :func:`write_export` writes any
:class:`~vlablocks.policy.vla.VLA` as ``VLA.save_pretrained`` does (``model.safetensors``,
``recipe.yaml``, ``manifest.json``) plus ``export.json`` (where it came from), which marks a
directory this command may replace. Other layouts (LeRobot's) take the same merged policy.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from vlablocks.io.atomic import write_json
from vlablocks.io.manifest import write_manifest
from vlablocks.policy.vla import VLA
from vlablocks.recipes.lora import has_lora, merge_lora
from vlablocks.train.checkpoint import load_policy, staged_directory

logger = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
#: ``train:`` keys that describe how a run trained the policy, not the policy itself.
FINETUNE_KEYS = ("finetune", "lora")


def plain_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` without the fine-tuning settings (``train.finetune``, ``train.lora``; an empty
    ``train`` section dropped)."""
    recipe = copy.deepcopy(recipe)
    train = recipe.get("train")
    if isinstance(train, dict):
        for key in FINETUNE_KEYS:
            train.pop(key, None)
        if not train:
            recipe.pop("train")
    return recipe


def merged_policy(checkpoint: str | Path, use_ema: bool = True, verify: bool = True) -> tuple[VLA, Path]:
    """``(policy, checkpoint directory)``: the checkpoint's policy with its adapters merged and a
    plain recipe (``use_ema``: the EMA weights when the checkpoint has them)."""
    vla, source = load_policy(checkpoint, use_ema=use_ema, verify=verify)
    if has_lora(vla):
        merge_lora(vla)
    vla.recipe = plain_recipe(vla.recipe)
    return vla, source


def check_export_target(out: str | Path) -> Path:
    """``out`` as a path, after checking that an export may be written there.

    Raises:
        FileExistsError: ``out`` exists and is neither empty nor an earlier export (``export.json``).
    """
    out = Path(out)
    if out.exists() and not (out.is_dir() and ((out / EXPORT_FILE).is_file() or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and was not written by vlablocks export; expected a new or empty directory "
                              "(or an earlier export, which is replaced)")
    return out


def write_export(vla: VLA, out: str | Path, source: Path | None = None) -> Path:
    """Write ``vla`` as a plain vlablocks checkpoint into ``out`` (staged, then renamed into place).

    Raises:
        FileExistsError: ``out`` exists and is neither empty nor an earlier export (``export.json``).
    """
    out = check_export_target(out)
    if has_lora(vla):
        raise ValueError("the policy still holds LoRA adapters; expected a merged policy (merge_lora)")
    with staged_directory(out) as tmp:
        vla.save_pretrained(tmp, manifest=False)
        write_json(tmp / EXPORT_FILE, {"producer": "vlablocks export", "source": None if source is None else str(source.resolve())})
        write_manifest(tmp)
    logger.info("exported %s to %s", source, out)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, use_ema: bool = True, verify: bool = True) -> Path:
    """:func:`merged_policy` of ``checkpoint`` written by :func:`write_export` into ``out`` (checked first)."""
    check_export_target(out)
    vla, source = merged_policy(checkpoint, use_ema=use_ema, verify=verify)
    return write_export(vla, out, source)
