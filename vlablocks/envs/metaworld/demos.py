"""Scripted-expert demonstrations written as a LeRobot dataset (:mod:`vlablocks.data`).

Each task's training layouts are rolled out with Meta-World's scripted expert as the policy,
through the evaluation's rollout loop (:func:`vlablocks.eval.rollout.rollout`) and process pool
(:mod:`vlablocks.eval.pool`): the dataset is the same for any number of workers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vlablocks.data import DatasetWriter, camera_columns
from vlablocks.envs.metaworld.env import RAW_STATE, MetaWorldEnvFactory, expert_policy
from vlablocks.envs.metaworld.tasks import ACTION_DIM, FPS, MAX_STEPS, STATE_LAYOUTS, check_state
from vlablocks.eval.pool import run_jobs, split_episodes
from vlablocks.eval.rollout import rollout

logger = logging.getLogger(__name__)


class ExpertPolicy:
    """Meta-World's scripted expert as a :class:`vlablocks.eval.protocol.Policy`: it reads the raw
    observation (``raw_state [39]``, float64, as the expert was written for), not a policy batch."""

    def __init__(self, task: str) -> None:
        self._expert = expert_policy(task)

    def reset(self) -> None:
        """The expert keeps no memory."""

    def select_action(self, observation: Mapping[str, Any]) -> np.ndarray:
        """``action [4]`` float32 from ``observation["raw_state"]``."""
        with warnings.catch_warnings():  # the scripted policies warn about their own gains
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
            return self._expert(observation[RAW_STATE])


@dataclass(frozen=True)
class DemoJob:
    """Expert episodes on ``layouts`` of ``task`` (a pool job): ``(frames or None if it failed, instruction)`` each."""

    make_env: MetaWorldEnvFactory
    task: str
    layouts: range

    def run(self) -> Iterator[tuple[dict[str, np.ndarray] | None, str]]:
        columns = camera_columns(self.make_env.camera)
        expert = ExpertPolicy(self.task)
        with self.make_env(self.task) as env:
            for layout in self.layouts:
                episode = rollout(env, expert, layout, keep_steps=True, observe=lambda observation: observation)
                if not episode.success:
                    yield None, env.instruction
                    continue
                observations = [observation for observation, _ in episode.steps]
                frames = {
                    "observation.state": np.stack([o["state"] for o in observations]),
                    "action": np.stack([action for _, action in episode.steps]),
                    columns["image"]: np.stack([o["image"] for o in observations]),
                    columns["intrinsics"]: np.stack([o["intrinsics"] for o in observations]),
                    columns["cam_to_world"]: np.stack([o["cam_to_world"] for o in observations]),
                }
                if self.make_env.depth:
                    frames[columns["depth"]] = np.stack([o["depth"] for o in observations])
                yield frames, env.instruction


def generate_demos(
    tasks: Sequence[str],
    episodes_per_task: int,
    out: str | Path,
    image_size: int = 128,
    camera: str = "corner",
    depth: bool = False,
    seed: int = 0,
    max_steps: int = MAX_STEPS,
    overwrite: bool = False,
    workers: int = 1,
    state: str = "proprio",
    video: bool = False,
    version: str = "v3.0",
) -> Path:
    """Scripted-expert demos on training layouts ``0 .. episodes_per_task - 1`` of each task -> a LeRobot dataset.

    Only successful episodes are kept (failures are logged). Each frame holds the observation
    and the expert's action taken from it; an episode ends with the action that reached success.
    Features: ``observation.state [S]`` (the :data:`~vlablocks.envs.metaworld.tasks.STATE_LAYOUTS`
    entry ``state``, its names in ``meta/info.json``), ``action [4]``, the camera's image,
    intrinsics, pose and (with ``depth``) depth; fps 80, robot_type ``sawyer``, the task's
    instruction as its task. ``video`` stores the camera as AV1 mp4 (LeRobot's default) instead
    of PNG frames; ``version`` is the format (``"v3.0"`` or ``"v2.1"``). ``workers`` processes
    simulate in parallel; the dataset is the same for any number. Every argument is checked before ``out`` is touched; ``overwrite`` replaces
    a dataset only once the new one is complete (:class:`~vlablocks.data.writer.DatasetWriter`).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1; got {image_size}")
    if video and image_size % 2:
        raise ValueError(f"image_size must be even to store video (yuv420p); got {image_size}")
    make_env = MetaWorldEnvFactory(image_size=image_size, camera=camera, depth=depth, seed=seed, train=True,
                                   max_steps=max_steps, state=state)
    make_env.check(tasks, episodes_per_task)
    tasks = list(tasks)
    jobs = [DemoJob(make_env, task, layouts) for task, layouts in split_episodes(tasks, episodes_per_task, workers)]
    # every argument is checked above (the factory: camera, state, steps; check: tasks, episodes; split: workers)
    writer = DatasetWriter(
        out, fps=FPS, cameras=[camera], state_dim=len(check_state(state)), action_dim=ACTION_DIM, depth=depth,
        cam_to_world=True, robot_type="sawyer", overwrite=overwrite, state_names=STATE_LAYOUTS[state][1],
        version=version, video=video,
    )
    try:
        failures = write_episodes(writer, jobs, workers, len(tasks) * episodes_per_task)
        for task, count in failures.items():
            logger.warning("%s: %d of %d expert episodes failed within %d steps and were dropped",
                           task, count, episodes_per_task, max_steps)
        total = len(tasks) * episodes_per_task
        logger.info("%d of %d expert episodes kept", total - sum(failures.values()), total)
        return writer.finalize()
    except BaseException:
        writer.abort()
        raise


def write_episodes(writer: DatasetWriter, jobs: Sequence[DemoJob], workers: int, total: int) -> dict[str, int]:
    """Run the demo ``jobs`` on ``workers`` processes into ``writer``; returns the failed episodes per task."""
    failures: dict[str, int] = {}
    with tqdm(total=total, desc="expert demos", unit="episode") as bar:
        for job, episodes in zip(jobs, run_jobs(jobs, workers, bar)):
            for frames, instruction in episodes:
                if frames is None:
                    failures[job.task] = failures.get(job.task, 0) + 1
                else:
                    writer.add_episode(frames, instruction)
            bar.set_postfix(failed=sum(failures.values()))
    return failures
