"""vlablocks reads datasets that LeRobot's own code wrote (v3.0 with video, v3.0 with images, v2.1
with one video and one image camera) to the values LeRobot's own loader returned for them; and
LeRobot's loader read the datasets vlablocks wrote (v3.0 and v2.1 with video) to the values
vlablocks' reader returns.

The fixtures and reference values are made by ``tests/data/lerobot/generate.py`` in LeRobot's own
environments (README there); this suite does not need LeRobot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file

from vlablocks.cli import main
from vlablocks.data import LeRobotDataset
from vlablocks.io import hub
from vlablocks.data.meta import read_meta
from vlablocks.policy import batch as keys
from vlablocks.train.metrics import read_metrics

FIXTURES = Path(__file__).resolve().parent / "data" / "lerobot"
NAMES = ("v30_video", "v30_images", "v21")
CAMERAS = ("observation.images.front", "observation.images.wrist")
HORIZON = 4  # the reference's delta_timestamps: action at 0, 0.1, 0.2, 0.3 s (fps 10)


def reference(name: str, suffix: str = "reference") -> tuple[dict, dict[str, torch.Tensor]]:
    return (json.loads((FIXTURES / f"{name}_{suffix}.json").read_text()),
            load_file(FIXTURES / f"{name}_{suffix}.safetensors"))


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
@pytest.mark.parametrize("name", NAMES)
def test_samples_equal_lerobots_loader(name, cache):
    check_samples(name, "reference", cache)


@pytest.mark.parametrize("name", ["vlablocks_v30_video", "vlablocks_v21_video"])
def test_lerobot_reads_what_vlablocks_writes(name):
    """``write_vlablocks.py`` wrote these with DatasetWriter; LeRobot 0.6.1 (v3.0) and 0.3.3 (v2.1)
    loaded them without error to the same frames, states, action chunks, pads and tasks."""
    ref, _ = reference(name, "lerobot")
    assert ref["ok"] and "error" not in ref
    assert ref["meta"]["codebase_version"] == {"vlablocks_v30_video": "v3.0", "vlablocks_v21_video": "v2.1"}[name]
    assert all(err["nearest_source_frame"] == {"episode_index": item["episode_index"]["value"], "frame_index": item["frame_index"]["value"]}
               and err["max_abs"] <= 9 for item in ref["items"].values() for err in item["_error_vs_source_frame_uint8"].values())
    check_samples(name, "lerobot", cache=False)


def check_samples(name: str, suffix: str, cache: bool) -> None:
    """vlablocks' samples of dataset ``name`` equal what LeRobot's loader recorded in ``name_suffix.json``."""
    ref, frames = reference(name, suffix)
    for camera in CAMERAS:  # one camera at a time: their sizes differ (48 x 64 and 32 x 32)
        dataset = LeRobotDataset(FIXTURES / name, horizon=HORIZON, cameras=[camera], cache=cache)
        assert (dataset._cache is not None) == cache
        assert len(dataset) == ref["meta"]["num_frames"] == 21
        assert dataset.episode_ranges == [tuple(b) for b in ref["meta"]["episode_bounds"]]
        for index in ref["indices"]:
            item, sample = ref["items"][str(index)], dataset[index]
            assert sample[keys.TASK] == item["task"]["value"]
            assert sample[keys.STATE].tolist() == item["observation.state"]["value"]
            assert sample[keys.ACTIONS].tolist() == item["action"]["value"]
            assert (~sample[keys.ACTION_MASK]).tolist() == item["action_is_pad"]["value"]
            ours = (sample[keys.IMAGES][0] * 255).round().to(torch.uint8)
            assert torch.equal(ours, frames[f"{index}/{camera}"]), (index, camera)  # the same decoder: bit-exact
    with pytest.raises(ValueError, match=r"different image sizes \[\(32, 32\), \(48, 64\)\]; pass image_size"):
        LeRobotDataset(FIXTURES / name, horizon=HORIZON)
    both = LeRobotDataset(FIXTURES / name, horizon=HORIZON, image_size=32)
    assert both.camera_keys == list(CAMERAS) and both[0][keys.IMAGES].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_metadata_and_statistics_equal_lerobots(name):
    ref, _ = reference(name)
    meta = read_meta(FIXTURES / name)
    assert meta.version == ref["meta"]["codebase_version"] and meta.fps == ref["meta"]["fps"]
    assert [e.length for e in meta.episodes] == [7, 5, 9] and meta.total_frames == 21
    assert sorted(meta.tasks.values()) == ["open the drawer", "pick the cube"]
    assert [e.tasks for e in meta.episodes] == [("pick the cube",), ("open the drawer",), ("pick the cube",)]
    assert sorted(meta.video_keys) == sorted(k for k, f in ref["meta"]["features"].items() if f["dtype"] == "video")
    for feature in ("observation.state", "action"):
        theirs = ref["meta"]["stats"][feature]
        for stat in ("min", "max", "mean", "std"):  # v2.1: pooled from episodes_stats.jsonl, as LeRobot pools them
            np.testing.assert_allclose(meta.stats[feature][stat], theirs[stat], rtol=1e-6, atol=1e-9, err_msg=f"{feature}.{stat}")


def test_video_episodes_sit_one_after_another_in_a_v30_file():
    meta = read_meta(FIXTURES / "v30_video")
    spans = [e.videos["observation.images.front"] for e in meta.episodes]
    assert len({s.path for s in spans}) == 1 and [s.from_timestamp for s in spans] == pytest.approx([0.0, 0.7, 1.2])
    v21 = read_meta(FIXTURES / "v21")
    assert [e.videos["observation.images.front"].path.name for e in v21.episodes] == [
        f"episode_{i:06d}.mp4" for i in range(3)]
    assert "observation.images.wrist" not in v21.episodes[0].videos  # stored as images in this fixture


def test_frames_are_resized_with_padding_to_the_recipe_size():
    dataset = LeRobotDataset(FIXTURES / "v30_images", horizon=2, image_size=32, cameras=["front"])
    image = dataset[3][keys.IMAGES][0]  # 48 x 64 -> 24 x 32, 4 black rows above and below
    assert image.shape == (3, 32, 32)
    assert image[:, :4].abs().max() == 0 and image[:, 28:].abs().max() == 0 and image[:, 4:28].min() > 0
    native = LeRobotDataset(FIXTURES / "v30_images", horizon=2, cameras=["front"])[3][keys.IMAGES][0]
    expected = torch.nn.functional.interpolate(native[None], size=(24, 32), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(image[:, 4:28], expected.clamp(0, 1), rtol=0, atol=1e-6)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", NAMES)
def test_vlablocks_train_runs_on_each_fixture(name, tmp_path, capsys):
    """A few steps of ``vlablocks train`` on each LeRobot-written dataset: both cameras resized with
    padding to the recipe's 32 px, a checkpoint written, the dataset untouched."""
    before = snapshot(FIXTURES / name)
    out = tmp_path / "run"
    assert main(["train", "tiny_pi0", "--data", str(FIXTURES / name), "--out", str(out), "--steps", "2",
                 "policy.action_dim=3", "policy.state_dim=4", "train.batch_size=4", "train.log_every=1"]) == 0, \
        capsys.readouterr().err
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    info = json.loads((out / "data.json").read_text())
    assert info["format"] == ref_version(name) and info["cameras"] == ["front", "wrist"] and info["image_size"] == 32
    assert (out / "checkpoints" / "step_0000002" / "model.safetensors").is_file()
    assert snapshot(FIXTURES / name) == before


def ref_version(name: str) -> str:
    return reference(name)[0]["meta"]["codebase_version"]


def test_feature_selection_and_recomputed_statistics(tmp_path):
    """``--cameras``, ``--state-key``, ``--action-key`` pick features; v2.1 stats lack quantiles
    (LeRobot pools episodes_stats without them), so they are computed from the frames."""
    dataset = LeRobotDataset(FIXTURES / "v21", horizon=2, cameras=["wrist"], state_key="action", action_key="action")
    assert dataset.camera_keys == ["observation.images.wrist"] and dataset.state_dim == 3
    assert torch.equal(dataset[0][keys.STATE], dataset[0][keys.ACTIONS][0])
    stats = dataset.stats
    assert "q01" not in dataset.meta.stats["action"] and stats["action"]["q01"].shape == (3,)
    all_actions = dataset.table.vectors["action"].astype(np.float64)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(all_actions, 0.99, axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["mean"], dataset.meta.stats["action"]["mean"], rtol=1e-6)  # kept
    recomputed = LeRobotDataset(FIXTURES / "v30_video", horizon=2, cameras=["wrist"], recompute_stats=True).stats
    lerobot = LeRobotDataset(FIXTURES / "v30_video", horizon=2, cameras=["wrist"]).stats
    assert recomputed["action"]["q01"][0] == pytest.approx(np.quantile(all_actions[:, 0], 0.01), rel=1e-6)
    assert lerobot["action"]["q01"][0] > 100  # LeRobot's pooled quantiles: a weighted mean of the episodes' own
    with pytest.raises(ValueError, match=r"features must include 'observation.joints'"):
        LeRobotDataset(FIXTURES / "v21", horizon=2, image_size=32, state_key="observation.joints")


def test_a_hub_dataset_id_is_downloaded_through_huggingface_hub(tmp_path, monkeypatch, capsys):
    """No network here: ``snapshot_download`` is replaced by a copy of a local fixture, which is
    what a download leaves in the cache; the call's arguments are checked."""
    calls = []

    def fake_snapshot_download(repo_id: str, repo_type: str, revision: str | None, allow_patterns: list | None) -> str:
        calls.append((repo_id, repo_type, revision, allow_patterns))
        target = tmp_path / "cache" / repo_id.replace("/", "--")
        shutil.copytree(FIXTURES / "v30_video", target)
        return str(target)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert main(["train", "tiny_pi0", "--data", "lerobot/fixture_bot", "--out", str(tmp_path / "run"), "--steps", "1",
                 "policy.action_dim=3", "policy.state_dim=4", "train.batch_size=2"]) == 0
    assert calls == [("lerobot/fixture_bot", "dataset", None, None)]
    info = json.loads((tmp_path / "run" / "data.json").read_text())
    assert info["source"] == "lerobot/fixture_bot" and info["data"] == str((tmp_path / "cache" / "lerobot--fixture_bot").resolve())

    def offline(**_):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    capsys.readouterr()
    assert main(["train", "tiny_pi0", "--data", "lerobot/elsewhere", "--out", str(tmp_path / "run2")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlablocks train: lerobot/elsewhere: no such local directory, and the Hub dataset could not be "
                          "fetched (LocalEntryNotFoundError") and "huggingface-cli download" in err
    assert not (tmp_path / "run2").exists()
    with pytest.raises(FileNotFoundError, match="no such dataset directory"):
        hub.resolve_dataset(tmp_path / "missing" / "dir")


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
@pytest.mark.parametrize("name", ["v30_video", "v21"])
def test_history_windows_equal_lerobots_delta_timestamps(name, cache):
    """``history`` = LeRobot's ``delta_timestamps``: the reference's second load asked for
    ``observation.state`` at -0.2, -0.1, 0 s; frames before the episode repeat its first, flagged."""
    ref, _ = reference(name)
    window = ref["state_window"]
    deltas = window["delta_timestamps"]["observation.state"]
    dataset = LeRobotDataset(FIXTURES / name, horizon=2, cameras=["front"], cache=cache,
                             history={"observation.state": deltas, "observation.images.front": [-0.1, 0.0]})
    for index, item in window["items"].items():
        sample = dataset[int(index)]
        assert sample["observation.state"].tolist() == item["observation.state"]
        assert sample["observation.state_is_pad"].tolist() == item["observation.state_is_pad"]
        assert torch.equal(sample["observation.images.front"][1], sample[keys.IMAGES][0])
        previous = int(index) if int(index) in (0, 7, 12) else int(index) - 1  # an episode's first frame repeats
        assert torch.equal(sample["observation.images.front"][0], dataset[previous][keys.IMAGES][0])
        assert sample["observation.images.front_is_pad"].tolist() == [int(index) in (0, 7, 12), False]
    with pytest.raises(ValueError, match=r"history\['action'\]: offsets must be a list of multiples of 1 / fps = 0.1 s"):
        LeRobotDataset(FIXTURES / name, horizon=2, cameras=["front"], history={"action": [0.05]})
    with pytest.raises(ValueError, match=r"history: 'observation.images.wrist' must be a selected camera"):
        LeRobotDataset(FIXTURES / name, horizon=2, cameras=["front"], history={"observation.images.wrist": [0.0]})
