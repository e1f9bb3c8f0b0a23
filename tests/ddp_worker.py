"""Trainer test helpers: a tiny in-memory dataset, gradient capture, and the DDP worker.

As a script (``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR [MODE]``), MODE ``grads``
(the default): every process trains ``DDP_CONFIG`` and writes its averaged gradients before each
optimizer step to ``OUT_DIR/grads_rank{r}_step{n}.safetensors``. MODE ``full`` / ``part`` /
``resume`` train ``RESUME_CONFIG`` without a stop / stopping in step 4 / resuming from the latest
checkpoint; ``sigterm``: only rank 0 receives SIGTERM, in step 2 (both must stop after it).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from vlablocks.policy.checks import random_batch
from vlablocks.recipes.builder import build
from vlablocks.train.checkpoint import latest_checkpoint
from vlablocks.train.config import TrainConfig
from vlablocks.train.trainer import Trainer
from vlablocks.policy.vla import VLA

RECIPE = "tiny_llava3d_deepfusion"
#: one process with accumulation 2 sees the same global micro-batches (and noise) as 2 processes without.
DDP_CONFIG = TrainConfig(steps=2, batch_size=2, lr=1e-3, clip_grad_norm=None, log_every=1, save_every=None)
#: checkpoint at step 3 is mid-epoch (16 samples = 4 micro-batches per process and epoch).
RESUME_CONFIG = TrainConfig(steps=5, batch_size=2, grad_accumulation=2, ema_decay=0.9, warmup_steps=1, log_every=1,
                            save_every=3)


class TinyDataset(Dataset):
    """``size`` samples cut from one ``random_batch`` of ``vla`` (fixed seed), with LeRobot-style stats."""

    def __init__(self, vla: VLA, size: int = 8, seed: int = 0) -> None:
        batch = random_batch(vla, size, seed=seed)
        self.samples = [{k: v[i] for k, v in batch.items()} for i in range(size)]
        self.stats = {
            "action": _stats(batch["actions"].flatten(0, 1)),
            "observation.state": _stats(batch["state"]),
        }

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def _stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": x.mean(0), "std": x.std(0), "q01": x.quantile(0.01, dim=0), "q99": x.quantile(0.99, dim=0)}


def capture_gradients(trainer: Trainer, prefix: Path) -> None:
    """Before every optimizer step write the (averaged) gradients to ``{prefix}_step{n}.safetensors``."""
    step = trainer.optimizer.step

    def step_and_capture(*args: Any, **kwargs: Any) -> Any:
        grads = {n: p.grad.detach().clone() for n, p in trainer.vla.named_parameters() if p.grad is not None}
        save_file(grads, f"{prefix}_step{trainer.step}.safetensors")
        return step(*args, **kwargs)

    trainer.optimizer.step = step_and_capture


def make_trainer(out_dir: Path, config: TrainConfig, size: int = 8) -> Trainer:
    torch.manual_seed(0)
    vla = build(RECIPE)
    return Trainer(vla, TinyDataset(vla, size), config, out_dir)


def stop_in_step(trainer: Trainer, step: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    """Make the run raise ``error`` in its first micro-batch of (1-based) ``step``."""
    loss, calls = trainer.vla.head.loss, []

    def loss_or_stop(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > (step - 1) * trainer.config.grad_accumulation:
            raise error
        return loss(*args, **kwargs)

    trainer.vla.head.loss = loss_or_stop


def sigterm_in_step(trainer: Trainer, step: int) -> None:
    """Send this process SIGTERM in the first micro-batch of (1-based) ``step``."""
    loss, calls = trainer.vla.head.loss, []

    def loss_and_signal(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == (step - 1) * trainer.config.grad_accumulation + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    trainer.vla.head.loss = loss_and_signal


def main(out_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    if mode == "grads":
        trainer = make_trainer(out_dir, DDP_CONFIG)
        capture_gradients(trainer, out_dir / f"grads_rank{trainer.accelerator.process_index}")
    else:
        trainer = make_trainer(out_dir, RESUME_CONFIG, size=16)
        if mode == "part":
            stop_in_step(trainer, 4, SystemExit)
        elif mode == "resume":
            trainer.resume(latest_checkpoint(out_dir))
        elif mode == "sigterm" and trainer.accelerator.process_index == 0:
            sigterm_in_step(trainer, 2)
    assert trainer.accelerator.num_processes == 2, f"expected 2 processes; got {trainer.accelerator.num_processes}"
    try:
        trainer.train()
    except SystemExit:
        pass


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "grads")
