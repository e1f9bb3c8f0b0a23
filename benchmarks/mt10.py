"""The MT10 comparison of docs/results.md: train recipes x seeds on the same data and budget,
evaluate each on the held-out layouts, and tabulate success, loss and wall time.

    python benchmarks/mt10.py --data runs/mt10/data --runs runs/mt10 --steps 1500 --seeds 0 1 \
        --recipes mt10_deepfusion mt10_dit_layerwise mt10_hybrid mt10_late_fusion --jobs 2 \
        --update docs/results.md

Each (recipe, seed) is trained with ``vlablocks train`` into ``RUNS/<recipe>_s<seed>_<steps>``,
evaluated with ``vlablocks eval`` (10 episodes per MT10 task by default), and summarised in a
small JSON record under ``--records`` (committed: docs/results/mt10/; the run directories with
their checkpoints are not). A (recipe, seed) with a record is skipped and finished steps are not
redone, so an interrupted comparison resumes where it stopped (a half-trained run resumes from
its latest checkpoint), also across machines that share the records. ``--jobs`` runs that many (train, eval) sequences side by side with
``cores / jobs`` threads each: on a 2-core machine two single-threaded runs finish sooner than two
two-threaded runs in turn. ``--collect`` only tabulates the records. ``--recipes`` also takes
recipe files (the ablations of ``benchmarks/ablations/``, each one change to E1): their runs
and records are named by the file's stem::

    python benchmarks/mt10.py --recipes mt10_deepfusion benchmarks/ablations/*.yaml --seeds 0 \
        --update docs/results.md --section mt10-ablations
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlablocks.tools.bench import machine_description
from vlablocks.io.atomic import replace_section, write_json
from vlablocks.envs.metaworld.tasks import MT10
from vlablocks.train.metrics import METRICS_FILE, read_metrics

log = logging.getLogger("mt10")

RECIPES = ("mt10_deepfusion", "mt10_dit_layerwise", "mt10_hybrid", "mt10_late_fusion")
LABELS = {
    "mt10_deepfusion": "E1 deep fusion",
    "mt10_dit_layerwise": "E2 layerwise DiT",
    "mt10_hybrid": "E3 hybrid",
    "mt10_late_fusion": "late fusion (last-layer DiT)",
    "mt10_deepfusion_goal": "E1 + goal xyz in the state",
    "mt10_e1_uniform_time": "E1, uniform flow times",
    "mt10_e1_quantile_norm": "E1, quantile normalisation",
    "mt10_e1_chunk8": "E1, chunks of 8",
    "mt10_e1_expert64": "E1, 64-wide expert",
    "mt10_e1_state_in_prefix": "E1, state in the prefix",
}


def recipe_label(recipe: str) -> str:
    """A bundled recipe's name, or a recipe file's stem (``benchmarks/ablations/x.yaml`` -> ``x``)."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe


def run_name(recipe: str, seed: int, steps: int) -> str:
    """The name of one (recipe, seed) run of a ``steps`` budget: its directory and record."""
    return f"{recipe_label(recipe)}_s{seed}_{steps}"


def _trained(run: Path, steps: int) -> bool:
    rows = read_metrics(run / METRICS_FILE)
    return bool(rows) and int(rows[-1]["step"]) >= steps and (run / "checkpoints" / "latest").exists()


def _call(command: list[str], log_file: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("MUJOCO_GL", "egl")
    log.info("%s  (log: %s)", " ".join(command), log_file)
    with log_file.open("a") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {code}; see {log_file}")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def make_record(run: Path, recipe: str, seed: int, steps: int, threads: int) -> dict[str, Any]:
    """What docs/results.md needs of a trained and evaluated run: its loss curve, final metrics,
    wall time and success per task (``run/metrics.csv`` and ``run/eval/results.json``)."""
    rows = read_metrics(run / METRICS_FILE)
    evaluation = json.loads((run / "eval" / "results.json").read_text())
    curve_keys = ("step", "loss", "vel_cosine", "grad_total_norm", "guard_hits", "wall_time_s")
    return {
        "recipe": recipe, "seed": seed, "steps": steps, "threads": threads, "commit": _git_commit(),
        "machine": machine_description("cpu") | {"torch_threads": threads},
        "final": rows[-1], "curve": [{k: row[k] for k in curve_keys if k in row} for row in rows],
        "eval": {k: evaluation[k] for k in ("mean", "per_task", "per_bucket", "episodes", "execute_steps", "ema")},
    }


def train_and_eval(recipe: str, seed: int, args: argparse.Namespace, threads: int) -> Path:
    """Train (or resume), evaluate and record one run unless its record exists; the record's path."""
    name = run_name(recipe, seed, args.steps)
    record = Path(args.records) / f"{name}.json"
    if record.is_file():
        return record
    run = Path(args.runs) / name
    run.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "vlablocks.cli"]
    if not _trained(run, args.steps):
        resume = ["--resume"] if (run / "checkpoints" / "latest").exists() else []
        _call([*cli, "train", recipe, "--data", args.data, "--steps", str(args.steps), "--out", str(run),
               *resume, f"train.seed={seed}", *args.override], run / "train.log", threads)
    if not (run / "eval" / "results.json").is_file():
        _call([*cli, "eval", str(run), "--tasks", ",".join(MT10), "--episodes", str(args.episodes),
               "--execute-steps", str(args.execute_steps), "--seed", str(args.eval_seed)], run / "eval.log", threads)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, make_record(run, recipe, seed, args.steps, threads))
    return record


def collect(records: Path, recipes: Sequence[str], seeds: Sequence[int], steps: int) -> dict[str, Any]:
    """Per recipe with at least one record: the runs, and the mean and spread of success over seeds."""
    table: dict[str, Any] = {"steps": steps, "recipes": {}}
    for recipe in recipes:
        runs = {}
        for seed in seeds:
            path = records / f"{run_name(recipe, seed, steps)}.json"
            if path.is_file():
                runs[seed] = json.loads(path.read_text())
        if not runs:
            continue
        success = [r["eval"]["mean"] for r in runs.values()]
        table["recipes"][recipe_label(recipe)] = {
            "seeds": sorted(runs),
            "success": success,
            "success_mean": statistics.fmean(success),
            "success_std": statistics.stdev(success) if len(success) > 1 else None,
            "loss_mean": statistics.fmean(r["final"]["loss"] for r in runs.values()),
            "wall_time_s_mean": statistics.fmean(r["final"]["wall_time_s"] for r in runs.values()),
            "per_task_mean": {task: statistics.fmean(r["eval"]["per_task"][task] for r in runs.values()) for task in MT10},
        }
    return table


def markdown(table: dict[str, Any]) -> str:
    """The comparison table and the per-task table of docs/results.md."""
    recipes = table["recipes"]
    lines = [f"Budget: {table['steps']} optimizer steps per run. Success: % of the held-out episodes per task, "
             "averaged over the 10 tasks; mean +- standard deviation over seeds.", "",
             "| recipe | seeds | success (%) | per seed | final loss | wall time / run |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for recipe, r in recipes.items():
        spread = f" +- {100 * r['success_std']:.1f}" if r["success_std"] is not None else ""
        seeds = ", ".join(f"s{s}: {100 * v:.0f}" for s, v in zip(r["seeds"], r["success"]))
        lines.append(f"| {LABELS.get(recipe, recipe)} (`{recipe}`) | {len(r['seeds'])} | "
                     f"{100 * r['success_mean']:.1f}{spread} | {seeds} | {r['loss_mean']:.3f} | "
                     f"{r['wall_time_s_mean'] / 60:.0f} min |")
    lines += ["", "Success per task (%, mean over seeds):", "",
              "| task | " + " | ".join(LABELS.get(r, r).split(" (")[0] for r in recipes) + " |",
              "| --- |" + " ---: |" * len(recipes)]
    for task in MT10:
        lines.append(f"| {task} | " + " | ".join(f"{100 * r['per_task_mean'][task]:.0f}" for r in recipes.values()) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/mt10/data")
    parser.add_argument("--runs", default="runs/mt10", help="run directories (checkpoints, logs)")
    parser.add_argument("--records", default="docs/results/mt10", help="one JSON record per finished run")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--execute-steps", type=int, default=4)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (threads each: cores / jobs)")
    parser.add_argument("--override", nargs="*", default=[], help="recipe / train overrides for every run")
    parser.add_argument("--collect", action="store_true", help="only tabulate the records")
    parser.add_argument("--update", default=None, help="write the table into this markdown file's --section")
    parser.add_argument("--section", default=None, help="the markdown section to write (default: mt10-STEPS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    if not args.collect:
        if not (Path(args.data) / "meta" / "info.json").is_file():
            parser.error(f"--data {args.data} is not a dataset (no meta/info.json); generate it first (docs/results.md)")
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        jobs = [(recipe, seed) for seed in args.seeds for recipe in args.recipes]
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(train_and_eval, recipe, seed, args, threads) for recipe, seed in jobs]:
                log.info("recorded: %s", future.result())
    table = collect(Path(args.records), args.recipes, args.seeds, args.steps)
    text = markdown(table)
    sys.stdout.write(text + "\n")
    if args.update:
        replace_section(args.update, args.section or f"mt10-{args.steps}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
