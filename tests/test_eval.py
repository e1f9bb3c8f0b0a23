"""The environment-agnostic evaluation loop on a fake environment (numpy + torch only, no simulator):
the protocol, ChunkPolicy's action queue, rollouts, evaluate's aggregation, the pool and videos."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from vlablocks.envs import eval_env_factory
from vlablocks.eval.policy import ChunkPolicy
from vlablocks.eval.pool import run_jobs, split_episodes
from vlablocks.eval.protocol import Env, Policy
from vlablocks.eval.rollout import EpisodeResult, EvalJob, evaluate, rollout, summarize
from vlablocks.eval.video import GIF_MAX_FPS, write_video
from vlablocks.policy import batch as keys

IMAGE, FRAME = 8, 20  # px of the policy's image and of the video frame


class PointEnv:
    """A point in the plane that must reach a goal within ``max_steps`` steps of at most 0.1 per axis.

    Episode ``i`` puts the goal at a fixed place drawn from ``i``; task ``far`` puts it out of reach.
    """

    action_dim = 2
    fps = 10.0
    BUCKETS: ClassVar[dict[str, str | None]] = {"near": "easy", "far": "hard", "wander": None}

    def __init__(self, task: str, max_steps: int = 20) -> None:
        self.task, self.instruction, self.max_steps = task, f"move the point to the goal ({task})", max_steps
        self.bucket = self.BUCKETS[task]
        self.closed = False

    def reset(self, episode: int) -> dict[str, np.ndarray]:
        goal = np.random.default_rng(episode).uniform(-0.5, 0.5, 2)
        self.goal = goal * (20.0 if self.task == "far" else 1.0)
        self.position, self.steps = np.zeros(2), 0
        return self._observation()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool]:
        self.position = self.position + np.clip(action, -0.1, 0.1)
        self.steps += 1
        success = bool(np.linalg.norm(self.position - self.goal) < 0.05)
        return self._observation(), success, success or self.steps >= self.max_steps

    def _observation(self) -> dict[str, np.ndarray]:
        return {"position": self.position.astype(np.float32), "goal": self.goal.astype(np.float32)}

    def to_batch(self, observation: dict[str, np.ndarray]) -> dict[str, Any]:
        return {keys.IMAGES: torch.zeros(1, 1, 3, IMAGE, IMAGE), keys.TASK: [self.instruction],
                keys.STATE: torch.from_numpy(np.concatenate([observation["position"], observation["goal"]]))[None]}

    def frame(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        image = np.zeros((FRAME, FRAME, 3), dtype=np.uint8)
        row, col = np.clip(((observation["position"] + 1) * FRAME / 2).astype(int), 0, FRAME - 1)
        image[row, col] = 255
        return image

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> PointEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PointEnvFactory:
    max_steps: int = 20
    buckets: ClassVar[tuple[str, ...]] = ("easy", "hard")

    def __call__(self, task: str) -> PointEnv:
        return PointEnv(task, self.max_steps)

    def check(self, tasks: list[str], episodes: int) -> None:
        if unknown := [t for t in tasks if t not in PointEnv.BUCKETS]:
            raise ValueError(f"unknown task(s) {unknown}")

    def describe(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps}


@dataclass(frozen=True)
class GoalChunks:
    """A picklable chunk predictor: ``H`` steps towards the goal, plus ``noise`` x (2 torch.rand - 1) noise."""

    horizon: int = 4
    noise: float = 0.0

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        state = batch[keys.STATE][0]
        step = (state[2:] - state[:2]).clamp(-0.1, 0.1) / 2
        return step.expand(1, self.horizon, 2) + self.noise * (2 * torch.rand(1, self.horizon, 2) - 1)


class CountingPredictor:
    """Chunks whose action ``j`` of call ``c`` is ``[c, j]``: which chunk cells were executed."""

    def __init__(self, horizon: int) -> None:
        self.horizon, self.calls, self.batches = horizon, 0, []

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        self.batches.append(batch)
        chunk = torch.stack([torch.full((self.horizon,), float(self.calls)), torch.arange(self.horizon).float()], dim=-1)
        self.calls += 1
        return chunk[None]


def test_the_fake_environment_follows_the_protocol():
    with PointEnv("near") as env:
        assert isinstance(env, Env)
        observation = env.reset(0)
        batch = env.to_batch(observation)
        spec = keys.BatchSpec(image_size=IMAGE, geometry=False, state_dim=4, horizon=4, action_dim=2, actions=False)
        keys.check_batch(batch, spec, torch.device("cpu"))
        assert env.frame(observation).shape == (FRAME, FRAME, 3)
    assert env.closed
    assert isinstance(ChunkPolicy(GoalChunks()), Policy)


def test_chunk_policy_executes_the_first_actions_of_each_chunk_cell_by_cell():
    predictor = CountingPredictor(horizon=5)
    policy = ChunkPolicy(predictor, execute_steps=3, horizon=5)
    cells = [tuple(int(x) for x in policy.select_action({"step": t})) for t in range(7)]
    assert cells == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert [b["step"] for b in predictor.batches] == [0, 3, 6]  # re-planned from the observation of that step
    policy.reset()  # a new episode: the rest of chunk 2 is dropped
    assert tuple(int(x) for x in policy.select_action({"step": 0})) == (3, 0)
    every = ChunkPolicy(CountingPredictor(horizon=2), execute_steps=2)
    assert [tuple(int(x) for x in every.select_action({})) for _ in range(3)] == [(0, 0), (0, 1), (1, 0)]


def test_chunk_policy_refuses_more_steps_than_a_chunk_holds():
    with pytest.raises(ValueError, match=r"execute_steps=8 is more than the policy's chunk of horizon=4 actions"):
        ChunkPolicy(GoalChunks(), execute_steps=8, horizon=4)
    with pytest.raises(ValueError, match=r"execute_steps must be an int >= 1; got 0"):
        ChunkPolicy(GoalChunks(), execute_steps=0)
    unknown_horizon = ChunkPolicy(GoalChunks(horizon=4), execute_steps=6)
    with pytest.raises(ValueError, match=r"execute_steps=6 is more than the predicted chunk's H=4 actions"):
        unknown_horizon.select_action(PointEnv("near").to_batch(PointEnv("near").reset(0)))
    with pytest.raises(ValueError, match=r"the policy must return actions \[1, H, A\]; got \[1, 8\]"):
        ChunkPolicy(lambda batch: torch.zeros(1, 8), execute_steps=1).select_action({})


def test_rollout_reaches_the_goal_and_records_frames_and_steps():
    with PointEnv("near") as env:
        episode = rollout(env, ChunkPolicy(GoalChunks(), execute_steps=4), 0, video=True, keep_steps=True)
        assert episode.success and 0 < episode.length < env.max_steps
        assert len(episode.frames) == episode.length + 1 and episode.frames[0].shape == (FRAME, FRAME, 3)
        assert len(episode.steps) == episode.length and episode.steps[0][1].shape == (2,)
        np.testing.assert_array_equal(episode.steps[0][0]["position"], [0, 0])
        quiet = rollout(env, ChunkPolicy(GoalChunks(), execute_steps=4), 0)
        assert quiet.success and quiet.length == episode.length and quiet.frames == [] and quiet.steps == []
        with pytest.raises(ValueError, match=r"near: the policy's action must be \[2\]; got shape \[3\]"):
            rollout(env, ChunkPolicy(lambda batch: torch.zeros(1, 4, 3), execute_steps=4), 0)
    with PointEnv("far") as env:
        episode = rollout(env, ChunkPolicy(GoalChunks(), execute_steps=4), 0)
        assert not episode.success and episode.length == env.max_steps


def test_evaluate_aggregates_per_task_per_bucket_and_mean(tmp_path):
    tasks = ["far", "wander", "near"]
    report = evaluate(PointEnvFactory(), ChunkPolicy(GoalChunks(), execute_steps=2), tasks, episodes=3,
                      video_dir=tmp_path)
    # wander's goal is reachable (it is near's without a bucket); buckets follow the factory's order
    assert report == {"per_task": {"far": 0.0, "wander": 1.0, "near": 1.0}, "per_bucket": {"easy": 1.0, "hard": 0.0},
                      "mean": pytest.approx(2 / 3), "episodes": 3, "task_buckets": {"far": "hard", "near": "easy"}}
    assert sorted(p.name.rsplit(".", 1)[0] for p in tmp_path.iterdir()) == sorted(
        [f"far_{i:02d}_failure" for i in range(3)] + [f"{t}_{i:02d}_success" for t in ("wander", "near") for i in range(3)])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['fly'\]"):
        evaluate(PointEnvFactory(), ChunkPolicy(GoalChunks()), ["fly"], episodes=1)


def test_summarize_is_plain_arithmetic():
    results = [EpisodeResult("a", 0, True, "x"), EpisodeResult("a", 1, False, "x"), EpisodeResult("b", 0, True, "y"),
               EpisodeResult("b", 1, True, "y"), EpisodeResult("c", 0, False, "x"), EpisodeResult("c", 1, False, "x")]
    summary = summarize(results, ["a", "b", "c"], 2, bucket_order=("y", "z"))
    assert summary["per_task"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert list(summary["per_bucket"].items()) == [("y", 1.0), ("x", 0.25)]
    assert summary["mean"] == pytest.approx(0.5)
    none = summarize([EpisodeResult("a", 0, True, None)], ["a"], 1)
    assert none["per_bucket"] == {} and none["task_buckets"] == {}


def test_an_episode_draws_the_same_noise_alone_after_others_and_in_a_worker():
    """Noise comes from ``seed * 1000 + episode`` in a forked RNG: the caller's stream is left alone."""
    factory, policy = PointEnvFactory(), ChunkPolicy(GoalChunks(noise=0.05), execute_steps=2)
    before = torch.get_rng_state()
    both = list(EvalJob(factory, policy, "near", range(0, 2), seed=3).run())
    assert torch.equal(torch.get_rng_state(), before)
    second = list(EvalJob(factory, policy, "near", range(1, 2), seed=3).run())
    assert second == both[1:]
    rolled = []
    for episode in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3 * 1000 + episode)
            with PointEnv("near") as env:
                rolled.append(rollout(env, policy, episode, keep_steps=True))
    assert [r.success for r in rolled] == [r.success for r in both]
    assert not np.array_equal(rolled[0].steps[0][1], rolled[1].steps[0][1])  # different noise per episode


def test_two_workers_give_the_same_results_as_one(tmp_path):
    args = (PointEnvFactory(max_steps=12), ChunkPolicy(GoalChunks(noise=0.1), execute_steps=3), ["near", "far"], 4)
    one = evaluate(*args, seed=1)
    two = evaluate(*args, seed=1, workers=2, video_dir=tmp_path)
    assert one == two and 0.0 < one["per_task"]["near"] < 1.0  # the noise makes some episodes fail
    assert len(list(tmp_path.iterdir())) == 8
    with pytest.raises(ValueError, match=r"policy must be picklable with workers=2 .*CheckpointPolicy"):
        evaluate(PointEnvFactory(), ChunkPolicy(lambda batch: torch.zeros(1, 4, 2)), ["near"], 1, workers=2)


@dataclass(frozen=True)
class SquaresJob:
    numbers: range

    def run(self):
        yield from (n * n for n in self.numbers)


def test_the_pool_keeps_job_order_for_any_number_of_workers():
    assert split_episodes(["a", "b"], 5, 2) == [("a", range(0, 2)), ("a", range(2, 5)), ("b", range(0, 2)),
                                                  ("b", range(2, 5))]
    assert split_episodes(["a"], 2, 8) == [("a", range(0, 1)), ("a", range(1, 2))]
    jobs = [SquaresJob(range(i, i + 3)) for i in range(4)]
    expected = [[n * n for n in range(i, i + 3)] for i in range(4)]
    assert list(run_jobs(jobs, 1)) == list(run_jobs(jobs, 2)) == expected
    with pytest.raises(ValueError, match="workers must be an int >= 1; got 0"):
        split_episodes(["a"], 1, 0)


def test_write_video_keeps_the_frame_size(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    frames = [np.full((48, 64, 3), 10 * i, dtype=np.uint8) for i in range(8)]
    path = write_video(frames, tmp_path / "clip", fps=2 * GIF_MAX_FPS)
    assert path.parent == tmp_path and path.stem == "clip" and [p.name for p in tmp_path.iterdir()] == [path.name]
    read = imageio.mimread(path)
    assert read[0].shape[:2] == (48, 64)
    if path.suffix == ".gif":
        assert len(read) == 4  # every 2nd frame: GIFs play at most GIF_MAX_FPS frames per second
    with pytest.raises(ValueError, match="no frames"):
        write_video([], Path(tmp_path / "empty"), fps=10)


def test_the_env_registry_lists_its_names():
    with pytest.raises(ValueError, match=r"unknown environment 'gym'; valid names: \['metaworld'\]"):
        eval_env_factory("gym", {}, image_size=None, depth=False, seed=0)
