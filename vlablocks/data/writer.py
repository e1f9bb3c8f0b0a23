"""Write a dataset in the LeRobot layout (:mod:`vlablocks.data.format`), v3.0 or v2.1, frames as
PNG images or as video, every file atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vlablocks.data.format import (
    ACTION,
    CAMERA_NAME,
    CHUNKS_SIZE,
    IMAGE_STRUCT,
    INFO_FILE,
    STATE,
    STATS_FILE,
    VERSIONS,
    camera_columns,
    encode_depth_png,
    encode_png,
    feature_stats,
    image_stats,
)
from vlablocks.data.layouts import EpisodeRecord, V21Layout, V30Layout
from vlablocks.data.meta import pool_episode_stats
from vlablocks.data.video import video_info
from vlablocks.data.video_writer import resolve_encoder
from vlablocks.io.atomic import write_json

logger = logging.getLogger(__name__)

#: the frame columns every dataset has, after the features (LeRobot's order and types).
INDEX_FEATURES = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64",
                  "task_index": "int64"}
#: what a dataset directory written by vlablocks holds.
DATASET_ENTRIES = {"meta", "data", "videos"}


class DatasetWriter:
    """Write episodes in the LeRobot layout (module docstring); :meth:`finalize` writes ``meta/``.

    ``version``: ``"v3.0"`` (LeRobot 0.4+, episodes packed into files) or ``"v2.1"`` (a file per
    episode, with ``meta/episodes_stats.jsonl``). ``video``: store the camera images as mp4
    (``video_codec``: libsvtav1 as LeRobot, h264 or hevc) instead of PNG in the parquet files;
    depth stays 16-bit PNG either way.

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
        version: str = "v3.0",
        video: bool = False,
        video_codec: str = "libsvtav1",
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {list(VERSIONS)}; got {version!r}")
        if video:
            resolve_encoder(video_codec)  # an unknown codec is refused before anything is written
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
        self.video, self.version = video, version
        self._layout = (V30Layout if version == "v3.0" else V21Layout)(self._target, float(fps), video_codec)
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
        self._episodes = 0
        self._tasks: dict[str, int] = {}
        self._states: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._image_stats: list[dict[str, dict[str, np.ndarray]]] = []
        self._total_frames = 0
        self._finalized = False

    def add_episode(self, frames: Mapping[str, np.ndarray], task: str) -> int:
        """Write one episode (``T >= 1`` steps, keys as in the class docstring); returns its index."""
        if self._finalized:
            raise RuntimeError(f"{self.root}: finalize() was called; no more episodes can be added")
        episode = self._episodes
        arrays = self._check_frames(frames, episode)
        length = len(arrays[STATE])
        task_index = self._tasks.setdefault(task, len(self._tasks))
        columns: dict[str, pa.Array] = {}
        videos: dict[str, np.ndarray] = {}
        stats = {STATE: feature_stats(arrays[STATE]), ACTION: feature_stats(arrays[ACTION])}
        for camera in self.cameras:
            names = camera_columns(camera)
            images = arrays[names["image"]]
            stats[names["image"]] = image_stats(images)
            if self.video:
                videos[names["image"]] = images
            else:
                columns[names["image"]] = _image_column([encode_png(image) for image in images])
            if self.depth:
                columns[names["depth"]] = _image_column([encode_depth_png(d) for d in arrays[names["depth"]]])
            columns[names["intrinsics"]] = _vector_column(arrays[names["intrinsics"]].reshape(length, 9))
            if self.cam_to_world:
                columns[names["cam_to_world"]] = _vector_column(arrays[names["cam_to_world"]].reshape(length, 16))
        columns[STATE], columns[ACTION] = _vector_column(arrays[STATE]), _vector_column(arrays[ACTION])
        frame_index = np.arange(length, dtype=np.int64)
        columns["timestamp"] = pa.array((frame_index / self.fps).astype(np.float32))
        columns["frame_index"] = pa.array(frame_index)
        columns["episode_index"] = pa.array(np.full(length, episode, dtype=np.int64))
        columns["index"] = pa.array(frame_index + self._total_frames)
        columns["task_index"] = pa.array(np.full(length, task_index, dtype=np.int64))
        record = EpisodeRecord(episode, length, task, self._total_frames, stats)
        self._layout.add(record, pa.table(columns).replace_schema_metadata(self._hf_metadata(columns)), videos)
        self._episodes += 1
        self._states.append(arrays[STATE])
        self._actions.append(arrays[ACTION])
        self._image_stats.append({k: v for k, v in stats.items() if k not in (STATE, ACTION)})
        self._total_frames += length
        return episode

    def _hf_metadata(self, columns: Mapping[str, pa.Array]) -> dict[str, str]:
        """The ``huggingface`` schema metadata LeRobot's parquet files carry (the datasets features)."""
        kind = "List" if self.version == "v3.0" else "Sequence"
        features = {}
        for name, column in columns.items():
            if pa.types.is_struct(column.type):
                features[name] = {"_type": "Image"}
            elif pa.types.is_fixed_size_list(column.type):
                features[name] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": column.type.list_size,
                                  "_type": kind}
            else:
                features[name] = {"dtype": column.type.to_pandas_dtype().__name__, "_type": "Value"}
        return {"huggingface": json.dumps({"info": {"features": features}})}

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
        """Write the last files and ``meta/`` (tables, stats, info last); returns the dataset root."""
        if not self._episodes:
            raise ValueError(f"{self.root}: no episodes were added; refusing to write an empty dataset")
        target = self._target
        (target / "meta").mkdir(exist_ok=True)
        layout = self._layout.finalize(self._tasks)
        stats: dict[str, Any] = {STATE: feature_stats(np.concatenate(self._states)),
                                 ACTION: feature_stats(np.concatenate(self._actions))}
        stats.update(pool_episode_stats(self._image_stats))
        write_json(target / STATS_FILE, {name: {k: np.asarray(v).tolist() for k, v in s.items()}
                                         for name, s in stats.items()})
        write_json(target / INFO_FILE, self._info(layout))
        self._finalized = True  # complete: abort() leaves it (a failed swap names where it is)
        if self._staging is not None:
            swap_in(self._staging, self.root)
        return self.root

    def abort(self) -> None:
        """Remove what this unfinished writer wrote: its hidden directory, or the ``meta/`` and
        ``data/`` it made in a ``root`` that was empty; an existing dataset stays as it was."""
        if self._finalized:
            return
        self._layout.abort()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        else:
            for folder in DATASET_ENTRIES:
                shutil.rmtree(self.root / folder, ignore_errors=True)
        self._finalized = True

    def _info(self, layout: Mapping[str, Any]) -> dict[str, Any]:
        """``meta/info.json``: the features (LeRobot's keys; video features with their stream fields)."""
        def vector(dim: int, names: list[str] | None = None) -> dict[str, Any]:
            return {"dtype": "float32", "shape": [dim], "names": names}

        features: dict[str, Any] = {}
        for camera in self.cameras:
            names, (height, width) = camera_columns(camera), self._image_sizes[camera]
            features[names["image"]] = {"dtype": "video" if self.video else "image", "shape": [height, width, 3],
                                        "names": ["height", "width", "channels"]}
            if self.video:
                features[names["image"]]["info"] = self._video_info(names["image"], height, width)
            if self.depth:
                features[names["depth"]] = {
                    "dtype": "image", "shape": [height, width, 1], "names": ["height", "width", "channels"],
                    "info": {"encoding": "png uint16", "unit": "mm", "invalid": 0},
                }
            features[names["intrinsics"]] = vector(9, ["fx", "s", "cx", "0", "fy", "cy", "0", "0", "1"])
            if self.cam_to_world:
                features[names["cam_to_world"]] = vector(16)
        features[STATE] = vector(self.state_dim, self.state_names)
        features[ACTION] = vector(self.action_dim)
        features.update({name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in INDEX_FEATURES.items()})
        info = {
            "codebase_version": self.version,
            "robot_type": self.robot_type,
            "total_episodes": self._episodes,
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": CHUNKS_SIZE,
            "fps": self.fps,
            "splits": {"train": f"0:{self._episodes}"},
            **layout,
            "features": features,
        }
        if self.version == "v2.1":
            info["total_videos"] = self._episodes * len(self.cameras) if self.video else 0
        return info

    def _video_info(self, key: str, height: int, width: int) -> dict[str, Any]:
        """The stream fields LeRobot records for a video feature (read back from the first file)."""
        first = self._target / self._layout.first_video(key)
        read = video_info(first)
        return {"video.height": height, "video.width": width, "video.codec": read["video.codec"],
                "video.pix_fmt": read["video.pix_fmt"], "video.is_depth_map": False, "video.fps": self.fps,
                "video.channels": 3, "has_audio": False}


def is_dataset(root: Path) -> bool:
    """Whether ``root`` holds a dataset :class:`DatasetWriter` writes: ``meta/info.json`` with a
    ``codebase_version``, and nothing but ``meta/``, ``data/`` and ``videos/``."""
    try:
        info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "codebase_version" in info and {p.name for p in root.iterdir()} <= DATASET_ENTRIES


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
            f"{root} is not a dataset written by vlablocks (expected only meta/, data/ and videos/, with a codebase_version in "
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


def _vector_column(values: np.ndarray) -> pa.Array:
    """``[T, D]`` -> a fixed-size list<float32>[D] column (LeRobot's type for vector features)."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _image_column(encoded: list[bytes]) -> pa.Array:
    """PNG bytes in LeRobot's image struct, ``path`` naming the frame as LeRobot does."""
    paths = [f"frame-{i:06d}.png" for i in range(len(encoded))]
    return pa.StructArray.from_arrays([pa.array(encoded, pa.binary()), pa.array(paths, pa.string())],
                                      fields=list(IMAGE_STRUCT))
