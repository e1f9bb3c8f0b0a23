"""Peak memory of one ``predict_action`` call or one training step (``vlablocks bench``).

The peak counts the model, its gradients and optimizer state and the work's transient tensors,
not the interpreter and libraries: on CUDA ``torch.cuda.max_memory_allocated`` in this process,
on the CPU the peak resident set (``VmHWM``) of a fresh process (``python -m
vlablocks.tools.memory SPEC``) less its size before the model was built.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from vlablocks.policy.vla import VLA
from vlablocks.tools.bench_setup import DTYPES, BenchSettings, bench_autocast, bench_batch, build_for_bench, make_train_step

MEMORY_KINDS = ("inference", "train", "train_checkpointed")


def status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not found in /proc/self/status (peak memory on the CPU needs Linux)")


def reset_peak(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or (CPU) the process's ``VmHWM``."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set (Linux)


def measure_memory(kind: str, recipe: str, overrides: Sequence[str], settings: BenchSettings) -> float:
    """Peak memory of ``kind`` (``"inference"``, ``"train"``, ``"train_checkpointed"``) in MiB.

    The peak of one ``predict_action`` call or one training step (after one untimed call, so the
    optimizer state exists), counting the model, its gradients and optimizer state, and the
    work's transient tensors, not the interpreter and libraries. On CUDA in this process; on the
    CPU in a fresh process (``python -m vlablocks.tools.memory``) measuring its resident set, with
    glibc told to return freed blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``).
    """
    if kind not in MEMORY_KINDS:
        raise ValueError(f"kind must be one of {MEMORY_KINDS}; got {kind!r}")
    if settings.device == "cpu":
        spec = {"kind": kind, "recipe": recipe, "overrides": list(overrides), "settings": asdict(settings)}
        # glibc would keep freed tensors in its heap (its mmap threshold grows as blocks are
        # freed): a fixed threshold maps every large block, so the resident set follows the live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, "-m", "vlablocks.tools.memory", json.dumps(spec)],
                              capture_output=True, text=True, check=False, env=env)
        if proc.returncode:
            raise RuntimeError(f"memory probe ({kind}) failed:\n{proc.stderr[-3000:]}")
        return float(proc.stdout.strip().splitlines()[-1])
    return run_memory_probe(kind, recipe, overrides, settings)


def _inference_work(vla: VLA, settings: BenchSettings) -> Callable[[], None]:
    """One ``predict_action`` call on a fixed benchmark batch, as the inference timings run it."""
    vla = vla.eval().to(DTYPES[settings.dtype])
    batch = bench_batch(vla, settings.batch, settings)

    def work() -> None:
        with torch.inference_mode(), bench_autocast(settings):
            vla.predict_action(batch, num_steps=settings.steps)

    return work


def run_memory_probe(kind: str, recipe: str, overrides: Sequence[str], settings: BenchSettings) -> float:
    """Build the model and measure the peak of ``kind`` in this process (see :func:`measure_memory`)."""
    device = settings.device
    reset_peak(device)
    libraries = 0.0 if device == "cuda" else status_mib("VmRSS")
    vla = build_for_bench(recipe, overrides, settings.seed, device)
    if kind == "inference":
        work: Callable[[], object] = _inference_work(vla, settings)
    else:
        vla.set_gradient_checkpointing(kind == "train_checkpointed")
        work = make_train_step(vla, settings)
    work()
    reset_peak(device)
    work()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mib("VmHWM") - libraries


if __name__ == "__main__":  # the memory probe's fresh process (see measure_memory)
    spec = json.loads(sys.argv[1])
    peak = run_memory_probe(spec["kind"], spec["recipe"], spec["overrides"], BenchSettings(**spec["settings"]))
    sys.stdout.write(f"{peak}\n")
