"""Action execution strategies under inference delay: sync, async, real-time chunking, ensembling.

    MUJOCO_GL=egl python benchmarks/strategies.py [--run runs/demo/run] [--strategies sync async rtc ensemble]
        [--delays 0 2 4 8] [--episodes 5] [--execute-steps 8] [--update docs/FILE.md] [--json OUT.json]

For a trained run (default: ``make demo``'s, horizon 16) on its Meta-World tasks, each strategy of
:mod:`vlablocks.eval.policy` runs at each simulated inference delay ``d`` (control steps):

- ``sync``: execute ``s`` actions, then infer while the robot waits (the simulator does not step
  meanwhile, so ``d`` only adds waiting: same success, same jerk);
- ``async``: request the next chunk after ``s`` actions; it arrives ``d`` steps later, its first
  ``d`` actions dropped (needs ``d <= s <= H - d``);
- ``rtc``: ``async`` with real-time chunking (guided inpainting of the queued actions, ``--beta``);
- ``ensemble``: ACT's temporal ensembling, a chunk every step (``--m``), predictions ``d`` steps late.

Columns: success per task and mean; the mean action jump ``||a_t - a_{t-1}||_2`` (raw action
units) at chunk boundaries and within chunks, pooled over every step of every episode
(:func:`vlablocks.eval.policy.action_jumps`); model calls and waited steps per episode; wall
time. Combinations a strategy cannot run (``async`` / ``rtc`` with ``d > s`` or ``s + d > H``)
are listed as such. Prints a Markdown table; ``--update FILE`` writes it between
``<!-- strategies:begin -->`` and ``<!-- strategies:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import torch

from vlablocks.envs import eval_env_factory
from vlablocks.eval.policy import (
    AsyncChunkPolicy,
    ChunkPolicy,
    GuidedVLAPredictor,
    RealTimeChunkPolicy,
    TemporalEnsemblePolicy,
    action_jumps,
)
from vlablocks.eval.rollout import evaluate
from vlablocks.io.atomic import replace_section, write_json
from vlablocks.train.checkpoint import load_policy
from vlablocks.train.workflow import DATA_INFO_FILE

TASKS = ("button-press-topdown-v3", "drawer-open-v3", "window-open-v3")  # the demo's
STRATEGY_NAMES = ("sync", "async", "rtc", "ensemble")
SECTION = "strategies"


@dataclass
class Recorder:
    """Forwards a strategy's ``reset`` / ``select_action`` and keeps each finished episode's
    action jumps (boundary, within), model calls and waits (from the strategy's ``log``)."""

    policy: Any
    at: list[torch.Tensor] = field(default_factory=list)
    within: list[torch.Tensor] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    waits: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.flush()
        self.policy.reset()

    def select_action(self, batch: Any) -> torch.Tensor:
        return self.policy.select_action(batch)

    def flush(self) -> None:
        log = self.policy.log
        if log.actions:
            at, within = action_jumps(torch.stack(log.actions).cpu(), log.boundaries)
            self.at.append(at)
            self.within.append(within)
            self.chunks.append(log.chunks)
            self.waits.append(log.waits)
            self.policy.reset()  # an episode is flushed once

    def summary(self) -> dict[str, float]:
        self.flush()
        mean = lambda parts: float(torch.cat(parts).mean()) if parts and torch.cat(parts).numel() else None  # no such step
        episodes = max(len(self.chunks), 1)
        return {"jerk_boundary": mean(self.at), "jerk_within": mean(self.within),
                "chunks_per_episode": sum(self.chunks) / episodes, "waits_per_episode": sum(self.waits) / episodes}


def make_strategy(name: str, vla: Any, delay: int, args: argparse.Namespace) -> Any:
    """The strategy ``name`` over ``vla`` at ``delay``, or a string saying why it cannot run."""
    horizon, s = vla.config.horizon, args.execute_steps
    if name == "sync":
        return ChunkPolicy(vla.predict_action, execute_steps=s, horizon=horizon, delay=delay)
    if name == "ensemble":
        if delay >= horizon:
            return f"needs d < H = {horizon}"
        return TemporalEnsemblePolicy(vla.predict_action, horizon=horizon, delay=delay, m=args.m)
    if not max(1, delay) <= s <= horizon - delay:
        return f"needs d <= s <= H - d (s = {s}, H = {horizon})"
    if name == "async":
        return AsyncChunkPolicy(vla.predict_action, execute_steps=s, horizon=horizon, delay=delay)
    return RealTimeChunkPolicy(GuidedVLAPredictor(vla, beta=args.beta), execute_steps=s, horizon=horizon, delay=delay)


def _jump(value: float | None) -> str:
    return "- (every step is one)" if value is None else f"{value:.4f}"


def table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    lines = ["| strategy | d | " + " | ".join(tasks) + " | mean | jump at boundary | jump within | "
             "calls / episode | waits / episode | time |",
             "| --- | --- | " + " | ".join("---" for _ in tasks) + " | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['strategy']} | {row['delay']} | " + " | ".join("" for _ in tasks)
                         + f" | {row['skipped']} | | | | | |")
            continue
        cells = " | ".join(f"{100 * row['per_task'][t]:.0f}%" for t in tasks)
        lines.append(f"| {row['strategy']} | {row['delay']} | {cells} | {100 * row['mean']:.0f}% | "
                     f"{_jump(row['jerk_boundary'])} | {_jump(row['jerk_within'])} | {row['chunks_per_episode']:.1f} | "
                     f"{row['waits_per_episode']:.1f} | {row['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo/run", help="a trained run directory (checkpoints/, data.json)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGY_NAMES, default=list(STRATEGY_NAMES))
    parser.add_argument("--delays", nargs="+", type=int, default=[0, 2, 4, 8], help="inference delays d, control steps")
    parser.add_argument("--episodes", type=int, default=5, help="held-out episodes per task")
    parser.add_argument("--execute-steps", type=int, default=8, help="s: actions executed per chunk (not ensemble)")
    parser.add_argument("--beta", type=float, default=5.0, help="rtc: the guidance-weight clip")
    parser.add_argument("--m", type=float, default=0.01, help="ensemble: weights exp(-m i), i = 0 the oldest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw weights, not the EMA")
    parser.add_argument("--update", type=Path, help="write the table into this Markdown file's strategies section")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    run = Path(args.run)
    vla, checkpoint = load_policy(run, not args.no_ema, True)
    info_path = run / DATA_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    make_env = eval_env_factory("metaworld", info, image_size=vla.vision.image_size if vla.vision is not None else None,
                                depth=vla.geometry is not None, seed=args.seed)
    print(f"{checkpoint}: horizon {vla.config.horizon}, s = {args.execute_steps}, {args.episodes} episodes x "
          f"{len(args.tasks)} tasks", file=sys.stderr)
    rows = []
    for name in args.strategies:
        for delay in args.delays:
            strategy = make_strategy(name, vla, delay, args)
            if isinstance(strategy, str):
                rows.append({"strategy": name, "delay": delay, "skipped": strategy})
                continue
            recorder = Recorder(strategy)
            start = time.perf_counter()
            results = evaluate(make_env, recorder, args.tasks, args.episodes, seed=args.seed)
            row = {"strategy": name, "delay": delay, "execute_steps": args.execute_steps,
                   "per_task": results["per_task"], "mean": results["mean"], "episodes": args.episodes,
                   **recorder.summary(), "seconds": time.perf_counter() - start}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    text = table(rows, args.tasks)
    notes = (f"\n\n{checkpoint}, horizon H = {vla.config.horizon}, s = {args.execute_steps} actions per chunk, "
             f"{args.episodes} episodes per task, seed {args.seed}; rtc beta = {args.beta}, ensemble m = {args.m}. "
             "Jumps: mean ||a_t - a_(t-1)||_2 in raw action units.")
    print(text + notes)
    if args.update:
        replace_section(args.update, SECTION, text + notes)
    if args.json:
        write_json(args.json, {"rows": rows, "checkpoint": str(checkpoint), "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
