"""CPU inference options on the demo's policy: each one's action error against float32 and its
success on the demo's Meta-World tasks.

Every mode is evaluated closed loop on the same seeded episodes. At every chunk it visits, the
float32 policy as trained is run beside it on the same observation and the same start noise
(a shadow), so the error is measured on the observations the mode's own actions lead to. The
mode's actions are the ones executed.

Modes (:mod:`vlablocks.policy.inference`, :mod:`vlablocks.policy.precision`):
- ``float32``: the policy as trained (the reference: error 0);
- ``fused``: fused projections, grouped-matmul attention, sigmoid-form GELU;
- ``fused + int8``: the same, plus dynamic int8 linears;
- ``bfloat16``: LeRobot's precision policy (``policy.precision=bfloat16``). Without native bf16
  (AMX / AVX512-BF16: :func:`~vlablocks.policy.inference.cpu_native_bf16`) torch emulates it: its
  error and success hold, its speed does not (marked in the table).

Run after ``make demo``:
    python benchmarks/cpu_precision.py runs/demo/run --episodes 10 --json docs/benchmarks/cpu_precision.json \
        --update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vlablocks.eval.run import evaluate_run
from vlablocks.io.atomic import replace_section, write_json
from vlablocks.policy.inference import InferenceOptions, cpu_native_bf16, optimize_for_inference
from vlablocks.policy.precision import apply_precision
from vlablocks.policy.vla import VLA
from vlablocks.train.checkpoint import load_policy

TASKS = ["button-press-topdown-v3", "drawer-open-v3", "window-open-v3"]


class ShadowPredictor:
    """Runs ``candidate`` and, on the same batch and start noise, ``reference``; returns the
    candidate's chunk and keeps the largest absolute difference of each chunk and the time."""

    def __init__(self, reference: VLA, candidate: VLA, seed: int = 0) -> None:
        self.reference, self.candidate = reference, candidate
        self.generator = torch.Generator().manual_seed(seed)
        self.errors: list[float] = []
        self.seconds: list[float] = []

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor:
        config = self.reference.config
        noise = torch.randn(len(batch["task"]), config.horizon, config.action_dim, generator=self.generator)
        expected = self.reference.predict_action(batch, noise=noise)
        start = time.perf_counter()
        actions = self.candidate.predict_action(batch, noise=noise)
        self.seconds.append(time.perf_counter() - start)
        self.errors.append((actions - expected).abs().max().item())
        return actions


def candidate(run: Path, mode: str) -> VLA:
    vla, _ = load_policy(run)
    if mode == "fused":
        optimize_for_inference(vla, InferenceOptions(fuse=True))
    elif mode == "fused + int8":
        optimize_for_inference(vla, InferenceOptions(fuse=True, quantize="int8"))
    elif mode == "bfloat16":
        apply_precision(vla, "bfloat16")
    return vla.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the demo's run directory (make demo: runs/demo/run)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--modes", nargs="+", default=["float32", "fused", "fused + int8", "bfloat16"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--update", type=Path, help="markdown file with a <!-- cpu_precision:begin/end --> section")
    args = parser.parse_args(argv)
    reference, _ = load_policy(args.run)
    reference.eval()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu_precision_") as tmp:
        run = Path(tmp) / "run"  # evaluate_run writes eval/ into the run: never into the user's
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("eval", "tensorboard", "*.png"))
        for mode in args.modes:
            shadow = ShadowPredictor(reference, candidate(run, mode))
            results = evaluate_run(run, TASKS, args.episodes, predictor=shadow, predictor_name=mode)
            ordered = sorted(shadow.seconds)
            rows.append({"mode": mode, "success": results["mean"], "per_task": results["per_task"],
                         "chunks": len(shadow.errors), "max_abs_error": max(shadow.errors),
                         "median_abs_error": sorted(shadow.errors)[len(shadow.errors) // 2],
                         "chunk_ms_median": 1e3 * ordered[len(ordered) // 2]})
            print(f"{mode:14s} success {100 * results['mean']:5.1f}%  max error {max(shadow.errors):.2e}  "
                  f"chunk {rows[-1]['chunk_ms_median']:.1f} ms", file=sys.stderr, flush=True)
    native = cpu_native_bf16()
    lines = ["| mode | success (" + f"{args.episodes} x {len(TASKS)} episodes) | action error vs float32, max (median) "
             "| chunk, median |", "| --- | ---: | ---: | ---: |"]
    for row in rows:
        note = " (bf16 emulated: no AMX / AVX512-BF16)" if row["mode"] == "bfloat16" and not native else ""
        lines.append(f"| {row['mode']} | {100 * row['success']:.0f}% | {row['max_abs_error']:.1e} "
                     f"({row['median_abs_error']:.1e}) | {row['chunk_ms_median']:.1f} ms{note} |")
    print("\n".join(lines))
    if args.update:
        replace_section(args.update, "cpu_precision", "\n".join(lines))
    if args.json:
        write_json(args.json, {"run": str(args.run), "native_bf16": native, "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
