"""The run directory's checkpoints: names, the ``latest`` pointer, atomic publication and
recovery after a killed writer, writing the policy's weights (also under FSDP), and loading a
checkpoint's policy (live or EMA weights).

``out_dir/checkpoints/step_{N:07d}/`` (written into a hidden temporary directory, each file
atomically, then renamed into place; never pickled)::

    model.safetensors, recipe.yaml   the policy (``vlablocks.recipes.from_pretrained(dir)``), live weights
    ema.safetensors                  with ``ema_decay``: the policy's full state dict with the EMA weights
                                     (a LoRA run: the adapters' EMA weights, peft names)
    adapter_config.json, adapter_model.safetensors, [base.json, base_buffers.safetensors]
                                     a LoRA run instead of model.safetensors (when the base is referenced):
                                     :mod:`vlablocks.recipes.lora`
    trainer_state.safetensors        optimizer tensors, torch RNG states, the DataLoader generator
    trainer_state.json               step, data position, scheduler, optimizer groups, RNG states, the config
                                     (both: :mod:`vlablocks.train.state`)
    manifest.json                    sizes and sha256 checksums of the files above, written last
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from vlablocks.io.atomic import atomic_path, write_text
from vlablocks.io.manifest import load_weights, read_safetensors
from vlablocks.policy.vla import RECIPE_FILE, VLA, WEIGHTS_FILE
from vlablocks.recipes.builder import from_pretrained
from vlablocks.recipes.lora import (
    ADAPTER_WEIGHTS_FILE,
    adapter_state_dict,
    base_state_dict,
    is_lora_checkpoint,
    read_lora_base,
    save_lora_policy,
    to_policy_state,
)

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
EMA_FILE = "ema.safetensors"
#: the name of a checkpoint directory inside ``checkpoints/`` (``step_{N:07d}``; more digits past 9,999,999 steps).
STEP_NAME = re.compile(r"step_[0-9]{7,}")
#: full (unsharded) state dicts on the CPU, also under FSDP (every process joins the gather).
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class LatestPointerError(ValueError):
    """``checkpoints/latest`` does not name a ``step_NNNNNNN`` directory of its own run."""


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint named by ``out_dir/checkpoints/latest``, or ``None`` when there is no ``latest``.

    The name must be a plain ``step_NNNNNNN`` directory inside ``checkpoints/`` (no ``/``, no
    ``..``, no absolute path) that exists: anything else raises :class:`LatestPointerError`, so a
    resume never continues another run's checkpoint.
    """
    pointer = Path(out_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not STEP_NAME.fullmatch(name):
        raise LatestPointerError(
            f"{pointer} says {name!r}; expected the name of a checkpoint directory in {pointer.parent} "
            "(step_NNNNNNN: no '/', no '..', no absolute path)"
        )
    checkpoint = pointer.parent / name
    if not checkpoint.is_dir():
        raise LatestPointerError(f"{pointer} says {name!r} but {checkpoint} is not a directory; expected an existing checkpoint")
    return checkpoint


def load_ema_policy(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> VLA:
    """The policy of a checkpoint with its EMA weights (``ema.safetensors``); ``verify`` as in
    :func:`~vlablocks.recipes.builder.from_pretrained`."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run had no ema_decay, or this is not a trainer checkpoint")
    vla = from_pretrained(checkpoint_dir, map_location=map_location, verify=verify)
    state = read_safetensors(path, map_location)
    if is_lora_checkpoint(checkpoint_dir):
        state = to_policy_state(vla, base_state_dict(vla), state)
    load_weights(vla, state, path)
    return vla


def read_policy_state(vla: VLA, directory: Path, ema: bool = False, verify: bool = True) -> dict[str, torch.Tensor]:
    """The full ``vla.state_dict()`` a checkpoint holds (live, or ``ema`` weights): ``model.safetensors``
    / ``ema.safetensors``, or for a LoRA checkpoint its base plus its (EMA) adapters."""
    if not is_lora_checkpoint(directory):
        return read_safetensors(directory / (EMA_FILE if ema else WEIGHTS_FILE))
    adapters = read_safetensors(directory / (EMA_FILE if ema else ADAPTER_WEIGHTS_FILE))
    return to_policy_state(vla, read_lora_base(directory, verify), adapters)


def save_lora_checkpoint(directory: Path, vla: VLA, init: Path | None, ema: AbstractContextManager[None] | None) -> None:
    """``recipe.yaml``, the peft adapter files and the base (or its reference) of a LoRA policy, and
    with ``ema`` (the EMA's ``applied()`` context) the adapters' EMA weights as ``ema.safetensors``."""
    write_text(directory / RECIPE_FILE, yaml.safe_dump(vla.export_recipe(directory), sort_keys=False))
    save_lora_policy(directory, vla, init)
    if ema is not None:
        with ema:
            save_tensors(directory / EMA_FILE, adapter_state_dict(vla))


def publish_directory(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final`` (replacing an older one)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def set_latest(checkpoint: Path) -> None:
    """Point ``checkpoints/latest`` at ``checkpoint`` (a ``step_*`` directory), atomically."""
    write_text(checkpoint.parent / LATEST_FILE, checkpoint.name + "\n")


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """A hidden temporary directory beside ``final``, renamed to ``final`` when the block
    succeeds (see :func:`publish_directory`) and removed when it fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)
    published = False
    try:
        yield tmp
        publish_directory(tmp, final)
        published = True
    finally:
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` (detached, contiguous, on the CPU) to the safetensors file ``path`` atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def save_model_state(path: Path | None, model: nn.Module, vla: VLA, sharded: bool) -> None:
    """The full state dict of ``vla`` into ``path`` (the main process passes a path, the others
    ``None``; under FSDP every process joins the gather of the prepared ``model``)."""
    if sharded:
        state = get_model_state_dict(model, options=FULL_STATE)
    else:
        state = vla.state_dict() if path is not None else {}
    if path is not None:
        save_tensors(path, state)


def save_policy(directory: Path | None, model: nn.Module, vla: VLA, sharded: bool) -> None:
    """``model.safetensors`` and ``recipe.yaml`` of ``vla`` into ``directory`` (as
    :func:`save_model_state`: ``None`` on the other processes, which join under FSDP)."""
    if not sharded:
        if directory is not None:
            vla.save_pretrained(directory, manifest=False)
        return
    save_model_state(None if directory is None else directory / WEIGHTS_FILE, model, vla, sharded)
    if directory is not None:
        write_text(directory / RECIPE_FILE, yaml.safe_dump(vla.export_recipe(directory), sort_keys=False))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into the prepared ``model`` (sharding it under FSDP)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


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


def load_policy(run: str | Path, use_ema: bool = True, verify: bool = True) -> tuple[VLA, Path]:
    """The policy of a run (its latest checkpoint) or of a checkpoint directory; EMA weights when
    present; ``verify=False`` loads without checking the manifest (and says so)."""
    run = Path(run)
    checkpoint = latest_checkpoint(run) or run
    if use_ema and (checkpoint / EMA_FILE).is_file():
        return load_ema_policy(checkpoint, verify=verify).eval(), checkpoint
    if use_ema:
        logger.warning("%s has no EMA weights; evaluating the raw weights", checkpoint)
    return from_pretrained(checkpoint, verify=verify).eval(), checkpoint
