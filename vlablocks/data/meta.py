"""What a LeRobot dataset holds and where, for format v2.1 and v3.0, without reading a frame.

::

    v2.1                                          v3.0
    meta/info.json                                meta/info.json
    meta/tasks.jsonl      {task_index, task}      meta/tasks.parquet       task (index), task_index
    meta/episodes.jsonl   {episode_index,         meta/episodes/chunk-*/file-*.parquet: episode_index,
                           tasks, length}           tasks, length, data/{chunk,file}_index,
                                                    dataset_{from,to}_index, videos/<key>/{chunk_index,
                                                    file_index, from_timestamp, to_timestamp}, stats/...
    meta/episodes_stats.jsonl (per episode)       meta/stats.json (global)
    meta/stats.json (v2.0, optional in v2.1)
    data/chunk-C/episode_E.parquet (one episode)  data/chunk-C/file-F.parquet (many episodes)
    videos/chunk-C/<key>/episode_E.mp4            videos/<key>/chunk-C/file-F.mp4 (many episodes)

:func:`read_meta` returns a :class:`DatasetMeta` either way: the features, tasks, statistics and
one :class:`EpisodeMeta` per episode with its data file and, per video feature, the file and the
timestamp its first frame has in that file. Every path read from a metadata file must stay inside
the dataset; every problem is a ValueError naming the file.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vlablocks.data.format import (
    CHUNKS_SIZE,
    INFO_FILE,
    STATS_FILE,
    V21_EPISODE_STATS,
    V21_EPISODES,
    V21_TASKS,
    V30_EPISODES_DIR,
    V30_TASKS,
    VERSIONS,
    episode_path,
)

INFO_FIELDS = ("codebase_version", "fps", "features", "data_path", "total_frames", "total_episodes")


@dataclass(frozen=True)
class VideoSpan:
    """Where an episode's frames of one video feature are: ``path``, and the timestamp (seconds)
    of the episode's first frame in that file (0 when the file holds one episode)."""

    path: Path
    from_timestamp: float


@dataclass(frozen=True)
class EpisodeMeta:
    """One episode: ``index`` (``episode_index``), ``length`` (frames), its tasks, the parquet
    file holding its rows, its :class:`VideoSpan` per video feature and the metadata file that
    lists it (for messages)."""

    index: int
    length: int
    tasks: tuple[str, ...]
    data_file: Path
    videos: Mapping[str, VideoSpan] = field(default_factory=dict)
    listed_in: Path = Path()


@dataclass(frozen=True)
class DatasetMeta:
    """A dataset's metadata (see the module docstring). ``stats``: feature -> statistic -> list."""

    root: Path
    version: str
    fps: float
    features: Mapping[str, Mapping[str, Any]]
    tasks: Mapping[int, str]
    episodes: Sequence[EpisodeMeta]
    stats: Mapping[str, Mapping[str, Any]]
    total_frames: int

    @property
    def video_keys(self) -> list[str]:
        """Features stored as video (``dtype: video``)."""
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    @property
    def image_keys(self) -> list[str]:
        """Camera features, stored as images or as video, in ``info.json`` order."""
        return [k for k, f in self.features.items() if f.get("dtype") in ("image", "video")]


def read_json(path: Path) -> Any:
    """A JSON file (FileNotFoundError / ValueError naming it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a LeRobot dataset (or an incomplete one)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file: one object per non-empty line (ValueError naming the line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a LeRobot dataset (or an incomplete one)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return rows


def read_meta(root: str | Path) -> DatasetMeta:
    """The metadata of the dataset at ``root`` (format v2.1 or v3.0)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset directory")
    info = read_json(root / INFO_FILE)
    _check_info(root, info)
    version = str(info["codebase_version"])
    tasks, episodes = (_v30_tables if version == "v3.0" else _v21_tables)(root, info)
    _check_episodes(root, info, episodes)
    stats = _read_stats(root, version)
    return DatasetMeta(root=root, version=version, fps=float(info["fps"]), features=info["features"], tasks=tasks,
                       episodes=episodes, stats=stats, total_frames=int(info["total_frames"]))


def _check_info(root: Path, info: Any) -> None:
    path = root / INFO_FILE
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object; got {type(info).__name__}")
    missing = [k for k in INFO_FIELDS if k not in info]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    if info["codebase_version"] not in VERSIONS:
        raise ValueError(f"{path}: codebase_version must be one of {list(VERSIONS)} (LeRobot's converter updates older "
                         f"datasets); got {info['codebase_version']!r}")
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"{path}: fps must be a number > 0; got {fps!r}")
    if not isinstance(info["features"], dict) or not info["features"]:
        raise ValueError(f"{path}: features must be a non-empty mapping")
    if any(f.get("dtype") == "video" for f in info["features"].values()) and "video_path" not in info:
        raise ValueError(f"{path}: video features need a video_path template")


def _inside(root: Path, relative: str, template: str) -> Path:
    """``root / relative`` (made from ``info.json``'s ``template`` field), refused (ValueError naming
    the file and the field) unless it stays inside ``root``."""
    path = root / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{root / INFO_FILE}: {template} gives {relative!r}, which points outside the dataset; "
                         f"it must be a path relative to {root}")
    return path


def _v21_tables(root: Path, info: Mapping[str, Any]) -> tuple[dict[int, str], list[EpisodeMeta]]:
    """Tasks and episodes of a v2.1 dataset (one parquet file and one video per episode)."""
    tasks = {int(row["task_index"]): str(row["task"]) for row in read_jsonl(root / V21_TASKS)}
    chunks = int(info.get("chunks_size", CHUNKS_SIZE))
    videos = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    episodes = []
    for row in read_jsonl(root / V21_EPISODES):
        index = int(row["episode_index"])
        data = _inside(root, episode_path(index, info["data_path"], chunks), "data_path")
        spans = {k: VideoSpan(_inside(root, episode_path(index, info["video_path"], chunks, video_key=k), "video_path"), 0.0)
                 for k in videos}
        episodes.append(EpisodeMeta(index, int(row["length"]), tuple(row.get("tasks", ())), data, spans,
                                    root / V21_EPISODES))
    return tasks, episodes


def _v30_tables(root: Path, info: Mapping[str, Any]) -> tuple[dict[int, str], list[EpisodeMeta]]:
    """Tasks and episodes of a v3.0 dataset (files holding many episodes)."""
    tasks = _v30_tasks(root / V30_TASKS)
    files = sorted((root / V30_EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / V30_EPISODES_DIR}: no chunk-*/file-*.parquet; not a complete v3.0 dataset")
    videos = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    episodes = []
    for path in files:
        table = pq.read_table(path).to_pylist()
        for row in table:
            episodes.append(_v30_episode(root, info, path, row, videos))
    return tasks, episodes


def _v30_tasks(path: Path) -> dict[int, str]:
    """``meta/tasks.parquet``: the task strings are the (pandas) index, or a ``task`` column."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a complete v3.0 dataset")
    table = pq.read_table(path)
    names = [n for n in table.column_names if n != "task_index"]
    text = "task" if "task" in names else next((n for n in names if table.schema.field(n).type == "string"), None)
    if "task_index" not in table.column_names or text is None:
        raise ValueError(f"{path}: expected a task_index column and the task strings; got columns {table.column_names}")
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(text).to_pylist())}


def _v30_episode(root: Path, info: Mapping[str, Any], source: Path, row: Mapping[str, Any],
                 videos: Iterable[str]) -> EpisodeMeta:
    try:
        data = info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
        spans = {}
        for key in videos:
            names = {"video_key": key, "chunk_index": row[f"videos/{key}/chunk_index"],
                     "file_index": row[f"videos/{key}/file_index"]}
            spans[key] = VideoSpan(_inside(root, info["video_path"].format(**names), "video_path"),
                                   float(row[f"videos/{key}/from_timestamp"]))
        return EpisodeMeta(int(row["episode_index"]), int(row["length"]), tuple(row.get("tasks") or ()),
                           _inside(root, data, "data_path"), spans, source)
    except KeyError as missing:
        raise ValueError(f"{source}: episode rows need column {missing.args[0]!r}") from None


def _check_episodes(root: Path, info: Mapping[str, Any], episodes: Sequence[EpisodeMeta]) -> None:
    where = root / (V30_EPISODES_DIR if info["codebase_version"] == "v3.0" else V21_EPISODES)
    if not episodes:
        raise ValueError(f"{where}: the dataset has no episodes")
    repeated = sorted(i for i, n in Counter(e.index for e in episodes).items() if n > 1)
    if repeated:
        raise ValueError(f"{where}: episode_index {repeated} listed more than once (each episode must be listed once)")
    frames = sum(e.length for e in episodes)
    if frames != info["total_frames"] or len(episodes) != info["total_episodes"]:
        raise ValueError(f"{root / INFO_FILE}: total_episodes={info['total_episodes']}, total_frames={info['total_frames']} "
                         f"but {where} lists {len(episodes)} episodes with {frames} frames")
    short = [e.index for e in episodes if e.length < 1]
    if short:
        raise ValueError(f"{where}: episodes {short[:10]} have no frames")


def _read_stats(root: Path, version: str) -> dict[str, dict[str, Any]]:
    """``meta/stats.json`` when present; for a v2.1 dataset without it, the per-episode statistics
    of ``meta/episodes_stats.jsonl`` pooled (exact for min, max, mean and std; no quantiles)."""
    if (root / STATS_FILE).is_file():
        stats = read_json(root / STATS_FILE)
        if not isinstance(stats, dict):
            raise ValueError(f"{root / STATS_FILE}: expected a JSON object; got {type(stats).__name__}")
        return stats
    if version == "v2.1" and (root / V21_EPISODE_STATS).is_file():
        return pool_episode_stats([row["stats"] for row in read_jsonl(root / V21_EPISODE_STATS)])
    return {}


def pool_episode_stats(per_episode: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, list]]:
    """Pool per-episode ``{feature: {min, max, mean, std, count}}`` into dataset statistics:
    ``mean = sum n_i mean_i / N`` and ``var = sum n_i (std_i^2 + (mean_i - mean)^2) / N``."""
    pooled: dict[str, dict[str, list]] = {}
    for feature in per_episode[0] if per_episode else ():
        parts = [e[feature] for e in per_episode if feature in e]
        counts = np.array([float(np.asarray(p["count"]).reshape(-1)[0]) for p in parts])
        means = np.stack([np.asarray(p["mean"], dtype=np.float64) for p in parts])
        stds = np.stack([np.asarray(p["std"], dtype=np.float64) for p in parts])
        weights = (counts / counts.sum()).reshape(-1, *([1] * (means.ndim - 1)))
        mean = (weights * means).sum(0)
        var = (weights * (stds**2 + (means - mean) ** 2)).sum(0)
        pooled[feature] = {
            "mean": mean.tolist(), "std": np.sqrt(var).tolist(),
            "min": np.min(np.stack([np.asarray(p["min"], dtype=np.float64) for p in parts]), 0).tolist(),
            "max": np.max(np.stack([np.asarray(p["max"], dtype=np.float64) for p in parts]), 0).tolist(),
            "count": [int(counts.sum())],
        }
    return pooled
