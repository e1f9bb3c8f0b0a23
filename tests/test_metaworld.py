"""Meta-World: task tables, rendering and geometry, the environment, scripted demos and evaluation through it."""

from __future__ import annotations

import filecmp
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("metaworld")

import metaworld  # noqa: E402
import metaworld.env_dict  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from vlablocks.policy import batch as keys  # noqa: E402
from vlablocks.data import LeRobotDataset  # noqa: E402
from vlablocks.data.meta import read_meta  # noqa: E402
from vlablocks.encoders.points import unproject_depth  # noqa: E402
from vlablocks.envs import eval_env_factory  # noqa: E402
from vlablocks.envs.metaworld.demos import generate_demos  # noqa: E402
from vlablocks.envs.metaworld.env import RAW_STATE, MetaWorldEnv, MetaWorldEnvFactory, expert_policy  # noqa: E402
from vlablocks.envs.metaworld.tasks import (  # noqa: E402
    DIFFICULTY,
    INSTRUCTIONS,
    MT10,
    STATE_LAYOUTS,
    layout_seed,
    state_layout,
)
from vlablocks.eval.policy import ChunkPolicy  # noqa: E402
from vlablocks.eval.protocol import Env  # noqa: E402
from vlablocks.eval.rollout import EvalJob, evaluate, rollout  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")
TASK = "button-press-topdown-v3"  # the expert succeeds in ~60-75 steps
SIZE = 64


def test_task_tables_cover_all_50_tasks():
    names = set(metaworld.MT1.ENV_NAMES)
    assert len(names) == 50 and set(INSTRUCTIONS) == names and set(DIFFICULTY) == names
    assert set(ENV_POLICY_MAP) == names
    assert len(set(INSTRUCTIONS.values())) == 50 and all(s and s == s.strip().lower() for s in INSTRUCTIONS.values())
    counts = {bucket: sum(b == bucket for b in DIFFICULTY.values()) for bucket in ("easy", "medium", "hard", "very_hard")}
    assert counts == {"easy": 28, "medium": 11, "hard": 6, "very_hard": 5}
    assert MT10 == list(metaworld.env_dict.MT10_V3)
    assert (layout_seed(3, train=True), layout_seed(3, train=False)) == (3, 4)


@pytest.fixture(scope="module")
def env():
    with MetaWorldEnv(TASK, image_size=SIZE, camera="corner", depth=True, seed=0) as environment:
        yield environment


def test_observation_shapes_dtypes_and_depth(env):
    obs = env.reset(0)
    assert obs["image"].shape == (SIZE, SIZE, 3) and obs["image"].dtype == np.uint8
    assert obs["depth"].shape == (SIZE, SIZE) and obs["depth"].dtype == np.float32
    assert obs["intrinsics"].shape == (3, 3) and obs["cam_to_world"].shape == (4, 4)
    assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
    assert obs[RAW_STATE].shape == (39,)
    np.testing.assert_array_equal(obs["state"], obs[RAW_STATE][:4].astype(np.float32))
    assert obs["image"].std() > 10  # a real picture, not a blank frame
    valid = obs["depth"] > 0  # 0 marks the skybox
    assert valid.mean() > 0.3
    assert obs["depth"][valid].min() > 0.2 and obs["depth"][valid].max() < 5.0
    np.testing.assert_array_equal(env.reset(0)["image"], obs["image"])  # deterministic


def test_intrinsics_match_image_size_and_fovy(env):
    k = env.reset(0)["intrinsics"]
    focal = 0.5 * SIZE / math.tan(math.radians(45.0) / 2)  # the corner camera's fovy is 45 degrees
    np.testing.assert_allclose(k, [[focal, 0, SIZE / 2], [0, focal, SIZE / 2], [0, 0, 1]], rtol=1e-6)


def test_depth_intrinsics_and_pose_agree_with_the_scene(env):
    """Unprojected depth puts the table top on the world plane z = 0 and finds the gripper."""
    obs = env.reset(0)
    pose = obs["cam_to_world"].astype(np.float64)
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-6)
    assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0, abs=1e-6)
    points = unproject_depth(*(torch.from_numpy(obs[k])[None] for k in ("depth", "intrinsics", "cam_to_world")))[0]
    points = points[torch.from_numpy(obs["depth"] > 0)]
    on_table = (points[:, 2].abs() < 0.005).float().mean()
    assert on_table > 0.15, f"only {on_table:.0%} of the points lie on the table plane: image flip or pose is off"
    hand = torch.from_numpy(obs[RAW_STATE][:3]).float()
    assert (points - hand).norm(dim=1).min() < 0.08


def test_step_contract_and_errors(env):
    obs = env.reset(1)
    obs, success, done = env.step(np.array([0.0, 0.0, 0.5, 5.0]))  # out-of-range actions are clipped
    assert isinstance(success, bool) and not success and not done
    assert obs["image"].shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r"the action must be 4 finite numbers; got \[0.0, 0.0\]"):
        env.step([0.0, 0.0])
    with pytest.raises(ValueError, match=r"layout must be in \[0, 50\); got 50"):
        env.reset(50)
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        MetaWorldEnv("push-v2")
    with pytest.raises(ValueError, match="camera must be one of"):
        MetaWorldEnv(TASK, camera="front")


def test_generate_demos_writes_a_readable_dataset(tmp_path, env):
    root = generate_demos([TASK], 2, tmp_path / "demos", image_size=SIZE, depth=True, seed=0)
    info = json.loads((root / "meta/info.json").read_text())
    assert (info["fps"], info["robot_type"], info["total_episodes"]) == (80, "sawyer", 2)
    lengths = [episode.length for episode in read_meta(root).episodes]
    dataset = LeRobotDataset(root, horizon=8)
    assert [b - a for a, b in dataset.episode_ranges] == lengths and len(dataset) == sum(lengths)
    assert all(10 < n < 500 for n in lengths)
    sample = dataset[0]
    assert sample[keys.IMAGES].shape == (1, 3, SIZE, SIZE) and sample[keys.DEPTH].shape == (1, SIZE, SIZE)
    assert sample[keys.CAM_TO_WORLD].shape == (1, 4, 4) and sample[keys.TASK] == INSTRUCTIONS[TASK]
    assert sample[keys.STATE].shape == (4,) and sample[keys.ACTIONS].shape == (8, 4)
    # replaying the stored actions on the same layout succeeds exactly at the last frame
    start, end = dataset.episode_ranges[1]
    obs = env.reset(1)
    np.testing.assert_array_equal(obs["state"], dataset[start][keys.STATE].numpy())
    assert torch.equal(dataset[start][keys.IMAGES], torch.from_numpy(obs["image"]).permute(2, 0, 1)[None].float() / 255)
    for t in range(end - start):
        _, success, _ = env.step(dataset[start + t][keys.ACTIONS][0].numpy())
        assert success == (t == end - start - 1), t


def test_goal_state_layout_holds_the_goal_and_is_found_from_its_names():
    with MetaWorldEnv("reach-v3", image_size=32, state="proprio_goal") as env:
        first, second = env.reset(0), env.reset(1)
        for obs in (first, second):
            assert obs["state"].shape == (7,) and obs["state"].dtype == np.float32
            np.testing.assert_array_equal(obs["state"], obs[RAW_STATE][[0, 1, 2, 3, 36, 37, 38]].astype(np.float32))
        assert np.abs(first["state"][4:] - second["state"][4:]).max() > 0.01  # the goal moves with the layout
        # the goal is what the scripted reach expert steers to (Meta-World observes it in MT benchmarks)
        np.testing.assert_allclose(second["state"][4:], env._env._target_pos, atol=1e-6)  # the last reset
    assert {layout: state_layout(names) for layout, (_, names) in STATE_LAYOUTS.items()} == {
        "proprio": "proprio", "proprio_goal": "proprio_goal"}
    assert state_layout(None) == "proprio"  # datasets written before the names were recorded
    with pytest.raises(ValueError, match=r"state feature names \['x', 'y'\] match no Meta-World state layout"):
        state_layout(["x", "y"])
    with pytest.raises(ValueError, match=r"state must be one of \['proprio', 'proprio_goal'\]; got 'goal'"):
        MetaWorldEnv("reach-v3", image_size=32, state="goal")
    with pytest.raises(ValueError, match=r"state must be one of .*; got 'goal'"):
        MetaWorldEnvFactory(state="goal")


def test_goal_state_demos_name_their_state_and_evaluate_feeds_the_same_layout(tmp_path):
    root = generate_demos(["reach-v3"], 1, tmp_path / "demos", image_size=32, state="proprio_goal")
    names = json.loads((root / "meta/info.json").read_text())["features"]["observation.state"]["names"]
    assert names == list(STATE_LAYOUTS["proprio_goal"][1]) and state_layout(names) == "proprio_goal"
    dataset = LeRobotDataset(root, horizon=4)
    assert dataset[0][keys.STATE].shape == (7,)
    seen = []

    def policy(batch):
        seen.append(batch[keys.STATE][0].clone())
        np.testing.assert_array_equal(batch[keys.STATE][0].numpy(), batch[RAW_STATE][0, [0, 1, 2, 3, 36, 37, 38]].numpy())
        return torch.zeros(1, 4, 4)

    factory = MetaWorldEnvFactory(image_size=32, max_steps=4, state="proprio_goal")
    evaluate(factory, ChunkPolicy(policy, execute_steps=4), ["reach-v3"], episodes=1)
    assert len(seen) == 1 and seen[0].shape == (7,)


def expert_chunk_policy(task: str, horizon: int = 4):
    """A policy callable backed by the scripted expert (reads the privileged raw state)."""
    expert = expert_policy(task)

    def policy(batch):
        assert batch[keys.IMAGES].shape == (1, 1, 3, SIZE, SIZE) and batch[keys.STATE].shape == (1, 4)
        assert batch[keys.TASK] == [INSTRUCTIONS[task]]
        action = torch.from_numpy(expert(batch[RAW_STATE][0].double().numpy()))
        return action.expand(1, horizon, 4)

    return policy


def test_workers_write_the_same_dataset(tmp_path):
    """Episodes simulated in 2 spawned processes are written in the same order, byte for byte."""
    one = generate_demos([TASK, "drawer-open-v3"], 2, tmp_path / "one", image_size=32, depth=True)
    two = generate_demos([TASK, "drawer-open-v3"], 2, tmp_path / "two", image_size=32, depth=True, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len(files) == 4 + 1  # meta/{info.json, stats.json, tasks.parquet, episodes/...} + one data file (v3.0)
    assert [str(f) for f in files if not filecmp.cmp(one / f, two / f, shallow=False)] == []
    with pytest.raises(ValueError, match="workers must be an int >= 1; got 0"):
        generate_demos([TASK], 1, tmp_path / "zero", image_size=32, workers=0)


class ExpertChunks:
    """A picklable expert-backed policy (for worker processes): the expert's action, repeated."""

    def __init__(self, task: str, horizon: int = 4) -> None:
        self.task, self.horizon = task, horizon

    def __call__(self, batch):
        action = torch.from_numpy(expert_policy(self.task)(batch[RAW_STATE][0].double().numpy()))
        return action.expand(1, self.horizon, 4)


def test_evaluate_with_workers_matches_one_process(tmp_path):
    tasks, factory, policy = [TASK, "door-open-v3"], MetaWorldEnvFactory(image_size=32, max_steps=80), ChunkPolicy(
        ExpertChunks(TASK), execute_steps=4)
    one = evaluate(factory, policy, tasks, episodes=2)
    two = evaluate(factory, policy, tasks, episodes=2, video_dir=tmp_path, workers=2)
    # the button expert solves its own task, not the door: per-task counts must not mix up
    assert one == two == {"per_task": {TASK: 1.0, "door-open-v3": 0.0}, "per_bucket": {"easy": 0.5},
                          "mean": 0.5, "episodes": 2, "task_buckets": {TASK: "easy", "door-open-v3": "easy"}}
    assert sorted(p.name.rsplit(".", 1)[0] for p in tmp_path.iterdir()) == [
        f"{TASK}_00_success", f"{TASK}_01_success", "door-open-v3_00_failure", "door-open-v3_01_failure"]
    with pytest.raises(ValueError, match=r"policy must be picklable with workers=2 .*CheckpointPolicy"):
        evaluate(factory, ChunkPolicy(lambda batch: torch.zeros(1, 4, 4)), [TASK], episodes=1, workers=2)


def test_an_episode_draws_the_same_noise_wherever_it_runs():
    """Episode noise comes from ``seed * 1000 + layout``: the same alone, after another episode or in a worker."""
    draws: list[tuple[int, float]] = []

    def policy(batch):
        draws.append((len(draws), torch.rand(()).item()))
        return torch.zeros(1, 8, 4)

    factory, chunks = MetaWorldEnvFactory(image_size=SIZE, seed=3, max_steps=16), ChunkPolicy(policy, execute_steps=8)
    before = torch.get_rng_state()
    list(EvalJob(factory, chunks, "reach-v3", range(0, 2), seed=3).run())
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left alone
    both = [value for _, value in draws]
    draws.clear()
    list(EvalJob(factory, chunks, "reach-v3", range(1, 2), seed=3).run())
    assert len(both) == 4 and [value for _, value in draws] == both[2:] and both[:2] != both[2:]
    torch.manual_seed(3 * 1000 + 1)
    assert both[2] == torch.rand(()).item()


def test_evaluate_with_the_expert_writes_256_px_videos_of_64_px_policy_inputs(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    policy = ChunkPolicy(expert_chunk_policy(TASK), execute_steps=1)  # it checks the images are SIZE px
    report = evaluate(MetaWorldEnvFactory(image_size=SIZE), policy, [TASK], episodes=1, video_dir=tmp_path)
    assert report == {"per_task": {TASK: 1.0}, "per_bucket": {"easy": 1.0}, "mean": 1.0, "episodes": 1,
                      "task_buckets": {TASK: "easy"}}
    videos = sorted(tmp_path.iterdir())
    assert len(videos) == 1 and videos[0].name.startswith(f"{TASK}_00_success.")
    frames = imageio.mimread(videos[0])
    assert frames[0].shape[:2] == (256, 256) and frames[0].std() > 10


def test_video_frames_leave_the_policy_observations_unchanged(env):
    """frame() renders a second, 256 px camera; the policy's images are the same with or without it."""
    assert isinstance(env, Env) and env.video_size == 256
    expert = ChunkPolicy(ExpertChunks(TASK), execute_steps=4)
    with_video = rollout(env, expert, 2, video=True, keep_steps=True)
    without = rollout(env, expert, 2, keep_steps=True)
    assert with_video.success and with_video.length == without.length
    assert with_video.frames[0].shape == (256, 256, 3) and len(with_video.frames) == with_video.length + 1
    for (seen, action), (again, same_action) in zip(with_video.steps, without.steps):
        np.testing.assert_array_equal(seen["image"], again["image"])
        np.testing.assert_array_equal(seen["depth"], again["depth"])
        np.testing.assert_array_equal(action, same_action)
    batch = env.to_batch(env.reset(2))
    assert batch[keys.IMAGES].shape == (1, 1, 3, SIZE, SIZE) and batch[keys.DEPTH].shape == (1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="pass the latest observation"):
        env.frame(with_video.steps[0][0])


def test_evaluate_reports_failures_and_checks_the_policy_output():
    zero = ChunkPolicy(lambda batch: torch.zeros(1, 8, 4), execute_steps=8)
    factory = MetaWorldEnvFactory(image_size=SIZE, depth=True, max_steps=16)
    report = evaluate(factory, zero, ["reach-v3"], episodes=1)
    assert report == {"per_task": {"reach-v3": 0.0}, "per_bucket": {"easy": 0.0}, "mean": 0.0, "episodes": 1,
                      "task_buckets": {"reach-v3": "easy"}}
    with pytest.raises(ValueError, match=r"the policy must return actions \[1, H, A\]; got \[1, 8\]"):
        evaluate(factory, ChunkPolicy(lambda batch: torch.zeros(1, 8)), ["reach-v3"], episodes=1)
    with pytest.raises(ValueError, match=r"episodes must be in \[1, 50\] \(the held-out layouts\); got 51"):
        evaluate(factory, zero, ["reach-v3"], episodes=51)


def test_a_run_is_evaluated_in_the_environment_its_data_came_from():
    info = {"cameras": ["corner2"], "image_size": 48, "state_names": list(STATE_LAYOUTS["proprio_goal"][1])}
    factory = eval_env_factory("metaworld", info, image_size=None, depth=True, seed=2)
    assert factory == MetaWorldEnvFactory(image_size=48, camera="corner2", depth=True, seed=2, train=False,
                                          state="proprio_goal", video_size=256)
    assert eval_env_factory("metaworld", {}, image_size=96, depth=False, seed=0).describe() == {
        "camera": "corner", "state": "proprio"}


def test_the_cli_offers_exactly_the_state_layouts(tmp_path, capsys):
    from vlablocks.cli import main

    assert main(["data", "metaworld", "--tasks", TASK, "--episodes", "1", "--out", str(tmp_path / "d"), "--state", "goal"]) == 2
    error = capsys.readouterr().err
    offered = error.split("choose from ")[1].split(")")[0]
    assert sorted(name.strip(" '") for name in offered.split(",")) == sorted(STATE_LAYOUTS)
