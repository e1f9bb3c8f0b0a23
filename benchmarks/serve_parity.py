"""Meta-World evaluation through `vlablocks serve` against the same evaluation in process.

    MUJOCO_GL=egl python benchmarks/serve_parity.py [--run runs/demo/run] [--episodes 10] [--update docs/deployment.md]

The run's policy evaluates its tasks twice with the same seeds: in process, and through a policy
server (the same checkpoint, served on a loopback port by :class:`vlablocks.serve.server.PolicyServer`,
queried by :class:`vlablocks.serve.client.RemotePredictor`). Every action chunk is recorded on
both sides; the table gives the per-episode successes of both and whether every chunk was equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import torch

from vlablocks.envs import eval_env_factory
from vlablocks.eval.policy import ChunkPolicy, RecordingPredictor
from vlablocks.eval.rollout import EvalJob
from vlablocks.io.atomic import replace_section
from vlablocks.serve import default_observation_map
from vlablocks.serve.client import RemotePredictor
from vlablocks.serve.server import PolicyServer, load_for_serving, serving_in_background
from vlablocks.train.checkpoint import load_policy
from vlablocks.train.workflow import DATA_INFO_FILE

TASKS = ("button-press-topdown-v3", "drawer-open-v3", "window-open-v3")
SECTION = "serve-parity"


def episodes(make_env, predict, horizon: int, task: str, count: int, execute: int) -> list[bool]:
    """Per-episode success of ``count`` seeded episodes (as ``vlablocks eval`` runs them)."""
    job = EvalJob(make_env, ChunkPolicy(predict, execute_steps=execute, horizon=horizon), task, range(count), seed=0)
    return [result.success for result in job.run()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo/run")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--execute-steps", type=int, default=4)
    parser.add_argument("--update", default=None)
    args = parser.parse_args(argv)
    policy, checkpoint = load_policy(args.run)
    info = json.loads((Path(args.run) / DATA_INFO_FILE).read_text())
    make_env = eval_env_factory("metaworld", info, image_size=policy.vision.image_size, depth=policy.geometry is not None,
                                seed=0)
    served, _ = load_for_serving(checkpoint)
    rows = ["| task | in process | through the server | every chunk equal |", "| --- | --- | --- | --- |"]
    with serving_in_background(PolicyServer(served, default_observation_map(len(info.get("cameras", [1]))), "demo")) as url:
        remote = RemotePredictor(url)
        for task in TASKS:
            local, through = RecordingPredictor(policy.predict_action), RecordingPredictor(remote)
            a = episodes(make_env, local, policy.config.horizon, task, args.episodes, args.execute_steps)
            b = episodes(make_env, through, policy.config.horizon, task, args.episodes, args.execute_steps)
            same = len(local.chunks) == len(through.chunks) and all(torch.equal(x, y) for x, y in zip(local.chunks, through.chunks))
            rows.append(f"| {task} | {''.join('1' if s else '0' for s in a)} | {''.join('1' if s else '0' for s in b)} | "
                        f"{'yes' if same else 'NO'} ({len(local.chunks)} chunks) |")
        remote.close()
    text = "\n".join(rows)
    sys.stdout.write(text + "\n")
    if args.update:
        replace_section(args.update, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
