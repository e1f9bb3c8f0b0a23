"""The HF accelerate :class:`~accelerate.Accelerator` of a run (one process, DDP or FSDP, as
launched: ``python``, ``torchrun`` or ``accelerate launch``)."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs


def make_accelerator(mixed_precision: Literal["no", "bf16"], grad_accumulation: int) -> Accelerator:
    """An Accelerator with ``mixed_precision`` and ``grad_accumulation`` micro-batches per step.

    DDP is told to expect parameters without gradient (the trainer warns about them after the
    first step). Processes launched by torchrun on a machine without an accelerator use gloo on
    the CPU (accelerate would otherwise make each of them a separate single-process run).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = {
        "mixed_precision": mixed_precision,
        "gradient_accumulation_steps": grad_accumulation,
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
        "cpu": launched > 1 and not torch.accelerator.is_available(),
    }
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError as err:
        if "already been initialized" not in str(err) or launched > 1:
            raise
        _reset_accelerate_state()
        accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as WORLD_SIZE={launched} processes, but accelerate set up {accelerator.num_processes}: "
            "to train on CPUs set ACCELERATE_USE_CPU=1"
        )
    return accelerator


def _reset_accelerate_state() -> None:
    """Forget accelerate's per-process singleton state, so a new Accelerator may differ.

    accelerate keeps one state per process and refuses an Accelerator whose settings (e.g. the
    mixed precision) differ from the first one's; a single process may train several times
    (notebooks, tests). This calls accelerate's private ``AcceleratorState._reset_state``: the
    one place vlablocks touches accelerate internals, only ever in a single-process run (a
    launched multi-process run re-raises instead), and the first thing to check on an accelerate
    upgrade.
    """
    AcceleratorState._reset_state()
