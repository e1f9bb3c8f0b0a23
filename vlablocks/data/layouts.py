"""Where a :class:`~vlablocks.data.writer.DatasetWriter` puts episodes: the v3.0 layout (episodes
packed into files of up to ``DATA_FILE_MB`` / ``VIDEO_FILE_MB``) and the v2.1 layout (a file per
episode), each with its own ``meta/`` tables (:mod:`vlablocks.data.format`). Every file is written
atomically; a video file is renamed into place when it is closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlablocks.data.format import (
    CHUNKS_SIZE,
    DATA_FILE_MB,
    V21_DATA_PATH,
    V21_EPISODE_STATS,
    V21_EPISODES,
    V21_TASKS,
    V21_VIDEO_PATH,
    V30_DATA_PATH,
    V30_EPISODES_PATH,
    V30_TASKS,
    V30_VIDEO_PATH,
    VIDEO_FILE_MB,
    episode_path,
    file_path,
)
from vlablocks.data.video_writer import VideoWriter, encode_video
from vlablocks.io.atomic import atomic_path, write_text

#: pandas' metadata that makes ``pd.read_parquet(meta/tasks.parquet)`` index the tasks by their
#: string, as LeRobot writes and reads the table.
_TASKS_PANDAS = {
    "index_columns": ["task"],
    "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                        "metadata": {"encoding": "UTF-8"}}],
    "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                 "metadata": None},
                {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None}],
    "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0",
}


@dataclass
class EpisodeRecord:
    """What a layout needs of one written episode: its index, length, task, first global frame
    and per-feature statistics (``{feature: {stat: array}}``)."""

    index: int
    length: int
    task: str
    start: int
    stats: Mapping[str, Mapping[str, np.ndarray]]


#: rows per parquet row group: a frame read on demand reads its row group, at most this many images.
ROW_GROUP_ROWS = 128


def write_parquet(path: Path, table: pa.Table) -> None:
    """``table`` to ``path`` atomically (parents made), in row groups of :data:`ROW_GROUP_ROWS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))


def _listed(stats: Mapping[str, Mapping[str, np.ndarray]], names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {feature: {k: np.asarray(v).tolist() for k, v in s.items() if k in names} for feature, s in stats.items()}


class V21Layout:
    """One parquet file and one mp4 per episode; ``meta/*.jsonl`` tables."""

    version = "v2.1"

    def __init__(self, root: Path, fps: float, video_codec: str) -> None:
        self.root, self.fps, self.video_codec = root, fps, video_codec
        self.episodes: list[EpisodeRecord] = []

    def add(self, record: EpisodeRecord, table: pa.Table, videos: Mapping[str, np.ndarray]) -> None:
        write_parquet(self.root / episode_path(record.index), table)
        for key, frames in videos.items():
            encode_video(frames, self.root / episode_path(record.index, V21_VIDEO_PATH, video_key=key), self.fps,
                         codec=self.video_codec)
        self.episodes.append(record)

    def finalize(self, tasks: Mapping[str, int]) -> dict[str, Any]:
        """Write the ``meta/`` tables; returns the layout's ``info.json`` fields."""
        _write_jsonl(self.root / V21_TASKS, [{"task_index": i, "task": t} for t, i in tasks.items()])
        _write_jsonl(self.root / V21_EPISODES, [{"episode_index": e.index, "tasks": [e.task], "length": e.length}
                                                for e in self.episodes])
        _write_jsonl(self.root / V21_EPISODE_STATS,
                     [{"episode_index": e.index, "stats": _listed(e.stats, ("min", "max", "mean", "std", "count"))}
                      for e in self.episodes])
        count = len(self.episodes)
        return {"total_chunks": (count - 1) // CHUNKS_SIZE + 1, "data_path": V21_DATA_PATH, "video_path": V21_VIDEO_PATH}

    def first_video(self, key: str) -> str:
        """The path of ``key``'s first video file, relative to the root."""
        return episode_path(0, V21_VIDEO_PATH, video_key=key)

    def abort(self) -> None:
        """Nothing is held open between episodes."""


class V30Layout:
    """Episodes packed into ``data/chunk-C/file-F.parquet`` and ``videos/<key>/chunk-C/file-F.mp4``
    (a new file once one holds ``DATA_FILE_MB`` / ``VIDEO_FILE_MB``); one ``meta/episodes`` table."""

    version = "v3.0"

    def __init__(self, root: Path, fps: float, video_codec: str) -> None:
        self.root, self.fps, self.video_codec = root, fps, video_codec
        self.rows: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []
        self._buffered_bytes = 0
        self._data_file = 0
        self._videos: dict[str, tuple[int, VideoWriter]] = {}
        self._next_video_file: dict[str, int] = {}

    def add(self, record: EpisodeRecord, table: pa.Table, videos: Mapping[str, np.ndarray]) -> None:
        self._tables.append(table)
        self._buffered_bytes += table.nbytes
        row: dict[str, Any] = {
            "episode_index": record.index, "tasks": [record.task], "length": record.length,
            "data/chunk_index": self._data_file // CHUNKS_SIZE, "data/file_index": self._data_file % CHUNKS_SIZE,
            "dataset_from_index": record.start, "dataset_to_index": record.start + record.length,
        }
        for key, frames in videos.items():
            file, writer = self._video(key)
            start = writer.frames_written / self.fps
            writer.append(frames)
            row.update({f"videos/{key}/chunk_index": file // CHUNKS_SIZE, f"videos/{key}/file_index": file % CHUNKS_SIZE,
                        f"videos/{key}/from_timestamp": start,
                        f"videos/{key}/to_timestamp": start + record.length / self.fps})
            if writer.bytes_written >= VIDEO_FILE_MB * 1e6:
                self._close_video(key)
        for feature, stats in record.stats.items():
            row.update({f"stats/{feature}/{k}": np.asarray(v).tolist() for k, v in stats.items()})
        self.rows.append(row)
        if self._buffered_bytes >= DATA_FILE_MB * 1e6:
            self._flush_data()

    def _video(self, key: str) -> tuple[int, VideoWriter]:
        if key not in self._videos:
            file = self._next_video_file.get(key, 0)
            self._next_video_file[key] = file + 1
            path = self.root / file_path(V30_VIDEO_PATH, file, video_key=key)
            self._videos[key] = (file, VideoWriter(path, self.fps, codec=self.video_codec))
        return self._videos[key]

    def _close_video(self, key: str) -> None:
        self._videos.pop(key)[1].close()

    def _flush_data(self) -> None:
        if self._tables:
            write_parquet(self.root / file_path(V30_DATA_PATH, self._data_file), pa.concat_tables(self._tables))
            self._tables, self._buffered_bytes, self._data_file = [], 0, self._data_file + 1

    def finalize(self, tasks: Mapping[str, int]) -> dict[str, Any]:
        """Write the last data and video files and the ``meta/`` tables; returns the ``info.json`` fields."""
        self._flush_data()
        for key in list(self._videos):
            self._close_video(key)
        for row in self.rows:
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        write_parquet(self.root / file_path(V30_EPISODES_PATH, 0), pa.Table.from_pylist(self.rows))
        names, indices = list(tasks), list(tasks.values())
        table = pa.table({"task_index": pa.array(indices, pa.int64()), "task": pa.array(names, pa.string())})
        write_parquet(self.root / V30_TASKS, table.replace_schema_metadata({"pandas": json.dumps(_TASKS_PANDAS)}))
        return {"data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB,
                "data_path": V30_DATA_PATH, "video_path": V30_VIDEO_PATH if self._next_video_file else None}

    def first_video(self, key: str) -> str:
        """The path of ``key``'s first video file, relative to the root."""
        return file_path(V30_VIDEO_PATH, 0, video_key=key)

    def abort(self) -> None:
        """Drop the open video files."""
        for _, writer in self._videos.values():
            writer.abort()
        self._videos.clear()
