"""``vlablocks eval``: closed-loop evaluation of a trained run; writes ``RUN/eval/results.json``
(and videos) and formats the success table.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlablocks.envs import eval_env_factory
from vlablocks.eval.policy import ChunkPredictor, GuidedVLAPredictor, TemporalEnsemblePolicy, get_strategy
from vlablocks.eval.protocol import Policy
from vlablocks.eval.rollout import evaluate
from vlablocks.eval.video import VIDEO_SIZE
from vlablocks.io.atomic import write_json
from vlablocks.policy.vla import VLA
from vlablocks.train.checkpoint import EMA_FILE, load_policy
from vlablocks.train.workflow import DATA_INFO_FILE

logger = logging.getLogger(__name__)

DEFAULT_EXECUTE_STEPS = 8  # actions executed per chunk when not given (at most the policy's horizon)


@functools.lru_cache(maxsize=2)
def _loaded_policy(checkpoint: Path, use_ema: bool, verify: bool) -> VLA:
    return load_policy(checkpoint, use_ema, verify)[0]


@dataclass(frozen=True)
class CheckpointPolicy:
    """A picklable chunk predictor for rollout workers: ``batch -> predict_action(batch) [1, H, A]``.

    Only the checkpoint path travels to a worker; each process loads the policy once (cached).
    """

    checkpoint: Path
    use_ema: bool = True
    verify: bool = True

    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return _loaded_policy(self.checkpoint, self.use_ema, self.verify).predict_action(batch)


def execution_policy(strategy: str, predict: Any, execute_steps: int, horizon: int, delay: int) -> Policy:
    """The chunk-executing policy of ``strategy`` (``ensemble`` infers every step: no ``execute_steps``)."""
    cls = get_strategy(strategy)
    if cls is TemporalEnsemblePolicy:
        return cls(predict, horizon=horizon, delay=delay)
    return cls(predict, execute_steps=execute_steps, horizon=horizon, delay=delay)


def evaluate_run(
    run: str | Path,
    tasks: Sequence[str],
    episodes: int,
    execute_steps: int | None = None,
    video: bool = False,
    use_ema: bool = True,
    seed: int = 0,
    workers: int = 1,
    env: str = "metaworld",
    video_size: int = VIDEO_SIZE,
    verify: bool = True,
    predictor: ChunkPredictor | None = None,
    predictor_name: str = "in-process",
    strategy: str = "sync",
    delay: int = 0,
) -> dict[str, Any]:
    """Closed-loop evaluation of a run in environment ``env``; writes ``eval/results.json`` (and videos).

    The policy executes ``execute_steps`` actions of each chunk (``None``: 8, or the policy's
    horizon if shorter; a value above the horizon is an error). ``workers``
    rollout processes each get a copy of the policy; the results do not depend on it. The
    environment's settings (camera, image size, state layout, ...) come from the run's
    ``data.json`` (:func:`vlablocks.envs.eval_env_factory`); videos are ``video_size`` px.
    ``verify=False`` loads a checkpoint without a manifest (see :func:`~vlablocks.recipes.from_pretrained`).
    ``predictor``: where the action chunks come from instead of the run's policy (e.g. a policy
    server's client, :class:`vlablocks.serve.client.RemotePredictor`); the run still gives the
    environment's settings, the horizon and the image size; ``predictor_name`` (e.g. the server's
    URL) is recorded in the results as ``predictor``. ``strategy`` (``sync``, ``async``, ``rtc``,
    ``ensemble``; :mod:`vlablocks.eval.policy`) executes the chunks under a simulated inference
    delay of ``delay`` control steps; ``rtc`` samples in process with
    :class:`~vlablocks.eval.policy.GuidedVLAPredictor` (a ``predictor`` given must take
    ``(batch, previous, delay)``, as the server's client does).
    """
    run = Path(run)
    policy, checkpoint = load_policy(run, use_ema, verify)
    info_path = run / DATA_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    make_env = eval_env_factory(
        env, info, image_size=policy.vision.image_size if policy.vision is not None else None,
        depth=policy.geometry is not None, seed=seed, video_size=video_size,
    )
    if execute_steps is None:
        execute_steps = min(DEFAULT_EXECUTE_STEPS, policy.config.horizon)
    if predictor is not None:
        predict = predictor
    elif strategy == "rtc":
        predict = GuidedVLAPredictor(policy)
    else:
        predict = policy.predict_action if workers == 1 else CheckpointPolicy(checkpoint, use_ema, verify)
    act = execution_policy(strategy, predict, execute_steps, policy.config.horizon, delay)
    eval_dir = run / "eval"
    results = evaluate(make_env, act, tasks, episodes, seed=seed, video_dir=eval_dir / "videos" if video else None,
                       workers=workers)
    ema = use_ema and (checkpoint / EMA_FILE).is_file()  # what was evaluated, not what was asked for
    results = {**results, "checkpoint": str(checkpoint), "execute_steps": execute_steps, "ema": ema, "env": env,
               **make_env.describe(), "predictor": predictor_name, "strategy": strategy, "delay": delay}
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(eval_dir / "results.json", results)
    return results


def format_results(results: Mapping[str, Any]) -> str:
    """A text table: success per task (with its difficulty bucket), per bucket, and the mean."""
    buckets = results.get("task_buckets", {})
    lines = [f"{'task':34s} {'bucket':10s} {'success':>8s}"]
    for task, rate in results["per_task"].items():
        lines.append(f"{task:34s} {buckets.get(task, '?'):10s} {100 * rate:7.1f}%")
    for bucket, rate in results["per_bucket"].items():
        lines.append(f"{'bucket ' + bucket:45s} {100 * rate:7.1f}%")
    lines.append(f"{'mean over tasks':45s} {100 * results['mean']:7.1f}%   ({results['episodes']} episodes per task)")
    return "\n".join(lines)
