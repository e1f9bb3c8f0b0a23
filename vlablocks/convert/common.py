"""What the LeRobot key tables and recipe derivations share: the error type, reading sizes from a
state dict's shapes, normalisation modes, and applying / checking a key table."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

#: the prefix of every key of a LeRobot policy's state dict (its ``model`` attribute).
POLICY_PREFIX = "model."
#: where the fusion stack's and the suffix encoder's tensors live in a vlablocks deep-fusion VLA.
STACK, SUFFIX = "head.denoiser.stack.", "head.denoiser.suffix_encoder."
#: LeRobot's normalisation modes -> ``policy.state_norm`` / ``policy.action_norm``.
NORM_MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantile", "IDENTITY": "identity"}

#: LeRobot key -> vlablocks key (``None``: declared unused; KeyError: unknown).
KeyTable = Callable[[str], "str | None"]


class ConversionError(ValueError):
    """A LeRobot policy that cannot become a vlablocks policy (naming what and why)."""


def common_key(key: str, unused: Mapping[str, str], renames: Mapping[str, str], vision: str) -> tuple[bool, str | None]:
    """``(known, vlablocks key)`` of a LeRobot key (prefix removed) for what every table maps
    alike: a key declared unused (``None``), a one-to-one rename, the vision tower under
    ``vision`` (-> ``vision.model.*``); ``(False, None)`` for the rest."""
    if key in unused:
        return True, None
    if key in renames:
        return True, renames[key]
    if key.startswith(vision):
        return True, "vision.model." + key[len(vision):]
    return False, None


def strip_prefix(shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``shapes`` with the ``model.`` prefix removed from the keys."""
    return {k.removeprefix(POLICY_PREFIX): list(v) for k, v in shapes.items()}


def tensor_shape(shapes: Mapping[str, Sequence[int]], key: str) -> list[int]:
    """The shape of ``key`` (prefix removed); ConversionError naming it when absent."""
    if key not in shapes:
        raise ConversionError(f"model.safetensors: missing tensor {POLICY_PREFIX + key!r}")
    return list(shapes[key])


def count_layers(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    """How many ``prefix{i}.`` layers the weights hold (ConversionError when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    if not found:
        raise ConversionError(f"model.safetensors has no layers under {POLICY_PREFIX + prefix!r}")
    return max(found) + 1


def norm_mode(config: Mapping[str, Any], kind: str) -> str:
    """``policy.state_norm`` / ``action_norm`` of ``config.json``'s ``normalization_mapping[kind]``."""
    mode = (config.get("normalization_mapping") or {}).get(kind, "MEAN_STD")
    if mode not in NORM_MODES:
        raise ConversionError(f"config.json: normalization_mapping.{kind}: vlablocks reproduces {sorted(NORM_MODES)}; "
                              f"got {mode!r}")
    return NORM_MODES[mode]


def map_keys(keys: Iterable[str], table: KeyTable) -> tuple[dict[str, str], list[str]]:
    """``(LeRobot key -> vlablocks key, the keys declared unused)`` (KeyError for an unknown key)."""
    mapped, unused = {}, []
    for key in keys:
        target = table(key)
        if target is None:
            unused.append(key)
        else:
            mapped[key] = target
    return mapped, unused


def check_shapes(lerobot: Mapping[str, Sequence[int]], vlablocks: Mapping[str, Sequence[int]], table: KeyTable) -> list[str]:
    """Problems between LeRobot keys -> shapes and a vlablocks state dict's keys -> shapes: a
    mapped key whose shapes differ, two keys mapped onto one, a vlablocks parameter nothing
    fills (its normaliser buffers excepted: statistics come from the processor files)."""
    mapped, _ = map_keys(lerobot, table)
    problems = [f"{k} {list(lerobot[k])} -> {v} {list(vlablocks.get(v, []))}" for k, v in mapped.items()
                if list(vlablocks.get(v, [])) != list(lerobot[k])]
    counts = Counter(mapped.values())
    problems += [f"{v}: filled by more than one key" for v in sorted(v for v, n in counts.items() if n > 1)]
    problems += [f"{k}: no LeRobot key fills it" for k in sorted(set(vlablocks) - set(counts))
                 if not k.startswith("normalizer.")]
    return problems
