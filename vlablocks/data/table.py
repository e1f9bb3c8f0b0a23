"""The frame table of a dataset: every frame's non-image values (state, action, task, timestamp,
vlablocks' camera geometry) read into memory, which is small even for millions of frames, and
where each frame's row lies in its parquet file (for the frames read on demand).

Every episode is checked as it loads: its file readable, its columns present, its rows as many as
its metadata says with ``frame_index`` 0..L-1, its values finite. A bad one raises
:class:`EpisodeError` naming the file and the episode, or is left out with ``skip_bad_episodes``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from vlablocks.data.meta import DatasetMeta, EpisodeMeta

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ("episode_index", "frame_index", "timestamp", "task_index")


class EpisodeError(ValueError):
    """One episode of a dataset cannot be used: its file is missing, unreadable or inconsistent,
    or its values are not finite. ``path`` and ``episode`` say which."""

    def __init__(self, path: Path, episode: int, problem: str) -> None:
        super().__init__(f"{path} (episode {episode}): {problem}")
        self.path, self.episode, self.problem = path, episode, problem


@dataclass
class FrameTable:
    """The kept frames, episode after episode. ``vectors[name]``: ``[F, D]`` float32 per vector
    column read; ``task_index``, ``timestamp`` ``[F]``; ``file_row[F]``: the frame's row in its
    episode's data file; ``episodes``: the kept episodes; ``ranges``: their ``[start, end)``
    frames; ``skipped``: ``(episode_index, problem)`` of the episodes left out."""

    vectors: dict[str, np.ndarray]
    task_index: np.ndarray
    timestamp: np.ndarray
    file_row: np.ndarray
    episodes: list[EpisodeMeta]
    ranges: list[tuple[int, int]]
    skipped: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.task_index)

    def episode_of(self, frames: np.ndarray) -> np.ndarray:
        """Positions in ``episodes`` of the given frames."""
        starts = np.array([start for start, _ in self.ranges])
        return np.searchsorted(starts, frames, side="right") - 1


def read_table(meta: DatasetMeta, vectors: dict[str, int], skip_bad_episodes: bool = False) -> FrameTable:
    """Read the frame table of ``meta``'s episodes; ``vectors``: column -> values per frame
    (``{"observation.state": 8, "action": 7}``; a K x K matrix column counts K * K)."""
    parts: list[tuple[EpisodeMeta, dict[str, np.ndarray]]] = []
    skipped: list[tuple[int, str]] = []
    by_file: dict[Path, list[EpisodeMeta]] = {}
    for episode in meta.episodes:
        by_file.setdefault(episode.data_file, []).append(episode)
    for path, episodes in tqdm(by_file.items(), desc=f"indexing {meta.root.name}", unit="file", leave=False):
        for episode, columns in _read_file(path, episodes, vectors):
            if isinstance(columns, EpisodeError):
                if not skip_bad_episodes:
                    raise columns
                logger.warning("skipping %s", columns)
                skipped.append((episode.index, columns.problem))
            else:
                parts.append((episode, columns))
    if not parts:
        raise ValueError(f"{meta.root}: every episode is bad (skip_bad_episodes left nothing to train on)")
    if skipped:
        logger.warning("%s: skipped %d of %d episodes (%d frames kept)", meta.root, len(skipped), len(meta.episodes),
                       sum(e.length for e, _ in parts))
    lengths = np.array([e.length for e, _ in parts])
    starts = np.concatenate([[0], np.cumsum(lengths)])

    def joined(name: str) -> np.ndarray:
        return np.concatenate([columns[name] for _, columns in parts])

    return FrameTable(vectors={name: joined(name) for name in vectors}, task_index=joined("task_index"),
                      timestamp=joined("timestamp"), file_row=joined("file_row"), episodes=[e for e, _ in parts],
                      ranges=[(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])], skipped=skipped)


def _read_file(path: Path, episodes: Sequence[EpisodeMeta],
               vectors: dict[str, int]) -> list[tuple[EpisodeMeta, dict[str, np.ndarray] | EpisodeError]]:
    """The columns of each of ``episodes`` held by one data file (an EpisodeError in place of a bad one)."""
    if not path.is_file():
        return [(e, EpisodeError(path, e.index, f"missing (listed in {e.listed_in})")) for e in episodes]
    try:
        table = pq.read_table(path, columns=[*INDEX_COLUMNS, *vectors])
        owner = table.column("episode_index").to_numpy()
    except (ValueError, OSError, KeyError, pa.ArrowException) as err:
        present = _schema_names(path)
        problem = f"missing column(s) {[c for c in (*INDEX_COLUMNS, *vectors) if c not in present]}" if present else str(err)
        return [(e, EpisodeError(path, e.index, problem)) for e in episodes]
    out = []
    for episode in episodes:
        rows = np.flatnonzero(owner == episode.index)
        try:
            out.append((episode, _episode_columns(table, rows, episode, vectors)))
        except ValueError as err:
            out.append((episode, EpisodeError(path, episode.index, str(err))))
    return out


def _episode_columns(table: pa.Table, rows: np.ndarray, episode: EpisodeMeta,
                     vectors: dict[str, int]) -> dict[str, np.ndarray]:
    if len(rows) != episode.length:
        raise ValueError(f"{len(rows)} frames, but {episode.listed_in} says the episode has length {episode.length}")
    if len(rows) and (np.diff(rows) != 1).any():
        raise ValueError("the episode's rows are not contiguous in its file")
    part = table.slice(int(rows[0]), len(rows)) if len(rows) else table.slice(0, 0)
    if (part.column("frame_index").to_numpy() != np.arange(len(rows))).any():
        raise ValueError(f"frame_index must run 0..{len(rows) - 1} in order")
    columns = {"task_index": part.column("task_index").to_numpy().astype(np.int64),
               "timestamp": part.column("timestamp").to_numpy().astype(np.float64),
               "file_row": rows.astype(np.int64)}
    for name, dim in vectors.items():
        values = _vectors(part, name, dim)
        bad = np.flatnonzero(~np.isfinite(values).all(1))
        if bad.size:
            raise ValueError(f"NaN or inf in {name!r} at frame(s) {bad[:10].tolist()}")
        columns[name] = values
    return columns


def _vectors(table: pa.Table, column: str, dim: int) -> np.ndarray:
    """A list<float> (or fixed-size list) column -> ``[T, dim]`` float32."""
    array = table.column(column).combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = array.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != dim).any():
            raise ValueError(f"column {column!r} must hold {dim} values per frame; got lengths {sorted(set(lengths.tolist()))}")
    flat = array.flatten().to_numpy(zero_copy_only=False) if not pa.types.is_floating(array.type) else array.to_numpy()
    flat = np.asarray(flat, dtype=np.float32)
    if flat.size != len(array) * dim:
        raise ValueError(f"column {column!r} must hold {dim} values per frame; got {flat.size} values for {len(array)} frames")
    return flat.reshape(len(array), dim)


def _schema_names(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        return []
