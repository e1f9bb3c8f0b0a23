"""Dataset-side contracts pinned value by value (gaps that mutation testing found: docs/mutation.md):
out-of-range frames, and the writer's files against those LeRobot was shown to read."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import toy_episode, write_toy_dataset
from test_dataset import assert_samples_match, make_episode, write
from test_dataset_formats import even_episodes
from vlablocks.data import DatasetWriter, LeRobotDataset
from vlablocks.data.meta import read_jsonl
from vlablocks.data.resize import PadResize
from vlablocks.data.video_writer import VideoEncodeError, _encoder_options, check_frames
from vlablocks.policy import batch as keys

FIXTURES = Path(__file__).resolve().parent / "data" / "lerobot"
sys.path.insert(0, str(FIXTURES))  # the fixture scripts import each other by name
import write_vlablocks  # noqa: E402  (the fixture's writer settings and frames)


def test_frames_out_of_range_are_refused_not_wrapped(tmp_path):
    # Python's negative indexing would silently hand out the last frame
    root = tmp_path / "data"
    write(root, [make_episode(3, seed=0), make_episode(2, seed=1)])
    dataset = LeRobotDataset(root, horizon=2, load_depth=False)
    assert len(dataset) == 5
    for index in (-1, 5):
        with pytest.raises(IndexError, match=rf"frame {index} out of range for 5 frames"):
            dataset[index]


def _close(a: Any, b: Any, where: str) -> None:
    """JSON-like values equal, floats within rounding (image statistics are sums whose order varies by machine)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-9, (where, a, b)
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


@pytest.mark.parametrize("name", list(write_vlablocks.OUTPUTS))
def test_the_writer_still_writes_what_lerobot_was_shown_to_read(name, tmp_path):
    # tests/data/lerobot/<name> was written by write_vlablocks.py and read back by LeRobot's own loader
    # (test_lerobot_fixtures.py); every metadata file and table the writer makes now must be the same: a renamed
    # key in info.json, the parquet schema's Hugging Face features or a video's info would break LeRobot's reader
    version, video = write_vlablocks.OUTPUTS[name]
    writer = DatasetWriter(tmp_path / name, fps=write_vlablocks.FPS, cameras=["front", "wrist"], state_dim=4, action_dim=3,
                           robot_type="fixture_bot", state_names=write_vlablocks.STATE_NAMES, version=version, video=video)
    for index, (length, task) in enumerate(zip(write_vlablocks.EPISODE_LENGTHS, write_vlablocks.EPISODE_TASKS)):
        writer.add_episode(write_vlablocks.episode(index, length), task)
    writer.finalize()
    expected_root, written_root = FIXTURES / name, tmp_path / name
    files = sorted(p.relative_to(expected_root) for p in expected_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(written_root) for p in written_root.rglob("*") if p.is_file())
    for relative in files:
        expected, written = expected_root / relative, written_root / relative
        if relative.suffix == ".json":
            _close(json.loads(written.read_text()), json.loads(expected.read_text()), str(relative))
        elif relative.suffix == ".jsonl":
            for number, (a, b) in enumerate(zip(written.read_text().splitlines(), expected.read_text().splitlines(), strict=True)):
                _close(json.loads(a), json.loads(b), f"{relative}:{number + 1}")
        elif relative.suffix == ".parquet":
            a, b = pq.read_table(written), pq.read_table(expected)
            assert a.schema.equals(b.schema, check_metadata=True), relative  # incl. the Hugging Face features
            _close(a.to_pydict(), b.to_pydict(), str(relative))


def test_v21_reader_follows_the_chunk_size_of_info_json_and_names_a_bad_field(tmp_path):
    # a v2.1 dataset with chunks of one episode: episode i lives under chunk-00i (data and videos)
    root = tmp_path / "d"
    episodes = write(root, even_episodes(), version="v2.1", video=True)
    for old in sorted(p for p in root.rglob("episode_*") if p.is_file() and "chunk-000" in str(p)):
        index = int(old.stem.removeprefix("episode_"))
        new = Path(str(old).replace("chunk-000", f"chunk-{index:03d}"))
        new.parent.mkdir(parents=True, exist_ok=True)
        old.rename(new)
    info_file = root / "meta" / "info.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "chunks_size": 1}))
    assert_samples_match(LeRobotDataset(root, horizon=3), episodes, 12, 3.0)  # AV1: within 12 / 255
    info_file.write_text(json.dumps({**info, "chunks_size": 1, "video_path": "../{video_key}/{episode_index}.mp4"}))
    with pytest.raises(ValueError, match=r"info.json: video_path gives '../observation.images.front/0.mp4', which "
                                         r"points outside the dataset"):
        LeRobotDataset(root, horizon=3)


def test_a_bad_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"episode_index": 0}\n\n{"episode_index": 1,\n')
    with pytest.raises(ValueError, match=r"episodes.jsonl:3: not valid JSON \(Expecting property name"):
        read_jsonl(path)
    path.write_text('{"episode_index": 0}\n\n{"episode_index": 1}\n')
    assert read_jsonl(path) == [{"episode_index": 0}, {"episode_index": 1}]  # blank lines are skipped


def test_history_windows_past_the_episode_end_repeat_its_last_frame_and_are_flagged(tmp_path):
    # LeRobot's delta_timestamps may look ahead (e.g. the next observation): frames after the episode's last one
    # repeat it and are flagged as padding, whatever the window's side
    root = tmp_path / "data"
    episodes = write(root, [make_episode(3, seed=0), make_episode(2, seed=1)])
    dataset = LeRobotDataset(root, horizon=2, cameras=["front"], load_depth=False,
                             history={"observation.state": [-0.1, 0.0, 0.1, 0.2], "observation.images.front": [0.0, 0.1]})
    states = [torch.from_numpy(e["observation.state"]) for e in episodes]
    for index, (episode, frame) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        sample, last = dataset[index], len(states[episode]) - 1
        wanted = [frame - 1, frame, frame + 1, frame + 2]
        assert sample["observation.state_is_pad"].tolist() == [not 0 <= f <= last for f in wanted]
        assert torch.equal(sample["observation.state"], states[episode][[min(max(f, 0), last) for f in wanted]])
        following = index if frame == last else index + 1
        assert sample["observation.images.front_is_pad"].tolist() == [False, frame == last]
        assert torch.equal(sample["observation.images.front"][1], dataset[following][keys.IMAGES][0])


def test_encoder_options_per_codec():
    assert _encoder_options("libsvtav1", 30, 2, None) == {"g": "2", "crf": "30", "preset": "10"}
    assert _encoder_options("libaom-av1", 30, 2, None) == {"g": "2", "crf": "30", "cpu-used": "8"}
    assert _encoder_options("libaom-av1", 30, 2, "4") == {"g": "2", "crf": "30", "cpu-used": "4"}
    assert _encoder_options("libx264", 23, 10, None) == {"g": "10", "crf": "23", "preset": "medium"}
    assert _encoder_options("libx265", 23, 10, "fast") == {"g": "10", "crf": "23", "preset": "fast",
                                                          "x265-params": "log-level=error"}
    assert _encoder_options("mpeg4", 23, 10, None) == {"g": "10", "crf": "23"}


@pytest.mark.parametrize(("shape", "pix_fmt", "bad"), [((2, 4, 6, 3), "yuv420p", False), ((2, 5, 6, 3), "yuv420p", True),
                                                      ((2, 4, 5, 3), "yuv420p", True), ((2, 5, 6, 3), "yuv422p", False),
                                                      ((2, 4, 5, 3), "yuv422p", True), ((2, 5, 5, 3), "yuv444p", False)])
def test_frame_sizes_the_pixel_format_can_hold(shape, pix_fmt, bad):
    frames = np.zeros(shape, np.uint8)
    if bad:
        with pytest.raises(VideoEncodeError, match=rf"clip.mp4: pix_fmt {pix_fmt} needs even height and width; "
                                                   rf"got {shape[1]}x{shape[2]}"):
            check_frames(frames, Path("clip.mp4"), pix_fmt)
    else:
        assert check_frames(frames, Path("clip.mp4"), pix_fmt).shape == shape


def test_frames_are_checked_for_yuv420p_by_default():
    assert check_frames(np.zeros((2, 4, 6, 3), np.uint8), Path("clip.mp4")).shape == (2, 4, 6, 3)
    with pytest.raises(VideoEncodeError, match=r"pix_fmt yuv420p needs even height and width; got 5x6"):
        check_frames(np.zeros((2, 5, 6, 3), np.uint8), Path("clip.mp4"))


def test_decoded_bytes_count_rgb_and_depth_per_frame(tmp_path):
    root = tmp_path / "data"
    write(root, [make_episode(3, seed=0), make_episode(2, seed=1)])
    with_depth = LeRobotDataset(root, horizon=2, cameras=["front"], cache=False)
    h, w = with_depth[0][keys.IMAGES].shape[-2:]
    assert with_depth.decoded_bytes() == 5 * (3 * h * w + 2 * h * w)
    assert LeRobotDataset(root, horizon=2, cameras=["front"], cache=False, load_depth=False).decoded_bytes() == 5 * 3 * h * w


def test_resize_with_pad_of_a_portrait_frame_moves_the_principal_point_right():
    # 64 x 48 (portrait) -> 32: scale 0.5 to 32 x 24, 4 columns of padding on the left; a 3D point projects through
    # the new K where its pixel went, for a homogeneous K whose last row is not 1 as well
    resize = PadResize(64, 48, 32)
    assert (resize.new_shape, resize.offset) == ((32, 24), (0, 4))
    point = torch.tensor([0.3, -0.2, 2.0])
    for k in (torch.tensor([[50.0, 0.0, 23.5], [0.0, 52.0, 31.0], [0.0, 0.0, 1.0]]),
              torch.tensor([[100.0, 0.0, 47.0], [0.0, 104.0, 62.0], [0.0, 0.0, 2.0]])):
        uv = (k @ point)[:2] / (k @ point)[2]
        new = resize.intrinsics(k) @ point
        torch.testing.assert_close(new[:2] / new[2], uv * 0.5 + torch.tensor([4.0, 0.0]))
    images = torch.rand(2, 3, 64, 48)  # batched frames keep their leading dims
    assert resize.images(images).shape == (2, 3, 32, 32) and resize.images(images[0]).shape == (3, 32, 32)


def test_replacing_a_dataset_whose_root_vanished_puts_the_new_one_in_place(tmp_path):
    root = tmp_path / "d"
    write_toy_dataset(root, lengths=(3,))
    writer = DatasetWriter(root, fps=10, cameras=["corner"], state_dim=4, action_dim=4, overwrite=True)
    writer.add_episode(toy_episode(2, np.random.default_rng(2)), "push the button")
    shutil.rmtree(root)  # the user removed the old dataset while the new one was written
    assert writer.finalize() == root
    assert len(LeRobotDataset(root, horizon=1)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no hidden staging directory left


def test_writer_and_reader_refusals_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"fps must be > 0; got 0"):
        DatasetWriter(tmp_path / "a", fps=0, cameras=["corner"], state_dim=4, action_dim=4)
    writer = DatasetWriter(tmp_path / "b", fps=10, cameras=["corner"], state_dim=4, action_dim=4)
    with pytest.raises(ValueError, match=r"an episode needs at least one step; got 0"):
        writer.add_episode(toy_episode(0, np.random.default_rng(0)), "push the button")
    writer.abort()

    root = write_toy_dataset(tmp_path / "c", lengths=(3,), version="v2.1")
    stats = root / "meta" / "stats.json"
    saved = stats.read_text()
    stats.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"meta/stats.json: expected a JSON object; got list"):
        LeRobotDataset(root, horizon=1)
    stats.write_text(saved)
    (root / "meta" / "tasks.jsonl").write_text('{"task_index": 7, "task": "push the button"}\n')
    with pytest.raises(ValueError, match=r"meta: task_index \[0\] used by the episodes is not listed in the tasks"):
        LeRobotDataset(root, horizon=1)
