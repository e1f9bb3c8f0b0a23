"""What ``vlablocks bench`` runs, shared by its timings (:mod:`vlablocks.tools.bench`) and its
peak-memory probes (:mod:`vlablocks.tools.memory`): the settings, the seeded model, the autocast
context and the training step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from vlablocks.policy.batch import to_device
from vlablocks.policy.checks import random_batch
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import build

Dtype = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchSettings:
    """How to measure.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"fp32"`` or ``"bf16"`` (autocast; see :mod:`vlablocks.tools.bench`).
        compile: ``"off"``; ``"step"``: ``torch.compile`` (static shapes) the prefix pass, the
            denoise step and the joint pass, each one graph that the chunk loops call, and the
            training forward; ``"chunk"``: as ``"step"``, but each whole chunk (prefix pass and
            ``N`` steps) is one unrolled graph: no per-step guard checks, much longer compilation.
        batch: observations per inference call (1: one robot's control loop).
        train_batch: samples per training step.
        steps: ODE steps per action chunk ``N``.
        repeats: timed runs per figure (the median is reported).
        warmup: untimed runs before them (compilation happens here).
        train: measure the training step.
        memory: measure peak memory (CPU: one fresh process per figure).
        seed: seeds the weights and the inputs.
    """

    device: str = "cpu"
    dtype: Dtype = "fp32"
    compile: Literal["off", "step", "chunk"] = "off"
    batch: int = 1
    train_batch: int = 8
    steps: int = 10
    repeats: int = 10
    warmup: int = 2
    train: bool = True
    memory: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.compile not in ("off", "step", "chunk"):
            raise ValueError(f"compile must be 'off', 'step' or 'chunk'; got {self.compile!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda'; got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        for name in ("batch", "train_batch", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0; got {self.warmup}")


def build_for_bench(recipe: str, overrides: Sequence[str], seed: int, device: str) -> VLA:
    """The recipe's model with seeded random weights (nothing loaded), on ``device``."""
    torch.manual_seed(seed)
    return build(recipe, overrides, load_weights=False, device=device)


def bench_autocast(settings: BenchSettings) -> AbstractContextManager:
    """``torch.autocast`` to the settings' dtype, or nothing for fp32."""
    if settings.dtype == "fp32":
        return nullcontext()
    return torch.autocast(settings.device, dtype=DTYPES[settings.dtype])


def make_train_step(vla: VLA, settings: BenchSettings) -> Callable[[], float]:
    """A closure running one loss + backward + AdamW step on a fixed random batch."""
    vla.train()
    batch = to_device(random_batch(vla, settings.train_batch, seed=settings.seed), settings.device)
    params = [p for p in vla.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    forward = torch.compile(vla, dynamic=False) if settings.compile != "off" else vla
    gen = torch.Generator(settings.device).manual_seed(settings.seed)

    def step() -> float:
        with bench_autocast(settings):
            loss = forward(batch, generator=gen).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step
