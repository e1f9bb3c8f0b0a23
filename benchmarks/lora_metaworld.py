"""A converted LeRobot pi0 fine-tuned on the demo's Meta-World tasks: LoRA against full fine-tuning.

    MUJOCO_GL=egl python benchmarks/lora_metaworld.py [--data runs/demo/data] [--steps 1500] [--update docs/training.md]

1. ``vlablocks convert lerobot`` on the tiny pi0 LeRobot wrote (``tests/data/lerobot_policies/pi0``:
   LeRobot 0.6.1's own classes, random weights: the only pi0 these machines can load, since
   released weights cannot be downloaded here), with its tokenizer;
2. ``vlablocks train CONVERTED --data DATA`` once per mode (``train.finetune=lora``: rank-16
   adapters on every linear of both experts, every base weight frozen; ``full``), the same data,
   steps, batch and seed; the loss curves are each run's ``metrics.csv`` / ``curves.png``;
3. ``vlablocks eval`` on held-out layouts, success per task.

The dataset is the demo's (``make demo`` writes it to ``runs/demo/data``: three tasks, 50
scripted episodes each, 96 px corner camera, hand position + gripper as the state); the policy
resizes the frames to its 32 px with LeRobot's resize-with-pad. Prints a table; ``--update``
writes it into the ``lora-metaworld`` section of a Markdown file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vlablocks.convert.lerobot import convert_lerobot
from vlablocks.eval.run import evaluate_run
from vlablocks.io.atomic import replace_section, write_json
from vlablocks.train.metrics import read_metrics
from vlablocks.train.workflow import train_from_recipe

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "lerobot_policies"
TASKS = ("button-press-topdown-v3", "drawer-open-v3", "window-open-v3")
#: mode -> training overrides
MODES = {
    "lora": ["train.finetune=lora", "train.lora.rank=16", "train.lora.alpha=16.0", "train.lr=2e-3"],
    "full": ["train.finetune=full", "train.lr=1e-3"],
}
SECTION = "lora-metaworld"


def run_mode(mode: str, converted: Path, data: Path, out: Path, steps: int, batch: int, episodes: int) -> dict:
    overrides = [*MODES[mode], f"train.batch_size={batch}", "train.warmup_steps=100", "train.log_every=25",
                 f"train.save_every={steps}", "train.seed=0"]
    start = time.perf_counter()
    run = train_from_recipe(converted, data, out=out / mode, overrides=overrides, steps=steps)
    train_s = time.perf_counter() - start
    rows = read_metrics(run.out_dir / "metrics.csv")
    losses = [float(r["loss"]) for r in rows]
    results = evaluate_run(run.out_dir, tasks=list(TASKS), episodes=episodes, execute_steps=4, use_ema=False)
    return {"mode": mode, "steps": steps, "batch": batch, "train_s": round(train_s, 1),
            "loss_first": losses[0], "loss_last": losses[-1], "loss_min": min(losses),
            "per_task": results["per_task"], "mean": results["mean"],
            "episodes": episodes, "run": str(run.out_dir)}


def table(rows: list[dict]) -> str:
    lines = ["| mode | steps x batch | loss first -> last logged | " + " | ".join(TASKS) + " | mean | train time |",
             "| --- | --- | --- | " + " | ".join("---" for _ in TASKS) + " | --- | --- |"]
    for r in rows:
        tasks = " | ".join(f"{r['per_task'][t]:.0%}" for t in TASKS)
        lines.append(f"| {r['mode']} | {r['steps']} x {r['batch']} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
                     f"{tasks} | {r['mean']:.0%} | {r['train_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/demo/data", help="the demo's dataset (make demo writes it)")
    parser.add_argument("--out", default="runs/lora_metaworld")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per task (held-out layouts)")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--update", default=None, help="rewrite the table in this Markdown file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    converted = out / "converted"
    if not converted.exists():
        convert_lerobot(FIXTURE / "pi0", converted, tokenizer=FIXTURE / "tokenizer",
                        overrides=["vision.config.num_attention_heads=2"])
    rows = [run_mode(mode, converted, Path(args.data), out, args.steps, args.batch, args.episodes)
            for mode in args.modes.split(",")]
    write_json(out / "results.json", rows)
    text = table(rows)
    sys.stdout.write(text + "\n")
    if args.update:
        replace_section(args.update, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
