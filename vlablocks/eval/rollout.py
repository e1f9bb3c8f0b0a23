"""Closed-loop rollouts of any :class:`~vlablocks.eval.protocol.Policy` in any
:class:`~vlablocks.eval.protocol.Env`, and success rates over tasks and episodes.

Reproducibility: episode ``i`` of a task starts from torch's global seed ``seed * 1000 + i`` in a
forked RNG (the caller's random stream is left alone), so its outcome depends only on the
policy, the task, the episode and ``seed``, not on the order or on the number of workers.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlablocks.eval.pool import run_jobs, split_episodes
from vlablocks.eval.protocol import Env, EnvFactory, Observation, Policy
from vlablocks.eval.video import write_video


@dataclass
class Episode:
    """One rollout: ``success``, the ``frames`` for people (``[H, W, 3]`` each, with ``video``)
    and, with ``keep_steps``, each ``(observation, action [A])`` pair executed."""

    success: bool
    length: int
    frames: list[np.ndarray] = field(default_factory=list)
    steps: list[tuple[Observation, np.ndarray]] = field(default_factory=list)


def rollout(
    env: Env,
    policy: Policy,
    episode: int,
    video: bool = False,
    keep_steps: bool = False,
    observe: Callable[[Observation], Mapping[str, Any]] | None = None,
) -> Episode:
    """Run episode ``episode`` of ``env`` until done: ``policy.select_action(observe(observation))``
    each step, ``observe`` being ``env.to_batch`` unless given (e.g. the raw observation for a
    scripted expert)."""
    observe = observe or env.to_batch
    observation = env.reset(episode)
    policy.reset()
    result = Episode(success=False, length=0, frames=[env.frame(observation)] if video else [])
    done = False
    while not done:
        action = _as_action(policy.select_action(observe(observation)), env)
        if keep_steps:
            result.steps.append((observation, action))
        observation, result.success, done = env.step(action)
        result.length += 1
        if video:
            result.frames.append(env.frame(observation))
    return result


def _as_action(action: torch.Tensor | np.ndarray, env: Env) -> np.ndarray:
    if isinstance(action, torch.Tensor):
        action = action.detach().float().cpu().numpy()
    action = np.asarray(action)
    if action.shape != (env.action_dim,):
        raise ValueError(f"{env.task}: the policy's action must be [{env.action_dim}]; got shape {list(action.shape)}")
    return action


@dataclass(frozen=True)
class EpisodeResult:
    """The outcome of one evaluated episode (``video``: its file, if written)."""

    task: str
    episode: int
    success: bool
    bucket: str | None
    video: Path | None = None


@dataclass(frozen=True)
class EvalJob:
    """Episodes ``episodes`` of ``task``, each seeded ``seed * 1000 + episode`` (a pool job)."""

    make_env: EnvFactory
    policy: Policy
    task: str
    episodes: range
    seed: int
    video_dir: Path | None = None

    def run(self) -> Iterator[EpisodeResult]:
        """One :class:`EpisodeResult` per episode; videos ``<task>_<episode>_<success|failure>`` written here."""
        with self.make_env(self.task) as env:
            for index in self.episodes:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed * 1000 + index)
                    episode = rollout(env, self.policy, index, video=self.video_dir is not None)
                path = None
                if self.video_dir is not None:
                    outcome = "success" if episode.success else "failure"
                    path = write_video(episode.frames, self.video_dir / f"{self.task}_{index:02d}_{outcome}", env.fps)
                yield EpisodeResult(self.task, index, episode.success, env.bucket, path)


def evaluate(
    make_env: EnvFactory,
    policy: Policy,
    tasks: Sequence[str],
    episodes: int,
    seed: int = 0,
    video_dir: str | Path | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Success rates of ``policy`` on episodes ``0 .. episodes - 1`` of each task.

    ``workers`` processes give the same results (``make_env`` and ``policy`` must then be
    picklable: e.g. a :class:`~vlablocks.eval.policy.ChunkPolicy` over
    :class:`vlablocks.eval.run.CheckpointPolicy`, which ships only a checkpoint path).
    Returns :func:`summarize`'s dict. With ``video_dir``, one video per episode,
    ``<task>_<episode>_<success|failure>.mp4`` (``.gif`` without imageio-ffmpeg).
    """
    tasks = list(tasks)
    make_env.check(tasks, episodes)
    if workers != 1:
        _check_picklable(policy, make_env, workers)
    video_path = None if video_dir is None else Path(video_dir)
    if video_path is not None:
        video_path.mkdir(parents=True, exist_ok=True)
    jobs = [EvalJob(make_env, policy, task, part, seed, video_path) for task, part in split_episodes(tasks, episodes, workers)]
    results: list[EpisodeResult] = []
    with tqdm(total=len(tasks) * episodes, desc="evaluate", unit="episode") as bar:
        for job, outcomes in zip(jobs, run_jobs(jobs, workers, bar)):
            results.extend(outcomes)
            done = [r.success for r in results if r.task == job.task]
            bar.set_postfix(last=f"{job.task} {sum(done) / len(done):.0%} so far")
    return summarize(results, tasks, episodes, make_env.buckets)


def summarize(
    results: Sequence[EpisodeResult], tasks: Sequence[str], episodes: int, bucket_order: Sequence[str] = ()
) -> dict[str, Any]:
    """Episode outcomes -> ``{"per_task": {task: rate}, "per_bucket": {bucket: mean rate of its
    tasks}, "mean": mean over tasks, "episodes": episodes, "task_buckets": {task: bucket}}``.

    Buckets come from the environments (tasks without one are in no bucket), listed in
    ``bucket_order`` and then in order of appearance; ``per_bucket`` and ``task_buckets`` are
    empty when no task has a bucket.
    """
    per_task = {task: sum(r.success for r in results if r.task == task) / episodes for task in tasks}
    task_buckets = {r.task: r.bucket for r in results if r.bucket is not None}
    seen = list(dict.fromkeys(task_buckets[task] for task in tasks if task in task_buckets))
    order = [b for b in bucket_order if b in seen] + [b for b in seen if b not in bucket_order]
    per_bucket = {
        bucket: float(np.mean([rate for task, rate in per_task.items() if task_buckets.get(task) == bucket]))
        for bucket in order
    }
    mean = float(np.mean(list(per_task.values())))
    return {"per_task": per_task, "per_bucket": per_bucket, "mean": mean, "episodes": episodes,
            "task_buckets": {task: task_buckets[task] for task in tasks if task in task_buckets}}


def _check_picklable(policy: Policy, make_env: EnvFactory, workers: int) -> None:
    for name, value in (("policy", policy), ("make_env", make_env)):
        try:
            pickle.dumps(value)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise ValueError(
                f"{name} must be picklable with workers={workers} (got {value!r}: {error}); pass a module-level "
                "callable, ChunkPolicy(vlablocks.eval.run.CheckpointPolicy(checkpoint_dir)), or use workers=1"
            ) from error
