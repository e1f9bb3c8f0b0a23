"""Write a dataset in the LeRobot layout (:mod:`vlablocks.data.format`), every file atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlablocks.data.format import (
    ACTION,
    CHUNKS_SIZE,
    CODEBASE_VERSION,
    DATA_PATH,
    EPISODES_FILE,
    INDEX_COLUMNS,
    INFO_FILE,
    STATE,
    STATS_FILE,
    TASKS_FILE,
    CAMERA_NAME,
    IMAGE_STRUCT,
    camera_columns,
    encode_depth_png,
    encode_png,
    episode_path,
    feature_stats,
)
from vlablocks.io.atomic import atomic_path, write_json, write_text

logger = logging.getLogger(__name__)


class DatasetWriter:
    """Write episodes in the LeRobot layout (module docstring); :meth:`finalize` writes ``meta/``.

    ``add_episode`` takes per-step arrays keyed by the feature names, ``T`` steps each:
    ``observation.state [T, S]``, ``action [T, A]``, and per camera ``observation.images.<cam>
    [T, H, W, 3]`` uint8, ``observation.intrinsics.<cam> [T, 3, 3]``, with ``depth``
    ``observation.depth.<cam> [T, H, W]`` (metres) and with ``cam_to_world``
    ``observation.cam_to_world.<cam> [T, 4, 4]``. Nothing else is accepted.

    An existing non-empty ``root`` is refused unless ``overwrite=True`` and it holds a dataset
    this writer writes (:func:`is_dataset`): then the new dataset is written into a hidden sibling
    directory and swapped in by :meth:`finalize`, the old one removed only after the swap (until
    then ``root`` is untouched). :meth:`abort` removes what an unfinished writer wrote.
    """

    def __init__(
        self,
        root: str | Path,
        fps: float,
        cameras: Sequence[str],
        state_dim: int,
        action_dim: int,
        depth: bool = False,
        cam_to_world: bool = False,
        robot_type: str = "unknown",
        overwrite: bool = False,
        state_names: Sequence[str] | None = None,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0; got {fps}")
        if min(state_dim, action_dim) < 1:
            raise ValueError(f"state_dim and action_dim must be >= 1; got {state_dim} and {action_dim}")
        if state_names is not None and len(state_names) != state_dim:
            raise ValueError(f"state_names must name each of the {state_dim} state dims; got {list(state_names)}")
        if not cameras or len(set(cameras)) != len(cameras) or not all(CAMERA_NAME.match(c) for c in cameras):
            raise ValueError(f"cameras must be distinct non-empty names of letters, digits, '_' or '-'; got {list(cameras)}")
        self.root = Path(root)
        check_output(self.root, overwrite)
        #: where the episodes go: ``root`` itself, or (replacing a dataset) a hidden sibling
        self._staging: Path | None = None
        if self.root.exists() and any(self.root.iterdir()):
            self._staging = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.", suffix=".tmp", dir=self.root.parent))
            self._staging.chmod(0o755)
        else:
            self.root.mkdir(parents=True, exist_ok=True)
        self._target = self._staging or self.root
        self.fps, self.cameras, self.robot_type = float(fps), list(cameras), robot_type
        self.state_dim, self.action_dim = state_dim, action_dim
        self.state_names = list(state_names) if state_names is not None else None
        self.depth, self.cam_to_world = depth, cam_to_world
        self._expected = {STATE: (state_dim,), ACTION: (action_dim,)}
        for camera in self.cameras:
            columns = camera_columns(camera)
            self._expected[columns["image"]] = (None, None, 3)
            self._expected[columns["intrinsics"]] = (3, 3)
            if depth:
                self._expected[columns["depth"]] = (None, None)
            if cam_to_world:
                self._expected[columns["cam_to_world"]] = (4, 4)
        self._image_sizes: dict[str, tuple[int, int]] = {}
        self._episodes: list[dict[str, Any]] = []
        self._tasks: dict[str, int] = {}
        self._states: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._total_frames = 0
        self._finalized = False

    def add_episode(self, frames: Mapping[str, np.ndarray], task: str) -> int:
        """Write one episode (``T >= 1`` steps, keys as in the class docstring); returns its index."""
        if self._finalized:
            raise RuntimeError(f"{self.root}: finalize() was called; no more episodes can be added")
        episode = len(self._episodes)
        arrays = self._check_frames(frames, episode)
        length = len(arrays[STATE])
        task_index = self._tasks.setdefault(task, len(self._tasks))
        columns: dict[str, pa.Array] = {STATE: _list_column(arrays[STATE]), ACTION: _list_column(arrays[ACTION])}
        for camera in self.cameras:
            names = camera_columns(camera)
            columns[names["image"]] = _image_column([encode_png(image) for image in arrays[names["image"]]])
            if self.depth:
                columns[names["depth"]] = _image_column([encode_depth_png(d) for d in arrays[names["depth"]]])
            columns[names["intrinsics"]] = _list_column(arrays[names["intrinsics"]].reshape(length, 9))
            if self.cam_to_world:
                columns[names["cam_to_world"]] = _list_column(arrays[names["cam_to_world"]].reshape(length, 16))
        frame_index = np.arange(length, dtype=np.int64)
        columns["timestamp"] = pa.array((frame_index / self.fps).astype(np.float32))
        columns["frame_index"] = pa.array(frame_index)
        columns["episode_index"] = pa.array(np.full(length, episode, dtype=np.int64))
        columns["index"] = pa.array(frame_index + self._total_frames)
        columns["task_index"] = pa.array(np.full(length, task_index, dtype=np.int64))
        path = self._target / episode_path(episode)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(columns), tmp)
        self._episodes.append({"episode_index": episode, "tasks": [task], "length": length})
        self._states.append(arrays[STATE])
        self._actions.append(arrays[ACTION])
        self._total_frames += length
        return episode

    def _check_frames(self, frames: Mapping[str, np.ndarray], episode: int) -> dict[str, np.ndarray]:
        where = f"{self.root}: episode {episode}"
        if set(frames) != set(self._expected):
            raise ValueError(
                f"{where}: frames must have exactly the keys {sorted(self._expected)}; "
                f"missing {sorted(set(self._expected) - set(frames))}, "
                f"unexpected {sorted(set(frames) - set(self._expected))}"
            )
        arrays = {name: np.asarray(value) for name, value in frames.items()}
        length = len(arrays[STATE])
        if length < 1:
            raise ValueError(f"{where}: an episode needs at least one step; got 0")
        for name, trailing in self._expected.items():
            shape = arrays[name].shape
            if len(shape) != 1 + len(trailing) or shape[0] != length or any(
                want is not None and got != want for got, want in zip(shape[1:], trailing)
            ):
                expected = [length, *("*" if t is None else t for t in trailing)]
                raise ValueError(f"{where}: {name!r} must have shape {expected} (T = len(state)); got {list(shape)}")
        for name in (STATE, ACTION):
            if not np.isfinite(arrays[name]).all():
                raise ValueError(f"{where}: {name!r} has NaN or inf values")
            arrays[name] = arrays[name].astype(np.float32)
        for camera in self.cameras:
            names = camera_columns(camera)
            images = arrays[names["image"]]
            if images.dtype != np.uint8:
                raise ValueError(f"{where}: {names['image']!r} must be uint8; got {images.dtype}")
            size = self._image_sizes.setdefault(camera, images.shape[1:3])
            if images.shape[1:3] != size:
                raise ValueError(
                    f"{where}: {names['image']!r} frames are {list(images.shape[1:3])}; earlier episodes had {list(size)}"
                )
            depth_size = arrays[names["depth"]].shape[1:] if self.depth else size
            if depth_size != size:
                raise ValueError(f"{where}: {names['depth']!r} frames must be {list(size)} like the images; got {list(depth_size)}")
        return arrays

    def finalize(self) -> Path:
        """Write ``meta/`` (tasks, episodes, stats, info last); returns the dataset root."""
        if not self._episodes:
            raise ValueError(f"{self.root}: no episodes were added; refusing to write an empty dataset")
        target = self._target
        (target / "meta").mkdir(exist_ok=True)
        _write_jsonl(target / TASKS_FILE, [{"task_index": i, "task": t} for t, i in self._tasks.items()])
        _write_jsonl(target / EPISODES_FILE, self._episodes)
        stats = {STATE: feature_stats(np.concatenate(self._states)), ACTION: feature_stats(np.concatenate(self._actions))}
        write_json(target / STATS_FILE, {name: {k: v.tolist() for k, v in s.items()} for name, s in stats.items()})
        write_json(target / INFO_FILE, self._info())
        self._finalized = True  # complete: abort() leaves it (a failed swap names where it is)
        if self._staging is not None:
            swap_in(self._staging, self.root)
        return self.root

    def abort(self) -> None:
        """Remove what this unfinished writer wrote: its hidden directory, or the ``meta/`` and
        ``data/`` it made in a ``root`` that was empty; an existing dataset stays as it was."""
        if self._finalized:
            return
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        else:
            for folder in ("meta", "data"):
                shutil.rmtree(self.root / folder, ignore_errors=True)
        self._finalized = True

    def _info(self) -> dict[str, Any]:
        def vector(dim: int, names: list[str] | None = None) -> dict[str, Any]:
            return {"dtype": "float32", "shape": [dim], "names": names}

        features: dict[str, Any] = {STATE: vector(self.state_dim, self.state_names), ACTION: vector(self.action_dim)}
        for camera in self.cameras:
            names, (height, width) = camera_columns(camera), self._image_sizes[camera]
            features[names["image"]] = {
                "dtype": "image", "shape": [height, width, 3], "names": ["height", "width", "channel"],
            }
            if self.depth:
                features[names["depth"]] = {
                    "dtype": "image", "shape": [height, width, 1], "names": ["height", "width", "channel"],
                    "info": {"encoding": "png uint16", "unit": "mm", "invalid": 0},
                }
            features[names["intrinsics"]] = vector(9, ["fx", "s", "cx", "0", "fy", "cy", "0", "0", "1"])
            if self.cam_to_world:
                features[names["cam_to_world"]] = vector(16)
        features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for name in INDEX_COLUMNS:
            features[name] = {"dtype": "int64", "shape": [1], "names": None}
        episodes = len(self._episodes)
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": episodes,
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "total_videos": 0,
            "total_chunks": (episodes - 1) // CHUNKS_SIZE + 1,
            "chunks_size": CHUNKS_SIZE,
            "fps": self.fps,
            "splits": {"train": f"0:{episodes}"},
            "data_path": DATA_PATH,
            "video_path": None,
            "features": features,
        }


def is_dataset(root: Path) -> bool:
    """Whether ``root`` holds a dataset :class:`DatasetWriter` writes: ``meta/info.json`` with a
    ``codebase_version``, and nothing but ``meta/`` and ``data/``."""
    try:
        info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "codebase_version" in info and {p.name for p in root.iterdir()} <= {"meta", "data"}


def check_output(root: Path, overwrite: bool) -> None:
    """Refuse an output directory a writer must not touch (FileExistsError naming it): a file, a
    non-empty directory without ``overwrite``, or (with it) one that is not a dataset."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory; choose another output directory")
    if not root.exists() or not any(root.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{root} exists and is not empty ({sorted(p.name for p in root.iterdir())[:5]}); "
            "pass overwrite=True (--overwrite) to replace the dataset in it"
        )
    if not is_dataset(root):
        raise FileExistsError(
            f"{root} is not a dataset written by vlablocks (expected only meta/ and data/, with a codebase_version in "
            f"{INFO_FILE}; it holds {sorted(p.name for p in root.iterdir())[:5]}); refusing to overwrite it, "
            "nothing in it was touched: choose another output directory"
        )


def swap_in(staging: Path, root: Path) -> None:
    """Replace the dataset ``root`` with the complete ``staging`` directory: the old one is renamed
    aside, ``staging`` renamed into place, then the old one removed (only if still a dataset)."""
    if not root.exists():
        os.replace(staging, root)
        return
    if not is_dataset(root):
        raise FileExistsError(f"{root} changed while the new dataset was written and is no longer a dataset; "
                              f"left it as it is; the new dataset is in {staging}")
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
    os.replace(root, old)  # onto the empty directory just made: a unique name
    os.replace(staging, root)
    shutil.rmtree(old)
    logger.info("replaced the dataset in %s", root)


def _list_column(values: np.ndarray) -> pa.Array:
    """``[T, D]`` -> list<float32> column."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _image_column(encoded: list[bytes]) -> pa.Array:
    return pa.StructArray.from_arrays(
        [pa.array(encoded, pa.binary()), pa.nulls(len(encoded), pa.string())], fields=list(IMAGE_STRUCT)
    )


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
