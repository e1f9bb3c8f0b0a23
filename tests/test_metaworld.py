"""Meta-World glue: task tables, rendering and geometry, scripted demos and evaluation."""

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
from vlablocks.data.lerobot import LeRobotDataset  # noqa: E402
from vlablocks.encoders.geometry import unproject_depth  # noqa: E402
from vlablocks.envs.metaworld.legacy import (  # noqa: E402
    DIFFICULTY,
    INSTRUCTIONS,
    MT10,
    RAW_STATE,
    STATE_LAYOUTS,
    MetaWorldEnv,
    _eval_episodes,
    evaluate,
    expert_policy,
    generate_demos,
    layout_seed,
    state_layout,
)

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
    lengths = [json.loads(line)["length"] for line in (root / "meta/episodes.jsonl").read_text().splitlines()]
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
        evaluate(lambda batch: torch.zeros(1, 4, 4), ["reach-v3"], episodes=1, state="goal")


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

    evaluate(policy, ["reach-v3"], episodes=1, image_size=32, max_steps=4, state="proprio_goal")
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
    assert len(files) == 4 + 4  # meta/{info,episodes,tasks,stats} + 4 episodes
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
    tasks = [TASK, "door-open-v3"]
    one = evaluate(ExpertChunks(TASK), tasks, episodes=2, image_size=32, execute_steps=4, max_steps=80)
    two = evaluate(ExpertChunks(TASK), tasks, episodes=2, image_size=32, execute_steps=4, max_steps=80,
                   video_dir=tmp_path, workers=2)
    # the button expert solves its own task, not the door: per-task counts must not mix up
    assert one == two == {"per_task": {TASK: 1.0, "door-open-v3": 0.0}, "per_bucket": {"easy": 0.5},
                          "mean": 0.5, "episodes": 2}
    assert sorted(p.name.rsplit(".", 1)[0] for p in tmp_path.iterdir()) == [
        f"{TASK}_00_success", f"{TASK}_01_success", "door-open-v3_00_failure", "door-open-v3_01_failure"]
    with pytest.raises(ValueError, match=r"policy must be picklable with workers=2 .*CheckpointPolicy"):
        evaluate(lambda batch: torch.zeros(1, 4, 4), [TASK], episodes=1, image_size=32, workers=2)


def test_an_episode_draws_the_same_noise_wherever_it_runs():
    """Episode noise comes from ``seed * 1000 + layout``: the same alone, after another episode or in a worker."""
    draws: list[tuple[int, float]] = []

    def policy(batch):
        draws.append((len(draws), torch.rand(()).item()))
        return torch.zeros(1, 8, 4)

    args = (SIZE, "corner", False, 3, 8, 16, None, "proprio")  # size, camera, depth, seed, execute, max_steps, videos, state
    before = torch.get_rng_state()
    list(_eval_episodes(policy, "reach-v3", range(0, 2), *args))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left alone
    both = [value for _, value in draws]
    draws.clear()
    list(_eval_episodes(policy, "reach-v3", range(1, 2), *args))
    assert len(both) == 4 and [value for _, value in draws] == both[2:] and both[:2] != both[2:]
    torch.manual_seed(3 * 1000 + 1)
    assert both[2] == torch.rand(()).item()


def test_evaluate_with_the_expert(tmp_path):
    report = evaluate(expert_chunk_policy(TASK), [TASK], episodes=1, image_size=SIZE, execute_steps=1, video_dir=tmp_path)
    assert report == {"per_task": {TASK: 1.0}, "per_bucket": {"easy": 1.0}, "mean": 1.0, "episodes": 1}
    videos = sorted(p.name for p in tmp_path.iterdir())
    assert len(videos) == 1 and videos[0].startswith(f"{TASK}_00_success.")


def test_evaluate_reports_failures_and_checks_the_policy_output():
    zero = lambda batch: torch.zeros(1, 8, 4)  # noqa: E731
    report = evaluate(zero, ["reach-v3"], episodes=1, image_size=SIZE, depth=True, execute_steps=8, max_steps=16)
    assert report == {"per_task": {"reach-v3": 0.0}, "per_bucket": {"easy": 0.0}, "mean": 0.0, "episodes": 1}
    with pytest.raises(ValueError, match=r"the policy must return actions \[1, H, 4\]; got \[1, 8\]"):
        evaluate(lambda batch: torch.zeros(1, 8), ["reach-v3"], episodes=1, image_size=SIZE, max_steps=4)


def test_the_cli_offers_exactly_the_state_layouts(tmp_path, capsys):
    from vlablocks.cli import main

    with pytest.raises(SystemExit):
        main(["data", "metaworld", "--tasks", TASK, "--episodes", "1", "--out", str(tmp_path / "d"), "--state", "goal"])
    error = capsys.readouterr().err
    offered = error.split("choose from ")[1].split(")")[0]
    assert sorted(name.strip(" '") for name in offered.split(",")) == sorted(STATE_LAYOUTS)
