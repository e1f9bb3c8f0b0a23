"""The writer's v3.0 (default) and v2.1 layouts, with frames as PNG or video, read back by the
reader: values, layout, statistics, streaming against caching."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from test_dataset import CAMERAS, LENGTHS, TASKS, assert_samples_match, make_episode, write
from vlablocks.data import LeRobotDataset, layouts
from vlablocks.data.meta import read_meta
from vlablocks.data.resize import PadResize
from vlablocks.policy import batch as keys


def even_episodes() -> list[dict[str, np.ndarray]]:
    """The toy episodes at 16 x 16 (yuv420p video needs even sizes) with smooth images (lossy codecs)."""
    episodes = []
    for seed, length in enumerate(LENGTHS):
        frames = make_episode(length, seed)
        for camera in CAMERAS:
            y, x = np.mgrid[:16, :16]
            base = np.stack([40 + x * 4, 40 + y * 4, np.full((16, 16), 40 + 40 * seed)], -1)
            frames[f"observation.images.{camera}"] = np.stack([base + 10 * t for t in range(length)]).astype(np.uint8)
            frames[f"observation.depth.{camera}"] = np.full((length, 16, 16), 1.5, np.float32)
        episodes.append(frames)
    return episodes


@pytest.fixture(scope="module", params=[("v3.0", False), ("v3.0", True), ("v2.1", True)], ids=["v30-png", "v30-video", "v21-video"])
def written(request, tmp_path_factory):
    version, video = request.param
    root = tmp_path_factory.mktemp("formats") / "d"
    return root, write(root, even_episodes(), version=version, video=video), version, video  # LeRobot's AV1


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
def test_round_trip(written, cache):
    root, episodes, _, video = written
    dataset = LeRobotDataset(root, horizon=3, cache=cache)
    assert_samples_match(dataset, episodes, *((12, 3.0) if video else (0, 0.0)))  # AV1: within 12 / 255


def test_layout(written):
    root, _, version, video = written
    info = json.loads((root / "meta/info.json").read_text())
    meta = read_meta(root)
    assert info["codebase_version"] == meta.version == version
    assert info["features"]["observation.images.front"]["dtype"] == ("video" if video else "image")
    assert {k for k in info["features"] if k.startswith("observation.depth.")} == {f"observation.depth.{c}" for c in CAMERAS}
    if video:
        assert info["features"]["observation.images.front"]["info"]["video.codec"] == "av1"
    if version == "v3.0":
        assert sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*.parquet")) == ["data/chunk-000/file-000.parquet"]
        episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
        assert [(e["dataset_from_index"], e["dataset_to_index"]) for e in episodes] == [(0, 5), (5, 6), (6, 13)]
        tasks = pq.read_table(root / "meta/tasks.parquet")
        assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
        assert dict(zip(tasks.column("task").to_pylist(), tasks.column("task_index").to_pylist())) == {TASKS[0]: 0, TASKS[1]: 1}
        if video:
            spans = [e.videos["observation.images.wrist"] for e in meta.episodes]
            assert len({s.path for s in spans}) == 1 and [s.from_timestamp for s in spans] == pytest.approx([0.0, 0.5, 0.6])
    else:
        stats = [json.loads(line) for line in (root / "meta/episodes_stats.jsonl").read_text().splitlines()]
        assert [s["episode_index"] for s in stats] == [0, 1, 2] and stats[1]["stats"]["action"]["count"] == [1]
        assert len(list((root / "videos").rglob("*.mp4"))) == (3 * len(CAMERAS) if video else 0)


def test_streamed_workers_read_what_one_process_reads(written):
    root, *_ = written
    dataset = LeRobotDataset(root, horizon=2, cache=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list,
                                         multiprocessing_context="fork")
    samples = [s for batch in loader for s in batch]
    assert len(samples) == len(dataset)
    for i in (0, 5, 12):
        assert torch.equal(samples[i][keys.IMAGES], dataset[i][keys.IMAGES])


def test_frames_are_found_across_row_groups(tmp_path, monkeypatch):
    """A frame read on demand reads only its row group (of ``ROW_GROUP_ROWS``); every frame comes
    back right when an episode spans groups and a group spans episodes, with a cache of 4 groups."""
    monkeypatch.setattr(layouts, "ROW_GROUP_ROWS", 4)
    episodes = write(tmp_path / "d", even_episodes(), version="v3.0")
    meta = pq.ParquetFile(tmp_path / "d" / "data/chunk-000/file-000.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 4, 1]
    dataset = LeRobotDataset(tmp_path / "d", horizon=1, cache=False)
    frames = np.concatenate([e["observation.images.wrist"] for e in episodes])
    for index in (12, 0, 7, 3, 8, 5, 11, 1):  # out of order: groups are evicted and read again
        image = (dataset[index][keys.IMAGES][1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(image, frames[index]), index


def test_resize_with_pad_moves_pixels_depth_and_intrinsics_together():
    """48 x 64 -> 32: scale 0.5 to 24 x 32, 4 rows of padding above. A 3D point projects through
    the new K where its pixel went; depth keeps its values (nearest) and pads with 0 (no depth)."""
    resize = PadResize(48, 64, 32)
    assert (resize.new_shape, resize.offset) == ((24, 32), (4, 0))
    k = torch.tensor([[50.0, 0.0, 31.5], [0.0, 52.0, 23.0], [0.0, 0.0, 1.0]])
    point = torch.tensor([0.3, -0.2, 2.0])
    uv = (k @ point)[:2] / point[2]
    uv_new = (resize.intrinsics(k) @ point)[:2] / point[2]
    torch.testing.assert_close(uv_new, uv * 0.5 + torch.tensor([0.0, 4.0]))
    depth = resize.depth(torch.arange(48 * 64, dtype=torch.float32).reshape(48, 64))
    assert depth.shape == (32, 32) and depth[:4].abs().max() == 0 and depth[28:].abs().max() == 0
    assert depth[4, 0] == 1 * 64 + 1 and depth[5, 1] == 3 * 64 + 3  # the source pixel under each centre, no blending
    assert PadResize(32, 32, 32).identity and PadResize(32, 32, 32).images(torch.ones(3, 32, 32)).shape == (3, 32, 32)
