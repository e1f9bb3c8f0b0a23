"""``make demo``: a deep-fusion VLA learns Meta-World tasks on a CPU, end to end.

1. data: scripted-expert demos of three tasks (RGB + depth + intrinsics + state + instruction)
   in the LeRobot layout (skipped when the dataset is already there);
2. train: ``tiny_llava3d_deepfusion`` (conv-net vision, LLaVA-3D geometry from depth, byte-level
   text, state token, deep-fusion action expert) with its recipe's ``train:`` settings;
3. eval: closed-loop rollouts on held-out layouts, success per task, videos;
4. a results table, and where the loss plot, the checkpoint and the videos are.

    python -m vlablocks.demo [--out runs/demo] [--steps N] [--episodes N] [--eval-episodes N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from vlablocks.eval.run import evaluate_run, format_results
from vlablocks.recipes.builder import build
from vlablocks.train.checkpoint import EMA_FILE
from vlablocks.train.workflow import train_from_recipe

logger = logging.getLogger("vlablocks.demo")

TASKS = ("button-press-topdown-v3", "drawer-open-v3", "window-open-v3")
RECIPE = "tiny_llava3d_deepfusion"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def dataset_ready(path: Path, tasks: tuple[str, ...], episodes: int, image_size: int) -> bool:
    """Whether ``path`` already holds the demo dataset (same tasks, episode count and image size)."""
    info_path = path / "meta" / "info.json"
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    shapes = [f.get("shape") for name, f in info.get("features", {}).items() if name.startswith("observation.images.")]
    return info.get("total_episodes") == len(tasks) * episodes and bool(shapes) and shapes[0][0] == image_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="where the dataset, the run and the videos go")
    parser.add_argument("--episodes", type=int, default=50, help="expert demonstrations per task")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's train.steps)")
    parser.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes per task")
    parser.add_argument("--execute-steps", type=int, default=4, help="actions executed per predicted chunk")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="simulator processes for data and evaluation")
    args = parser.parse_args(argv)
    workers = args.workers
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from vlablocks.envs.metaworld.demos import generate_demos  # optional: the sim extra (metaworld, mujoco)

    out = Path(args.out)
    image_size = build(RECIPE, device="meta").vision.image_size
    data = out / "data"
    timings = {}
    start = time.perf_counter()
    if dataset_ready(data, TASKS, args.episodes, image_size):
        _say(f"[1/3] dataset: reusing {data}")
    else:
        _say(f"[1/3] dataset: {args.episodes} expert demos x {len(TASKS)} tasks at {image_size} px with depth -> {data}")
        generate_demos(TASKS, args.episodes, data, image_size=image_size, depth=True, overwrite=True, workers=workers)
    timings["data"] = time.perf_counter() - start

    start = time.perf_counter()
    _say(f"[2/3] training {RECIPE} (RGB + depth geometry + text + state) -> {out / 'run'}")
    run = train_from_recipe(RECIPE, data, out=out / "run", steps=args.steps, move_aside=True)  # an earlier run is kept
    timings["train"] = time.perf_counter() - start

    start = time.perf_counter()
    _say(f"[3/3] evaluating {args.eval_episodes} held-out layouts per task")
    use_ema = (run.checkpoint / EMA_FILE).is_file()  # the recipe decides whether the run keeps an EMA
    results = evaluate_run(run.out_dir, TASKS, args.eval_episodes, execute_steps=args.execute_steps, video=True,
                           use_ema=use_ema, workers=workers)
    timings["eval"] = time.perf_counter() - start

    _say("")
    _say(format_results(results))
    _say("")
    _say("time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items())
         + f" (total {sum(timings.values()) / 60:.1f} min)")
    _say(f"loss curves:  {run.out_dir / 'curves.png'}")
    _say(f"metrics:      {run.out_dir / 'metrics.csv'}")
    _say(f"checkpoint:   {run.checkpoint}")
    _say(f"videos:       {run.out_dir / 'eval' / 'videos'}")
    _say(f"results:      {run.out_dir / 'eval' / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
