"""Write a policy converted from LeRobot (and perhaps fine-tuned here) back in LeRobot's layout,
so that LeRobot's ``PI0Policy`` / ``PI05Policy`` / ``SmolVLAPolicy.from_pretrained`` and its
processors load it.

The converted directory's ``lerobot/`` folder holds the source's ``config.json``, processor
descriptions and normaliser files, and ``conversion.json`` its key list: every LeRobot key is
written from the vlablocks tensor the key table maps it to; a key tied to another (pi0's
``lm_head``) gets that tensor; a key declared unused (the action expert's ``lm_head``) is written
as zeros of its shape, since LeRobot never computes with it. The normaliser files keep every
statistic of the source, with ``mean`` / ``std`` / ``q01`` / ``q99`` of the state and action
replaced by the policy's own (a fine-tune on other data changes them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlablocks.convert.lerobot import (
    CONFIG_FILE, CONVERSION_FILE, FEATURES, POSTPROCESSOR_FILE, PREPROCESSOR_FILE, SOURCE_DIR, WEIGHTS_FILE,
    ConversionError, check_new_directory, processor_state_files,
)
from vlablocks.convert.lerobot_config import family
from vlablocks.io.atomic import atomic_path, write_text
from vlablocks.io.manifest import read_safetensors
from vlablocks.policy.vla import VLA
from vlablocks.train.checkpoint import CHECKPOINTS_DIR
from vlablocks.train.workflow import DATA_INFO_FILE

logger = logging.getLogger(__name__)

#: the statistics the policy's normalisers hold (the others stay as the source had them).
POLICY_STATS = ("mean", "std", "q01", "q99")


def converted_source(checkpoint: str | Path) -> Path:
    """The directory :func:`~vlablocks.convert.lerobot.convert_lerobot` wrote that ``checkpoint``
    descends from: the checkpoint itself, or the ``init`` of the run it belongs to (``data.json``).

    Raises:
        ConversionError: neither holds the ``lerobot/`` folder of a conversion.
    """
    checkpoint = Path(checkpoint)
    candidates = [checkpoint]
    run = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint
    if (run / DATA_INFO_FILE).is_file():
        init = json.loads((run / DATA_INFO_FILE).read_text(encoding="utf-8")).get("init")
        candidates += [Path(init)] if init else []
    for candidate in candidates:
        if (candidate / SOURCE_DIR / CONFIG_FILE).is_file() and (candidate / CONVERSION_FILE).is_file():
            return candidate
    raise ConversionError(f"{checkpoint}: neither it nor the run's init directory was converted from LeRobot (no "
                          f"{SOURCE_DIR}/{CONFIG_FILE}); give the converted directory: --lerobot DIR")


def lerobot_state_dict(vla: VLA, converted: str | Path) -> dict[str, torch.Tensor]:
    """``vla``'s weights under the LeRobot keys recorded when ``converted`` was converted."""
    converted = Path(converted)
    if not (converted / CONVERSION_FILE).is_file() or not (converted / SOURCE_DIR / CONFIG_FILE).is_file():
        raise ConversionError(f"{converted}: not a policy converted from LeRobot (no {CONVERSION_FILE} and "
                              f"{SOURCE_DIR}/{CONFIG_FILE}); only such policies export to LeRobot's layout")
    config = json.loads((converted / SOURCE_DIR / CONFIG_FILE).read_text(encoding="utf-8"))
    shapes = json.loads((converted / CONVERSION_FILE).read_text(encoding="utf-8"))["lerobot_keys"]
    spec = family(config, str(converted / SOURCE_DIR / CONFIG_FILE))
    table = spec.keys(config, shapes)
    tied = {lerobot: ours for ours, lerobot in spec.tied.items()}
    own = vla.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        target = table(key)
        bare = key.removeprefix("model.")
        if target is None and bare in tied:  # a copy: safetensors refuses two keys sharing memory
            out[key] = own[tied[bare]].detach().cpu().clone()
            continue
        if target is None:
            out[key] = torch.zeros(shape, dtype=own["text.embedding.weight"].dtype)
            logger.info("%s is declared unused: written as zeros", key)
            continue
        if target not in own or list(own[target].shape) != list(shape):
            got = list(own[target].shape) if target in own else "absent"
            raise ConversionError(f"{key}: expected {target} of shape {list(shape)} in the policy; got {got} (was the "
                                  "policy's recipe changed after conversion?)")
        out[key] = own[target].detach().contiguous().cpu()
    return out


def _with_widths(node: Any, widths: dict[str, int]) -> Any:
    """A copy of a LeRobot JSON description with the ``shape`` of the state and action features
    set to the policy's data widths (a fine-tune on another robot changes them)."""
    if isinstance(node, list):
        return [_with_widths(item, widths) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: _with_widths(value, widths) for key, value in node.items()}
    for key in ("features", "input_features", "output_features"):
        for feature, width in widths.items():
            if isinstance(copy.get(key), dict) and isinstance(copy[key].get(feature), dict) and "shape" in copy[key][feature]:
                copy[key][feature] = {**copy[key][feature], "shape": [width]}
    return copy


def export_lerobot(vla: VLA, converted: str | Path, out: str | Path) -> Path:
    """Write ``vla`` into ``out`` (new or empty) as a LeRobot policy directory: ``config.json``,
    ``model.safetensors``, the processor descriptions and their normaliser files, taken from
    ``converted`` (the directory :func:`~vlablocks.convert.lerobot.convert_lerobot` wrote)."""
    converted, out = Path(converted), check_new_directory(out)
    weights = lerobot_state_dict(vla, converted)
    source = converted / SOURCE_DIR
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})  # one key: the header's bytes do not vary
    widths = {feature: vla.normalizer[name].width for feature, name in FEATURES.items() if name in vla.normalizer}
    for name in (CONFIG_FILE, PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        if (source / name).is_file():
            described = _with_widths(json.loads((source / name).read_text(encoding="utf-8")), widths)
            write_text(out / name, json.dumps(described, indent=2))
    for name in processor_state_files(source):
        stats = read_safetensors(source / name)
        for feature, normalizer_name in FEATURES.items():
            if normalizer_name not in vla.normalizer:
                continue
            normalizer = vla.normalizer[normalizer_name]
            for stat in POLICY_STATS:
                if f"{feature}.{stat}" in stats:
                    stats[f"{feature}.{stat}"] = getattr(normalizer, stat)[: normalizer.width].detach().float().cpu().clone()
        with atomic_path(out / name) as tmp:
            save_file(stats, str(tmp))
    return out
