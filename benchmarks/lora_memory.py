"""Peak training memory of one step per fine-tuning mode (full, expert_only, lora), side by side.

    python benchmarks/lora_memory.py                          # mid_pi0, CPU fp32, batch 4
    python benchmarks/lora_memory.py --recipe pi0 --device cuda --dtype bf16 --batch 8
    python benchmarks/lora_memory.py --update docs/training.md    # also rewrite the table there

Each mode runs in a fresh process as ``vlablocks bench`` measures memory
(:mod:`vlablocks.tools.memory`): on the CPU the peak resident set of one loss + backward + AdamW
step (after one untimed step, so the optimizer state exists) less the process's size before the
model was built; on CUDA ``torch.cuda.max_memory_allocated``. The mode is applied exactly as the
trainer does (:func:`vlablocks.train.groups.apply_finetune`). The median step time of the timed
steps is in the JSON line printed last (not in the table: on a shared machine it is noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from vlablocks.io.atomic import replace_section
from vlablocks.tools.bench_setup import BenchSettings, build_for_bench, make_train_step
from vlablocks.tools.memory import reset_peak, status_mib
from vlablocks.train.config import TrainConfig
from vlablocks.train.groups import apply_finetune

#: row name -> (train.finetune, train.lora.experts; None: every expert)
MODES: dict[str, tuple[str, list[str] | None]] = {
    "full": ("full", None), "expert_only": ("expert_only", None), "lora": ("lora", None), "lora_action": ("lora", ["action"]),
}
SECTION = "lora-memory"


def probe(mode: str, recipe: str, settings: BenchSettings, lora_rank: int) -> dict[str, float]:
    """This process: build, apply ``mode``, one untimed step, then the peak of timed steps."""
    device = settings.device
    reset_peak(device)
    libraries = 0.0 if device == "cuda" else status_mib("VmRSS")
    vla = build_for_bench(recipe, (), settings.seed, device)
    finetune, experts = MODES[mode]
    lora = {"lora": {"rank": lora_rank, "alpha": float(lora_rank), "experts": experts}} if finetune == "lora" else {}
    apply_finetune(vla, TrainConfig(finetune=finetune, **lora))
    trainable = sum(p.numel() for p in vla.parameters() if p.requires_grad)
    total = sum(p.numel() for p in vla.parameters())
    step = make_train_step(vla, settings)
    step()
    reset_peak(device)
    times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else status_mib("VmHWM") - libraries
    return {"peak_mib": peak, "step_ms": 1000 * sorted(times)[len(times) // 2], "trainable": trainable, "total": total}


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """:func:`probe` in a fresh process (its peak resident set is this mode's alone)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back to the system at once
    command = [sys.executable, __file__, "--recipe", args.recipe, "--device", args.device, "--dtype", args.dtype,
               "--batch", str(args.batch), "--repeats", str(args.repeats), "--lora-rank", str(args.lora_rank),
               "--probe", mode]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        raise RuntimeError(f"probe {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mid_pi0")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=4, help="samples per training step")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the untimed one")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--update", default=None, help="rewrite the table between the lora-memory markers of this file")
    parser.add_argument("--probe", choices=list(MODES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = BenchSettings(device=args.device, dtype=args.dtype, train_batch=args.batch, repeats=args.repeats)
    if args.probe is not None:
        sys.stdout.write(json.dumps(probe(args.probe, args.recipe, settings, args.lora_rank)) + "\n")
        return
    rows = {mode: run_mode(mode, args) for mode in MODES}
    table = format_table(rows)
    sys.stdout.write(f"{args.recipe}, {args.device} {args.dtype}, batch {args.batch}, LoRA rank {args.lora_rank}: "
                     f"peak memory of one training step\n\n{table}\n")
    sys.stdout.write(json.dumps({"settings": asdict(settings), "rows": rows}) + "\n")
    if args.update:
        replace_section(args.update, SECTION, table)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The markdown table of the modes' peak memory (``lora_action``: adapters on the action expert only)."""
    lines = ["| mode | trainable parameters | peak memory | vs full |", "|---|---:|---:|---:|"]
    full = rows["full"]["peak_mib"]
    for mode, row in rows.items():
        share = row["trainable"] / row["total"]
        lines.append(f"| `{mode}` | {row['trainable']:,.0f} ({share:.1%}) | {row['peak_mib']:,.0f} MiB | "
                     f"{row['peak_mib'] / full:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
