"""Load a LeRobot policy directory (pi0, pi0.5, SmolVLA: ``config.json``, ``model.safetensors``
and the processor files LeRobot saves beside them) as a vlablocks :class:`~vlablocks.policy.vla.VLA`
that predicts the same actions, and write it as a vlablocks checkpoint.

- The recipe is the bundled recipe of the policy type with the overrides
  :mod:`vlablocks.convert.lerobot_config` derives from ``config.json`` and the weights' shapes.
- Every tensor goes through the type's declared key table; loading is strict: a tensor the
  recipe needs and the checkpoint lacks, or one the table does not know, is an error naming it.
  A token embedding kept only as the tied ``lm_head`` (released pi0 checkpoints) is used as the
  embedding.
- The normalisation statistics come from the pre-processor's normaliser file (or, in checkpoints
  saved before LeRobot had processors, from the ``normalize_*`` buffers in the weights); the
  processors' conventions (the ``"\\n"`` after the task, resize-with-pad, eps) are recipe options.
- The tokenizer is a transformers tokenizer from a local directory (or a Hub id fetched once):
  LeRobot's processors name it (``google/paligemma-3b-pt-224`` for pi0 / pi0.5), and the
  converted checkpoint keeps its files.

Only safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlablocks.convert.common import POLICY_PREFIX, ConversionError
from vlablocks.convert.lerobot_config import Family, family
from vlablocks.io.atomic import atomic_path, write_json, write_text
from vlablocks.io.hub import resolve_local, resolve_policy
from vlablocks.io.manifest import read_safetensors, write_manifest
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import build
from vlablocks.recipes.loader import load_recipe

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
#: a converted checkpoint keeps the source's config and processor descriptions here (for export).
SOURCE_DIR = "lerobot"
CONVERSION_FILE = "conversion.json"
#: the features LeRobot normalises -> the policy's normalisers.
FEATURES = {"observation.state": "state", "action": "action"}
#: processor steps that need nothing from vlablocks (they batch, move or rename), or that the
#: recipe reproduces (tokeniser, new line, pi0.5's state prompt, normalisers).
KNOWN_STEPS = frozenset({
    "rename_observations_processor", "to_batch_processor", "device_processor", "tokenizer_processor",
    "pi0_new_line_processor", "smolvla_new_line_processor", "pi05_prepare_state_tokenizer_processor_step",
    "normalizer_processor", "unnormalizer_processor",
})
#: steps that are fine only while switched off (``config.enabled`` false).
OPTIONAL_STEPS = frozenset({"relative_actions_processor", "absolute_actions_processor"})
#: the files of a tokenizer repository fetched for a Hub id.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt", "added_tokens.json",
                   "config.json")
#: where checkpoints saved before LeRobot's processors keep their statistics.
LEGACY_STATS_PREFIXES = ("normalize_inputs.buffer_", "normalize_targets.buffer_", "unnormalize_outputs.buffer_")


@dataclass
class LeRobotPolicy:
    """The files of a LeRobot policy directory.

    Attributes:
        directory: where they are.
        config: ``config.json``.
        weights: ``model.safetensors`` (keys as saved, e.g. ``model.state_proj.weight``).
        stats: feature -> statistic -> ``[d]`` (from the processor files or legacy buffers).
        steps: the pre-processor's step names and configs (empty for legacy checkpoints).
    """

    directory: Path
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)


def check_new_directory(out: str | Path) -> Path:
    """``out`` as a path (FileExistsError unless it is new or an empty directory: nothing of the
    user's is overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory: choose a new output directory")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} not found: not a LeRobot policy directory (config.json, model.safetensors, "
                              "policy_preprocessor.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object; got {type(data).__name__}")
    return data


def read_policy(source: str | Path, revision: str | None = None) -> LeRobotPolicy:
    """Read a LeRobot policy directory, or a Hub model id (fetched once, safetensors and JSON only)."""
    directory = resolve_policy(source, revision)
    config = _read_json(directory / CONFIG_FILE)
    weights = read_safetensors(directory / WEIGHTS_FILE) if (directory / WEIGHTS_FILE).is_file() else None
    if weights is None:
        raise ConversionError(f"{directory / WEIGHTS_FILE} not found: LeRobot policies keep their weights there")
    policy = LeRobotPolicy(directory, config, weights)
    if (directory / PREPROCESSOR_FILE).is_file():
        policy.steps = list(_read_json(directory / PREPROCESSOR_FILE).get("steps", []))
        normalizer = next((s for s in policy.steps if s.get("registry_name") == "normalizer_processor"), None)
        if normalizer is not None and normalizer.get("state_file"):
            policy.stats = _split_stats(read_safetensors(directory / normalizer["state_file"]))
    else:
        legacy = {k.split("buffer_", 1)[1].replace("observation_", "observation.", 1): v
                  for k, v in weights.items() if k.startswith(LEGACY_STATS_PREFIXES)}
        policy.stats = _split_stats(legacy)
        logger.info("%s has no %s: statistics read from the weights' normalize buffers", directory, PREPROCESSOR_FILE)
    return policy


def processor_state_files(directory: Path) -> list[str]:
    """The ``state_file`` names (normaliser statistics) the processor descriptions in ``directory`` list."""
    names = []
    for processor in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        if (directory / processor).is_file():
            names += [s["state_file"] for s in _read_json(directory / processor).get("steps", []) if s.get("state_file")]
    for name in names:
        if "/" in name or "\\" in name or name.startswith("."):
            raise ConversionError(f"{directory}: processor state_file {name!r} is not a plain file name")
    return names


def _split_stats(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"observation.state.mean": t}`` -> ``{"observation.state": {"mean": t}}``."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        feature, _, stat = key.rpartition(".")
        stats.setdefault(feature, {})[stat] = value.float()
    return stats


def check_steps(policy: LeRobotPolicy) -> None:
    """ConversionError for a pre-processor step vlablocks does not reproduce (naming it)."""
    for step in policy.steps:
        name, config = step.get("registry_name"), step.get("config") or {}
        if name in OPTIONAL_STEPS and config.get("enabled"):
            raise ConversionError(f"{policy.directory / PREPROCESSOR_FILE}: step {name!r} is enabled; vlablocks "
                                  "predicts absolute actions only (expected enabled: false)")
        if name == "rename_observations_processor" and config.get("rename_map"):
            logger.info("the policy renames observations %s: give the dataset's cameras in the policy's order",
                        config["rename_map"])
        if name not in KNOWN_STEPS | OPTIONAL_STEPS:
            raise ConversionError(f"{policy.directory / PREPROCESSOR_FILE}: processor step {name!r} is not one "
                                  f"vlablocks reproduces; expected only {sorted(KNOWN_STEPS | OPTIONAL_STEPS)}")


def resolve_tokenizer(tokenizer: str | Path | None, spec: Family, config: Mapping[str, Any]) -> Path:
    """The local tokenizer directory: ``tokenizer`` (a directory or a Hub id), else the one the
    policy's processors name, fetched once (offline: from the cache)."""
    name = tokenizer if tokenizer is not None else spec.tokenizer(config)
    try:
        return resolve_local(name, "model", allow_patterns=TOKENIZER_FILES)
    except FileNotFoundError as err:
        raise ConversionError(f"tokenizer: {err}; give a local tokenizer directory (--tokenizer DIR)") from None


def lerobot_recipe(policy: LeRobotPolicy, tokenizer: Path, overrides: Iterable[str] = ()):
    """The recipe of ``policy``: its type's bundled recipe, the derived overrides, the tokenizer
    (``text.tokenizer``), then the caller's ``overrides`` (which win)."""
    spec = family(policy.config, str(policy.directory / CONFIG_FILE))
    shapes = {k: list(v.shape) for k, v in policy.weights.items()}
    max_length = policy.config.get("tokenizer_max_length", 48)
    vlm_config = _read_json(tokenizer / CONFIG_FILE) if (tokenizer / CONFIG_FILE).is_file() else None
    try:
        derived = spec.overrides(policy.config, shapes, vlm_config)
    except ConversionError:
        raise
    except (ValueError, KeyError) as err:
        raise ConversionError(f"{policy.directory}: {err}") from None
    derived += [
        f"text.tokenizer={json.dumps({'type': 'hf', 'path': str(tokenizer), 'max_length': max_length})}",
        "description=" + json.dumps(f"{policy.config['type']} converted from LeRobot ({policy.directory.name})"),
    ]
    return load_recipe(spec.recipe, [*derived, *overrides])


def map_weights(policy: LeRobotPolicy, vla: VLA) -> dict[str, torch.Tensor]:
    """``policy``'s weights under ``vla``'s names, strictly: every parameter and persistent
    buffer of ``vla`` but the normalisers' is filled, by one tensor of the right shape.

    Raises:
        ConversionError: naming the unknown, missing, doubly filled or mis-shaped tensors.
    """
    spec = family(policy.config, str(policy.directory / CONFIG_FILE))
    try:
        table = spec.keys(policy.config, {k: list(v.shape) for k, v in policy.weights.items()})
    except ValueError as err:
        raise ConversionError(f"{policy.directory}: {err}") from None
    own = {k: v for k, v in vla.state_dict().items() if not k.startswith("normalizer.")}
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown, doubled = [], []
    for key, tensor in policy.weights.items():
        if key.startswith(LEGACY_STATS_PREFIXES):
            continue
        try:
            target = table(key)
        except KeyError:
            unknown.append(key)
            continue
        if target is None:
            continue
        if target in mapped:
            doubled.append(f"{target} (from {sources[target]} and {key})")
        mapped[target], sources[target] = tensor, key
    for target, tied in spec.tied.items():  # e.g. pi0's embedding kept only as the tied lm_head
        key = next((k for k in (tied, POLICY_PREFIX + tied) if k in policy.weights), None)
        if target not in mapped and key is not None:
            mapped[target], sources[target] = policy.weights[key], key
            logger.info("%s: %s is the tied %s", policy.directory, target, key)
    missing = sorted(own.keys() - mapped.keys())
    shapes = [f"{sources[k]} {list(mapped[k].shape)} -> {k} {list(own[k].shape)}"
              for k in own.keys() & mapped.keys() if mapped[k].shape != own[k].shape]
    extra = sorted(mapped.keys() - own.keys())
    problems = [f"{label}: {', '.join(items[:6])}{f' and {len(items) - 6} more' if len(items) > 6 else ''}"
                for label, items in (("tensors the policy needs but the checkpoint lacks", missing),
                                     ("keys the key table does not know", unknown), ("filled twice", doubled),
                                     ("shape mismatch", shapes), ("mapped to no parameter", extra)) if items]
    if problems:
        raise ConversionError(f"{policy.directory / WEIGHTS_FILE}: " + "; ".join(problems))
    return {k: v.to(own[k].dtype) for k, v in mapped.items()}


def set_stats(vla: VLA, policy: LeRobotPolicy) -> None:
    """The policy's state and action statistics into ``vla.normalizer`` (the mode's statistics
    are required; ConversionError naming the feature otherwise)."""
    for feature, name in FEATURES.items():
        if name not in vla.normalizer or vla.normalizer[name].mode == "identity":
            continue
        stats = policy.stats.get(feature)
        if not stats:
            raise ConversionError(f"{policy.directory}: no statistics for {feature!r} (expected them in the normaliser "
                                  f"file of {PREPROCESSOR_FILE}); the policy normalises it ({vla.normalizer[name].mode})")
        try:
            vla.normalizer[name].set_stats(**{k: stats.get(k) for k in ("mean", "std", "q01", "q99")})
        except ValueError as err:
            raise ConversionError(f"{policy.directory}: statistics of {feature!r}: {err}") from None


def load_lerobot_policy(source: str | Path, tokenizer: str | Path | None = None, overrides: Iterable[str] = (),
                        revision: str | None = None) -> VLA:
    """A LeRobot pi0 / pi0.5 / SmolVLA policy (a directory or a Hub id) as a vlablocks VLA with
    its weights, statistics, tokenizer and processing conventions (see the module docstring)."""
    return _load(read_policy(source, revision), tokenizer, overrides)


def _load(policy: LeRobotPolicy, tokenizer: str | Path | None, overrides: Iterable[str]) -> VLA:
    check_steps(policy)
    spec = family(policy.config, str(policy.directory / CONFIG_FILE))
    recipe = lerobot_recipe(policy, resolve_tokenizer(tokenizer, spec, policy.config), overrides)
    vla = build(recipe, load_weights=False)
    vla.load_state_dict(map_weights(policy, vla), strict=False)  # strict by map_weights; normalisers: set_stats
    set_stats(vla, policy)
    return vla


def convert_lerobot(source: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                    overrides: Iterable[str] = (), revision: str | None = None) -> Path:
    """Convert a LeRobot policy into the vlablocks checkpoint directory ``out`` (which must not
    exist or be empty): ``model.safetensors``, ``recipe.yaml``, ``tokenizer/``, the source's
    config and processor descriptions under ``lerobot/`` (for export), ``conversion.json`` and
    ``manifest.json``. Read it back with :func:`vlablocks.from_pretrained`."""
    out = check_new_directory(out)
    policy = read_policy(source, revision)
    vla = _load(policy, tokenizer, overrides)
    vla.save_pretrained(out, manifest=False)
    (out / SOURCE_DIR).mkdir(exist_ok=True)
    for name in (CONFIG_FILE, PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        if (policy.directory / name).is_file():
            write_text(out / SOURCE_DIR / name, (policy.directory / name).read_text(encoding="utf-8"))
    for name in processor_state_files(policy.directory):
        with atomic_path(out / SOURCE_DIR / name) as tmp:
            tmp.write_bytes((policy.directory / name).read_bytes())
    write_json(out / CONVERSION_FILE, {
        "source": str(source), "lerobot_type": policy.config["type"], "overrides": list(overrides),
        "parameters": sum(p.numel() for p in vla.parameters()),
        "lerobot_keys": {k: list(v.shape) for k, v in policy.weights.items()},
    })
    write_manifest(out)
    return out
