"""The run directory's checkpoints: names, the ``latest`` pointer, atomic publication and
recovery after a killed writer, and loading a checkpoint's policy (live or EMA weights).

``out_dir/checkpoints/step_{N:07d}/``::

    model.safetensors, recipe.yaml   the policy (``vlablocks.recipes.from_pretrained(dir)``), live weights
    ema.safetensors                  with ``ema_decay``: the policy's full state dict with the EMA weights
    trainer_state.safetensors        optimizer tensors, torch RNG states, the DataLoader generator
    trainer_state.json               step, data position, scheduler, optimizer groups, RNG states, the config
    manifest.json                    sizes and sha256 checksums of the files above, written last
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlablocks.io.atomic import atomic_path
from vlablocks.io.manifest import load_weights, read_safetensors
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import from_pretrained

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
EMA_FILE = "ema.safetensors"
STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"
STATE_FORMAT = "vlablocks.trainer_state/1"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint named by ``out_dir/checkpoints/latest``, or ``None``."""
    pointer = Path(out_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text(encoding="utf-8").strip()


def load_ema_policy(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu") -> VLA:
    """The policy of a checkpoint with its EMA weights (``ema.safetensors``)."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run had no ema_decay, or this is not a trainer checkpoint")
    vla = from_pretrained(checkpoint_dir, map_location=map_location)
    load_weights(vla, read_safetensors(path, map_location), path)
    return vla


def publish_directory(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final`` (replacing an older one)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def recover_checkpoints(root: Path) -> None:
    """Tidy ``root`` (a ``checkpoints/`` directory) after a writer was killed: remove half-written
    ``.step_*.tmp`` directories, and put back a ``step_*`` directory that was being replaced."""
    for path in sorted(root.glob(".step_*")):
        if not path.is_dir():
            continue
        name, _, kind = path.name[1:].partition(".")
        if kind.startswith("old-") and not (root / name).exists():
            os.replace(path, root / name)
            logger.warning("restored %s (its replacement was interrupted)", root / name)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("removed %s, left by an interrupted checkpoint write", path)


def load_policy(run: str | Path, use_ema: bool = True) -> tuple[VLA, Path]:
    """The policy of a run (its latest checkpoint) or of a checkpoint directory; EMA weights when present."""
    run = Path(run)
    checkpoint = latest_checkpoint(run) or run
    if use_ema and (checkpoint / EMA_FILE).is_file():
        return load_ema_policy(checkpoint).eval(), checkpoint
    if use_ema:
        logger.warning("%s has no EMA weights; evaluating the raw weights", checkpoint)
    return from_pretrained(checkpoint).eval(), checkpoint
