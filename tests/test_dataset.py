"""The LeRobot layout writer/reader on synthetic episodes (no simulator)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlablocks.policy import batch as keys
from vlablocks.data import DatasetWriter, EpisodeError, LeRobotDataset
from vlablocks.data.format import decode_png, encode_depth_png, episode_path, image_stats
from vlablocks.policy.batch import collate

CAMERAS = ["front", "wrist"]
SIZE = (6, 8)  # H, W
LENGTHS = (5, 1, 7)
TASKS = ("open the drawer", "press the button", "open the drawer")


def make_episode(length: int, seed: int, cameras=CAMERAS, depth: bool = True, pose: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = {
        "observation.state": rng.normal(size=(length, 4)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(length, 3)).astype(np.float32),
    }
    for camera in cameras:
        frames[f"observation.images.{camera}"] = rng.integers(0, 256, size=(length, *SIZE, 3), dtype=np.uint8)
        k = np.array([[5.0, 0.0, 4.0], [0.0, 5.0, 3.0], [0.0, 0.0, 1.0]], dtype=np.float32) + rng.normal(size=(3, 3)).astype(np.float32)
        frames[f"observation.intrinsics.{camera}"] = np.repeat(k[None], length, 0)
        if depth:
            frames[f"observation.depth.{camera}"] = rng.uniform(0.2, 5.0, size=(length, *SIZE)).astype(np.float32)
        if pose:
            frames[f"observation.cam_to_world.{camera}"] = rng.normal(size=(length, 4, 4)).astype(np.float32)
    return frames


def write(root: Path, episodes: list[dict[str, np.ndarray]] | None = None, **kwargs) -> list[dict[str, np.ndarray]]:
    episodes = episodes if episodes is not None else [make_episode(n, seed) for seed, n in enumerate(LENGTHS)]
    options = {"fps": 10, "cameras": CAMERAS, "state_dim": 4, "action_dim": 3, "depth": True, "cam_to_world": True,
               "robot_type": "toy", "version": "v2.1"}
    writer = DatasetWriter(root, **{**options, **kwargs})
    for frames, task in zip(episodes, TASKS):
        writer.add_episode(frames, task)
    writer.finalize()
    return episodes


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("data") / "toy"
    return root, write(root)


def test_layout_and_metadata(written):
    root, _ = written
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["fps"] == 10 and info["robot_type"] == "toy"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, sum(LENGTHS), 2)
    assert info["data_path"] == "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    assert info["features"]["observation.images.front"]["shape"] == [*SIZE, 3]
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [4], "names": None}
    episodes = [json.loads(line) for line in (root / "meta/episodes.jsonl").read_text().splitlines()]
    assert episodes == [{"episode_index": i, "tasks": [t], "length": n} for i, (t, n) in enumerate(zip(TASKS, LENGTHS))]
    tasks = [json.loads(line) for line in (root / "meta/tasks.jsonl").read_text().splitlines()]
    assert tasks == [{"task_index": 0, "task": TASKS[0]}, {"task_index": 1, "task": TASKS[1]}]
    table = pq.read_table(root / "data/chunk-000/episode_000002.parquet")
    assert table.schema.field("observation.state").type == pa.list_(pa.float32(), 4)  # fixed size, as LeRobot writes
    assert table.schema.field("observation.images.front").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert table.column("index").to_pylist() == list(range(6, 13))
    assert table.column("task_index").to_pylist() == [0] * 7
    np.testing.assert_allclose(table.column("timestamp").to_numpy(), np.arange(7) / 10, rtol=1e-6)
    assert not list(root.rglob("*.tmp"))


def assert_samples_match(dataset: LeRobotDataset, episodes: list[dict[str, np.ndarray]], max_error: int = 0,
                         mean_error: float = 0.0) -> None:
    """Every sample of ``dataset`` holds the written episode's values; images within ``max_error``
    (and ``mean_error`` on average) of 255 levels (0: exact, as PNG; a lossy codec needs more)."""
    assert dataset.episode_ranges == [(0, 5), (5, 6), (6, 13)] and dataset.cameras == CAMERAS
    for (start, end), frames, task in zip(dataset.episode_ranges, episodes, TASKS):
        for t in range(end - start):
            sample = dataset[start + t]
            assert sample[keys.TASK] == task
            assert torch.equal(sample[keys.STATE], torch.from_numpy(frames["observation.state"][t]))
            assert torch.equal(sample[keys.ACTIONS][0], torch.from_numpy(frames["action"][t]))
            for c, camera in enumerate(CAMERAS):
                image = (sample[keys.IMAGES][c] * 255).round().permute(1, 2, 0).numpy()
                error = np.abs(image - frames[f"observation.images.{camera}"][t])
                assert error.max() <= max_error and error.mean() <= mean_error, (start + t, camera)
                depth = frames[f"observation.depth.{camera}"][t]
                assert np.abs(sample[keys.DEPTH][c].numpy() - depth).max() <= 0.0005 + 1e-6
                assert torch.equal(sample[keys.INTRINSICS][c], torch.from_numpy(frames[f"observation.intrinsics.{camera}"][t]))
                assert torch.equal(sample[keys.CAM_TO_WORLD][c], torch.from_numpy(frames[f"observation.cam_to_world.{camera}"][t]))


def test_round_trip(written):
    root, episodes = written
    dataset = LeRobotDataset(root, horizon=3)
    assert len(dataset) == sum(LENGTHS) and dataset.tasks == [TASKS[0], TASKS[1]]
    assert_samples_match(dataset, episodes)
    sample = dataset[0]
    assert sample[keys.IMAGES].shape == (2, 3, *SIZE) and sample[keys.IMAGES].dtype == torch.float32
    assert sample[keys.DEPTH].shape == (2, *SIZE) and sample[keys.DEPTH].dtype == torch.float32
    assert sample[keys.INTRINSICS].shape == (2, 3, 3) and sample[keys.CAM_TO_WORLD].shape == (2, 4, 4)


def test_stats_equal_numpy(written):
    root, episodes = written
    stats = LeRobotDataset(root, horizon=1, load_depth=False).stats
    for name in ("observation.state", "action"):
        values = np.concatenate([e[name] for e in episodes]).astype(np.float64)
        expected = {
            "mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0),
            "q01": np.quantile(values, 0.01, axis=0), "q99": np.quantile(values, 0.99, axis=0), "count": [len(values)],
        }
        assert set(stats[name]) == set(expected)
        for stat, value in expected.items():
            np.testing.assert_allclose(stats[name][stat].numpy(), value, rtol=1e-6, atol=1e-7, err_msg=f"{name}.{stat}")


def test_chunks_are_padded_and_masked_at_episode_ends(written):
    root, episodes = written
    horizon = 4
    dataset = LeRobotDataset(root, horizon=horizon, cameras=["wrist"], load_depth=False)
    for (start, end), frames in zip(dataset.episode_ranges, episodes):
        actions = frames["action"]
        for i in range(start, end):
            sample = dataset[i]
            assert sample[keys.ACTIONS].shape == (horizon, 3) and sample[keys.ACTION_MASK].dtype == torch.bool
            for h in range(horizon):
                inside = i + h < end
                assert bool(sample[keys.ACTION_MASK][h]) == inside, (i, h)
                expected = actions[min(i + h, end - 1) - start]
                assert torch.equal(sample[keys.ACTIONS][h], torch.from_numpy(expected)), (i, h)
    assert dataset[5][keys.ACTION_MASK].tolist() == [True, False, False, False]  # the 1-step episode


def test_camera_subset_and_collate(written):
    root, _ = written
    dataset = LeRobotDataset(root, horizon=2, cameras=["wrist"], load_depth=False)
    batch = collate([dataset[i] for i in (0, 4, 5)])
    assert keys.DEPTH not in batch
    assert batch[keys.IMAGES].shape == (3, 1, 3, *SIZE)
    assert batch[keys.INTRINSICS].shape == (3, 1, 3, 3) and batch[keys.CAM_TO_WORLD].shape == (3, 1, 4, 4)
    assert batch[keys.STATE].shape == (3, 4) and batch[keys.ACTIONS].shape == (3, 2, 3)
    assert batch[keys.ACTION_MASK].tolist() == [[True, True], [True, False], [True, False]]
    assert batch[keys.TASK] == [TASKS[0], TASKS[0], TASKS[1]]
    with pytest.raises(ValueError, match=r"cameras \['top'\] requested; the dataset has image cameras \['front', 'wrist'\]"):
        LeRobotDataset(root, horizon=2, cameras=["top"])
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]


def test_without_optional_geometry(tmp_path):
    episodes = [make_episode(3, 0, cameras=["front"], depth=False, pose=False)]
    write(tmp_path / "d", episodes, cameras=["front"], depth=False, cam_to_world=False)
    sample = LeRobotDataset(tmp_path / "d", horizon=2)[0]
    assert set(sample) == {keys.IMAGES, keys.INTRINSICS, keys.TASK, keys.STATE, keys.ACTIONS, keys.ACTION_MASK}


def test_depth_encoding_marks_invalid_as_zero():
    depth = np.array([[0.2, 1.23449, np.nan], [-1.0, 70.0, 65.535]])
    assert decode_png(encode_depth_png(depth)).tolist() == [[200, 1234, 0], [0, 0, 65535]]


def test_refuses_to_overwrite(tmp_path):
    root = tmp_path / "d"
    write(root)
    with pytest.raises(FileExistsError, match=r"d exists and is not empty .*overwrite=True"):
        DatasetWriter(root, fps=10, cameras=["front"], state_dim=4, action_dim=3)
    write(root, [make_episode(2, 7, cameras=["front"], depth=False, pose=False)], cameras=["front"], depth=False,
          cam_to_world=False, overwrite=True)
    assert not (root / episode_path(1)).exists()  # the old episodes are gone
    assert len(LeRobotDataset(root, horizon=1)) == 2


def test_writer_errors(tmp_path):
    writer = DatasetWriter(tmp_path / "d", fps=10, cameras=CAMERAS, state_dim=4, action_dim=3, depth=True, cam_to_world=True)
    frames = make_episode(3, 0)
    with pytest.raises(ValueError, match=r"missing \['observation.depth.front'\], unexpected \[\]"):
        writer.add_episode({k: v for k, v in frames.items() if k != "observation.depth.front"}, "t")
    with pytest.raises(ValueError, match=r"episode 0: 'action' must have shape \[3, 3\] \(T = len\(state\)\); got \[2, 3\]"):
        writer.add_episode({**frames, "action": frames["action"][:2]}, "t")
    with pytest.raises(ValueError, match=r"'observation.state' has NaN"):
        writer.add_episode({**frames, "observation.state": np.full((3, 4), np.nan)}, "t")
    with pytest.raises(ValueError, match="must be uint8; got float32"):
        writer.add_episode({**frames, "observation.images.front": frames["observation.images.front"].astype(np.float32)}, "t")
    with pytest.raises(ValueError, match="no episodes were added"):
        writer.finalize()
    with pytest.raises(ValueError, match=r"cameras must be distinct"):
        DatasetWriter(tmp_path / "e", fps=10, cameras=["a", "a"], state_dim=4, action_dim=3)


def _rewrite(path: Path, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def test_reader_errors(tmp_path):
    root = tmp_path / "d"
    write(root)
    parquet = root / episode_path(2)

    (root / "meta/info.json").rename(root / "info.bak")
    with pytest.raises(FileNotFoundError, match=r"meta/info.json: missing"):
        LeRobotDataset(root, horizon=2)
    (root / "info.bak").rename(root / "meta/info.json")

    original = pq.read_table(parquet)
    _rewrite(parquet, lambda t: t.drop_columns(["action"]))
    with pytest.raises(EpisodeError, match=r"episode_000002.parquet \(episode 2\): missing column\(s\) \['action'\]"):
        LeRobotDataset(root, horizon=2)

    actions = np.stack(original.column("action").to_pylist()).astype(np.float32)
    actions[4, 1] = np.nan
    nan_column = pa.array(list(actions), pa.list_(pa.float32()))
    _rewrite(parquet, lambda t: original.set_column(original.schema.get_field_index("action"), "action", nan_column))
    with pytest.raises(EpisodeError, match=r"episode_000002.parquet \(episode 2\): NaN or inf in 'action' at frame\(s\) \[4\]"):
        LeRobotDataset(root, horizon=2)

    _rewrite(parquet, lambda t: original.slice(0, 6))
    with pytest.raises(EpisodeError, match=r"episode_000002.parquet \(episode 2\): 6 frames, but .*episodes.jsonl says the episode has length 7"):
        LeRobotDataset(root, horizon=2)

    size = len(original_bytes := parquet.read_bytes())
    parquet.write_bytes(original_bytes[: size // 2])
    with pytest.raises(EpisodeError, match=r"episode_000002.parquet \(episode 2\): .*(Parquet|parquet|magic)") as err:
        LeRobotDataset(root, horizon=2)
    assert err.value.episode == 2 and err.value.path == parquet

    parquet.unlink()
    with pytest.raises(EpisodeError, match=r"episode_000002.parquet \(episode 2\): missing \(listed in .*episodes.jsonl\)"):
        LeRobotDataset(root, horizon=2)


def test_a_corrupt_frame_is_named_by_column_and_frame(tmp_path):
    root = tmp_path / "d"
    write(root)
    parquet = root / episode_path(0)
    table = pq.read_table(parquet)
    column = "observation.images.front"
    frames = table.column(column).to_pylist()
    frames[3] = {**frames[3], "bytes": frames[3]["bytes"][:40]}  # a PNG cut short
    _rewrite(parquet, lambda t: t.set_column(t.schema.get_field_index(column), column,
                                             pa.array(frames, table.schema.field(column).type)))
    with pytest.raises(EpisodeError, match=rf"episode_000000.parquet \(episode 0\): column .{column}., row 3: not a readable image"):
        LeRobotDataset(root, horizon=2)


def test_bad_episodes_can_be_skipped_explicitly_and_are_counted(tmp_path, caplog):
    root = tmp_path / "d"
    episodes = write(root)
    (root / episode_path(1)).unlink()
    broken = root / episode_path(2)
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(EpisodeError, match=r"episode_000001.parquet \(episode 1\): missing"):
        LeRobotDataset(root, horizon=2)  # the default: refuse rather than train on part of the data
    with caplog.at_level("WARNING", logger="vlablocks.data.reader"):
        dataset = LeRobotDataset(root, horizon=3, skip_bad_episodes=True)
    assert [e for e, _ in dataset.skipped] == [1, 2]
    assert "missing" in dataset.skipped[0][1]
    assert f"skipped 2 of 3 episodes ({LENGTHS[0]} frames kept)" in caplog.text
    assert len(dataset) == LENGTHS[0] and dataset.episode_ranges == [(0, LENGTHS[0])]
    kept = episodes[0]
    for i in range(LENGTHS[0]):
        sample = dataset[i]
        assert torch.equal(sample[keys.STATE], torch.from_numpy(kept["observation.state"][i]))
        assert torch.equal(sample[keys.IMAGES][0], torch.from_numpy(kept["observation.images.front"][i]).permute(2, 0, 1).float() / 255)
    assert sample[keys.ACTION_MASK].tolist() == [True, False, False]  # the episode end is the kept episode's
    assert sample[keys.TASK] == TASKS[0]
    (root / episode_path(0)).unlink()
    with pytest.raises(ValueError, match=r"every episode is bad"):
        LeRobotDataset(root, horizon=2, skip_bad_episodes=True)


@pytest.mark.parametrize("data_path", ["../elsewhere/episode_{episode_index:06d}.parquet",
                                       "/tmp/episode_{episode_index:06d}.parquet"])
def test_a_data_path_outside_the_dataset_is_refused(tmp_path, data_path):
    root = tmp_path / "d"
    write(root)
    info = json.loads((root / "meta/info.json").read_text())
    (tmp_path / "elsewhere").mkdir()
    for i in range(3):  # a readable copy outside: refused all the same, never read
        (tmp_path / "elsewhere" / f"episode_{i:06d}.parquet").write_bytes((root / episode_path(i)).read_bytes())
    (root / "meta/info.json").write_text(json.dumps({**info, "data_path": data_path}))
    with pytest.raises(ValueError, match=r"info.json: data_path gives .* points outside the dataset"):
        LeRobotDataset(root, horizon=2)


def test_a_duplicated_or_missing_episode_list_is_refused(tmp_path):
    root = tmp_path / "d"
    write(root)
    episodes = (root / "meta/episodes.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in episodes]
    rows[2] = {**rows[2], "episode_index": 1, "length": rows[2]["length"]}  # episode 1 twice, episode 2 never
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"episodes.jsonl: episode_index \[1\] listed more than once"):
        LeRobotDataset(root, horizon=2)
    (root / "meta/episodes.jsonl").write_text("")
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "total_episodes": 0, "total_frames": 0}))
    with pytest.raises(ValueError, match=r"episodes.jsonl: the dataset has no episodes"):
        LeRobotDataset(root, horizon=2)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["action"]["mean"].__setitem__(1, math.nan), r"stats.json: action.mean must be finite; dims \[1\] are \[nan\]"),
    (lambda s: s["observation.state"]["std"].__setitem__(0, -1.0), r"stats.json: observation.state.std must be >= 0"),
    (lambda s: s["action"].__setitem__("q99", [1.0]), r"stats.json: action.q99 has 1 values; the feature has \d+"),
    (lambda s: s["action"].__setitem__("min", "low"), r"stats.json: action.min must be a list of numbers; got low"),
])
def test_statistics_are_checked_when_the_dataset_opens(tmp_path, edit, message):
    root = tmp_path / "d"
    write(root)
    stats = json.loads((root / "meta/stats.json").read_text())
    edit(stats)
    (root / "meta/stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=message):
        LeRobotDataset(root, horizon=2)


def test_image_statistics_from_histograms_equal_the_float_reduction():
    images = np.random.default_rng(0).integers(0, 256, size=(5, 6, 8, 3), dtype=np.uint8)
    images[..., 1] = np.clip(images[..., 1], 7, 200)
    stats, values = image_stats(images), images.reshape(-1, 3).astype(np.float64) / 255
    for name, expected in (("mean", values.mean(0)), ("std", values.std(0)), ("min", values.min(0)), ("max", values.max(0))):
        np.testing.assert_allclose(stats[name].reshape(3), expected, rtol=0, atol=1e-12, err_msg=name)
    assert stats["mean"].shape == (3, 1, 1) and stats["count"].tolist() == [5]
    assert stats["min"][1, 0, 0] == 7 / 255 and stats["max"][1, 0, 0] == 200 / 255
