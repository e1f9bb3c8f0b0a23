"""The LeRobot dataset layout (v2.1, image frames) as vlablocks' on-disk format: write and read.

::

    root/
      meta/info.json          codebase_version "v2.1", fps, robot_type, totals, chunks_size,
                              data_path, features {name: {dtype, shape, names}}
      meta/episodes.jsonl     {"episode_index", "tasks": [str], "length"} per line
      meta/tasks.jsonl        {"task_index", "task"} per line
      meta/stats.json         {feature: {mean, std, min, max, q01, q99}} (lists) for state and action
      data/chunk-000/episode_000000.parquet   one row per frame

Parquet columns: ``observation.state`` and ``action`` (list<float32>), ``timestamp`` (float32,
``frame_index / fps``), ``frame_index``, ``episode_index``, ``index`` (the frame's position in
the whole dataset), ``task_index`` (int64) and, per camera ``<cam>``:

- ``observation.images.<cam>``: PNG bytes in LeRobot's image struct ``{bytes, path}`` (path null);
- ``observation.depth.<cam>`` (optional): z-depth as a 16-bit grayscale PNG of whole millimetres
  (``round(depth_m * 1000)``, so read back within 0.5 mm); 0 means "no depth" and is also what
  NaN, non-positive and beyond-65.535 m depths are stored as;
- ``observation.intrinsics.<cam>``: the pinhole ``K`` row-major (9 floats);
- ``observation.cam_to_world.<cam>`` (optional): the camera pose, row-major 4 x 4 (16 floats).

:class:`DatasetWriter` writes a dataset (every file atomically); :class:`LeRobotDataset` reads
one into memory (PNGs decoded once) and serves the policy's batch keys (:mod:`vlablocks.policy.batch`)
with action chunks and their padding masks; :func:`collate` stacks samples into a batch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlablocks.policy import batch as keys
from vlablocks.policy.batch import collate  # noqa: F401  (re-exported: the batch collate of this dataset)
from vlablocks.io.atomic import atomic_path, write_json, write_text

logger = logging.getLogger(__name__)

CODEBASE_VERSION = "v2.1"
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
CHUNKS_SIZE = 1000
INFO_FILE, EPISODES_FILE, TASKS_FILE, STATS_FILE = (
    "meta/info.json", "meta/episodes.jsonl", "meta/tasks.jsonl", "meta/stats.json",
)

STATE = "observation.state"
ACTION = "action"
IMAGE_PREFIX = "observation.images."
DEPTH_PREFIX = "observation.depth."
INTRINSICS_PREFIX = "observation.intrinsics."
CAM_TO_WORLD_PREFIX = "observation.cam_to_world."
INDEX_COLUMNS = ("frame_index", "episode_index", "index", "task_index")
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")

DEPTH_UNITS_PER_METRE = 1000.0  # depth PNGs hold millimetres
DEPTH_MAX_M = np.iinfo(np.uint16).max / DEPTH_UNITS_PER_METRE
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 encodes 2.5x faster than 6 for ~7% more bytes
_CAMERA_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# ---------------------------------------------------------------------------- encoding


def encode_png(image: np.ndarray) -> bytes:
    """``[H, W, 3]`` uint8 RGB -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_depth_png(depth: np.ndarray) -> bytes:
    """``[H, W]`` metres -> 16-bit PNG of millimetres (invalid or out-of-range depth -> 0)."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0) & (depth <= DEPTH_MAX_M)
    millimetres = np.where(valid, np.rint(depth * DEPTH_UNITS_PER_METRE), 0)
    buffer = io.BytesIO()
    Image.fromarray(millimetres.astype(np.uint16)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> the stored array: ``[H, W, 3]`` uint8 (RGB) or ``[H, W]`` uint16 (depth)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" on some Pillow versions)
            return np.asarray(image).astype(np.uint16, copy=False)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


# ---------------------------------------------------------------------------- writing


def camera_columns(camera: str) -> dict[str, str]:
    """The column names of one camera's features, keyed ``image``, ``depth``, ``intrinsics``, ``cam_to_world``."""
    return {
        "image": IMAGE_PREFIX + camera,
        "depth": DEPTH_PREFIX + camera,
        "intrinsics": INTRINSICS_PREFIX + camera,
        "cam_to_world": CAM_TO_WORLD_PREFIX + camera,
    }


class DatasetWriter:
    """Write episodes in the LeRobot layout (module docstring); :meth:`finalize` writes ``meta/``.

    ``add_episode`` takes per-step arrays keyed by the feature names, ``T`` steps each:
    ``observation.state [T, S]``, ``action [T, A]``, and per camera ``observation.images.<cam>
    [T, H, W, 3]`` uint8, ``observation.intrinsics.<cam> [T, 3, 3]``, with ``depth``
    ``observation.depth.<cam> [T, H, W]`` (metres) and with ``cam_to_world``
    ``observation.cam_to_world.<cam> [T, 4, 4]``. Nothing else is accepted.

    An existing non-empty ``root`` is refused unless ``overwrite=True``, which deletes its
    ``meta/`` and ``data/`` folders (and nothing else) first.
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
        if not cameras or len(set(cameras)) != len(cameras) or not all(_CAMERA_NAME.match(c) for c in cameras):
            raise ValueError(f"cameras must be distinct non-empty names of letters, digits, '_' or '-'; got {list(cameras)}")
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{self.root} exists and is not empty ({sorted(p.name for p in self.root.iterdir())[:5]}); "
                    "pass overwrite=True to replace the dataset in it"
                )
            for folder in ("meta", "data"):
                shutil.rmtree(self.root / folder, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
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
        path = self.root / episode_path(episode)
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
        (self.root / "meta").mkdir(exist_ok=True)
        _write_jsonl(self.root / TASKS_FILE, [{"task_index": i, "task": t} for t, i in self._tasks.items()])
        _write_jsonl(self.root / EPISODES_FILE, self._episodes)
        stats = {STATE: feature_stats(np.concatenate(self._states)), ACTION: feature_stats(np.concatenate(self._actions))}
        write_json(self.root / STATS_FILE, {name: {k: v.tolist() for k, v in s.items()} for name, s in stats.items()})
        write_json(self.root / INFO_FILE, self._info())
        self._finalized = True
        return self.root

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


def episode_path(episode: int, template: str = DATA_PATH, chunks_size: int = CHUNKS_SIZE) -> str:
    """The parquet path of an episode, relative to the dataset root."""
    return template.format(episode_chunk=episode // chunks_size, episode_index=episode)


def feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """``[N, D]`` -> ``{mean, std, min, max, q01, q99}``, each ``[D]`` (float64; std is the population std)."""
    values = np.asarray(values, dtype=np.float64)
    q01, q99 = np.quantile(values, [0.01, 0.99], axis=0)
    return {
        "mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0), "q01": q01, "q99": q99,
    }


def _list_column(values: np.ndarray) -> pa.Array:
    """``[T, D]`` -> list<float32> column."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _image_column(encoded: list[bytes]) -> pa.Array:
    return pa.StructArray.from_arrays(
        [pa.array(encoded, pa.binary()), pa.nulls(len(encoded), pa.string())], fields=list(_IMAGE_STRUCT)
    )


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------- reading


def _missing(path: Path) -> FileNotFoundError:
    needed = ", ".join((INFO_FILE, EPISODES_FILE, TASKS_FILE, STATS_FILE))
    return FileNotFoundError(f"{path}: missing; a LeRobot dataset needs {needed} and the episodes' parquet files")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise _missing(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise _missing(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
    return rows


def _vectors(table: pa.Table, column: str, dim: int) -> np.ndarray:
    """A list<float> column -> ``[T, dim]`` float32."""
    array = table.column(column).combine_chunks()
    lengths = array.value_lengths().to_numpy(zero_copy_only=False) if pa.types.is_list(array.type) else None
    if lengths is not None and (lengths != dim).any():
        raise ValueError(f"column {column!r} must hold {dim} values per frame; got lengths {sorted(set(lengths.tolist()))}")
    flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size != len(array) * dim:
        raise ValueError(f"column {column!r} must hold {dim} values per frame; got {flat.size} values for {len(array)} frames")
    return flat.reshape(len(array), dim)


def _png_frames(table: pa.Table, column: str, pool: ThreadPoolExecutor) -> list[np.ndarray]:
    """The decoded PNG frames of an image / depth column (ValueError naming the first bad frame)."""
    field = table.column(column).combine_chunks()
    data = field.field("bytes") if pa.types.is_struct(field.type) else field
    values = data.to_pylist()
    if any(v is None for v in values):
        raise ValueError(f"column {column!r} has frames without embedded bytes (image paths are not supported)")

    def decode(item: tuple[int, bytes]) -> np.ndarray:
        try:
            return decode_png(item[1])
        except (OSError, ValueError, SyntaxError) as err:  # Pillow: UnidentifiedImageError, truncated data
            raise ValueError(f"column {column!r}, frame {item[0]}: not a readable PNG ({err})") from None

    return list(pool.map(decode, enumerate(values)))


class EpisodeError(ValueError):
    """One episode of a dataset cannot be used: its file is missing, unreadable or inconsistent,
    or its values are not finite. ``path`` and ``episode`` say which."""

    def __init__(self, path: Path, episode: int, problem: str) -> None:
        super().__init__(f"{path} (episode {episode}): {problem}")
        self.path, self.episode, self.problem = path, episode, problem


class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobot v2.x dataset with image frames, loaded into memory; samples are policy batch items.

    Sample ``i`` (a frame of the whole dataset): ``images [N_cam, 3, H, W]`` float in [0, 1],
    ``task`` (str), ``state [S]``, ``actions [horizon, A]`` (the chunk starting at frame ``i``;
    steps past the episode end repeat its last action) and ``action_mask [horizon]`` (False past
    the episode end), plus, when every selected camera has them, ``depth [N_cam, H, W]`` metres
    (0 = no depth; only with ``load_depth``), ``intrinsics [N_cam, 3, 3]`` and
    ``cam_to_world [N_cam, 4, 4]``; all float32. ``cameras=None`` takes every camera of the dataset.

    Memory: images are kept as uint8 (``3 H W`` bytes per camera and frame: 49 KB at 128 px) and
    depth as uint16 millimetres.

    Every episode is checked while it loads (file present and readable, columns, frame count and
    indices, finite state and actions, decodable frames of the right size); a bad one raises
    :class:`EpisodeError` naming the file and the episode, so training never starts on partial
    data. ``skip_bad_episodes=True`` leaves such episodes out instead, logs each, and lists them
    in ``skipped`` (``(episode, problem)``). Dataset-wide problems (``meta/`` files) always raise.
    """

    def __init__(
        self,
        root: str | Path,
        horizon: int,
        cameras: Sequence[str] | None = None,
        load_depth: bool = True,
        skip_bad_episodes: bool = False,
    ) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1; got {horizon}")
        self.root, self.horizon = Path(root), horizon
        info = _read_json(self.root / INFO_FILE)
        self._check_info(info)
        self.fps: float = float(info["fps"])
        self.features: dict[str, dict[str, Any]] = info["features"]
        self.cameras = self._select_cameras(cameras)
        task_rows = _read_jsonl(self.root / TASKS_FILE)
        tasks = {int(row["task_index"]): str(row["task"]) for row in task_rows}
        episodes = _read_jsonl(self.root / EPISODES_FILE)
        self._stats = _read_json(self.root / STATS_FILE)
        lengths = [int(e["length"]) for e in episodes]
        if sum(lengths) != info["total_frames"] or len(episodes) != info["total_episodes"]:
            raise ValueError(
                f"{self.root / INFO_FILE}: total_episodes={info['total_episodes']}, total_frames={info['total_frames']} "
                f"but {self.root / EPISODES_FILE} lists {len(episodes)} episodes with {sum(lengths)} frames"
            )
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.episode_ranges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        self._allocate(int(starts[-1]), load_depth)
        task_index = np.empty(int(starts[-1]), dtype=np.int64)
        self.skipped: list[tuple[int, str]] = []
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            progress = tqdm(episodes, desc=f"loading {self.root.name}", unit="episode")
            for episode, (start, end) in zip(progress, self.episode_ranges):
                index = int(episode["episode_index"])
                path = self.root / episode_path(index, info["data_path"], int(info["chunks_size"]))
                try:
                    task_index[start:end] = self._load_episode(path, index, start, end, pool)
                except EpisodeError as err:
                    if not skip_bad_episodes:
                        raise
                    logger.warning("skipping %s", err)
                    self.skipped.append((index, err.problem))
        if self.skipped:
            kept = [i for i, e in enumerate(episodes) if int(e["episode_index"]) not in {b for b, _ in self.skipped}]
            if not kept:
                raise ValueError(f"{self.root}: every episode is bad (skip_bad_episodes left nothing to train on)")
            task_index = self._drop_episodes(kept, task_index)
            lengths = [lengths[i] for i in kept]
            starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self.episode_ranges = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
            logger.warning("%s: skipped %d of %d episodes (%d frames kept)", self.root, len(self.skipped),
                           len(episodes), int(starts[-1]))
        unknown = sorted(set(np.unique(task_index).tolist()) - set(tasks))
        if unknown:
            raise ValueError(f"{self.root / TASKS_FILE}: task_index {unknown} used by the episodes is not listed")
        self.tasks: list[str] = [tasks[i] for i in sorted(tasks)]
        self._task_of = [tasks[int(i)] for i in task_index]
        self._episode_end = torch.from_numpy(np.repeat(starts[1:], lengths))

    def _drop_episodes(self, kept: Sequence[int], task_index: np.ndarray) -> np.ndarray:
        """Keep only the frames of episodes ``kept`` (positions in ``episode_ranges``)."""
        frames = torch.cat([torch.arange(*self.episode_ranges[i]) for i in kept])
        for name in ("_images", "_state", "_actions", "_depth", "_intrinsics", "_cam_to_world"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[frames])
        return task_index[frames.numpy()]

    def _check_info(self, info: Mapping[str, Any]) -> None:
        path = self.root / INFO_FILE
        fields = ("codebase_version", "fps", "features", "data_path", "chunks_size", "total_frames", "total_episodes")
        missing = [k for k in fields if k not in info]
        if missing:
            raise ValueError(f"{path}: missing field(s) {missing}")
        if not str(info["codebase_version"]).startswith("v2."):
            raise ValueError(f"{path}: codebase_version must be v2.x (v2.1 is written); got {info['codebase_version']!r}")
        for name in (STATE, ACTION):
            if name not in info["features"]:
                raise ValueError(f"{path}: features must include {name!r}; got {sorted(info['features'])}")

    def _select_cameras(self, cameras: Sequence[str] | None) -> list[str]:
        path = self.root / INFO_FILE
        videos = sorted(k for k, f in self.features.items() if f.get("dtype") == "video")
        available = [
            k[len(IMAGE_PREFIX):] for k, f in self.features.items() if k.startswith(IMAGE_PREFIX) and f.get("dtype") == "image"
        ]
        if cameras is None:
            if videos:
                raise ValueError(
                    f"{path}: features {videos} are stored as video; only image frames are supported "
                    f"(choose cameras among {available})"
                )
            cameras = available
        unknown = [c for c in cameras if c not in available]
        if unknown or not cameras:
            raise ValueError(f"{path}: cameras {list(cameras)} requested; the dataset has image cameras {available}")
        return list(cameras)

    def _present(self, kind: str) -> bool:
        """Whether every selected camera has the ``kind`` feature (``depth``, ``intrinsics``, ``cam_to_world``)."""
        have = [camera_columns(c)[kind] in self.features for c in self.cameras]
        if any(have) and not all(have):
            with_it = [c for c, h in zip(self.cameras, have) if h]
            raise ValueError(
                f"{self.root / INFO_FILE}: cameras {with_it} have {kind} but {self.cameras} were selected; "
                "select cameras that all have it or none"
            )
        return all(have)

    def _allocate(self, frames: int, load_depth: bool) -> None:
        sizes = {tuple(self.features[camera_columns(c)["image"]]["shape"][:2]) for c in self.cameras}
        if len(sizes) != 1:
            raise ValueError(
                f"{self.root / INFO_FILE}: the selected cameras {self.cameras} have different image sizes "
                f"{sorted(sizes)}; select cameras of one size"
            )
        (height, width), n = sizes.pop(), len(self.cameras)
        self.state_dim = int(self.features[STATE]["shape"][0])
        self.action_dim = int(self.features[ACTION]["shape"][0])
        self._images = torch.empty(frames, n, 3, height, width, dtype=torch.uint8)
        self._state = torch.empty(frames, self.state_dim)
        self._actions = torch.empty(frames, self.action_dim)
        load_depth = load_depth and self._present("depth")
        self._depth = torch.empty(frames, n, height, width, dtype=torch.uint16) if load_depth else None
        self._intrinsics = torch.empty(frames, n, 3, 3) if self._present("intrinsics") else None
        self._cam_to_world = torch.empty(frames, n, 4, 4) if self._present("cam_to_world") else None

    def _load_episode(self, path: Path, episode: int, start: int, end: int, pool: ThreadPoolExecutor) -> np.ndarray:
        """Fill frames ``[start, end)`` from one parquet file; returns its task indices.

        Raises:
            EpisodeError: the file is missing, unreadable (not parquet, truncated) or inconsistent.
        """
        if not path.is_file():
            raise EpisodeError(path, episode, f"missing (listed in {self.root / EPISODES_FILE})")
        try:
            return self._read_episode(path, episode, start, end, pool)
        except (ValueError, OSError, pa.ArrowException) as err:
            raise EpisodeError(path, episode, str(err)) from None

    def _read_episode(self, path: Path, episode: int, start: int, end: int, pool: ThreadPoolExecutor) -> np.ndarray:
        loaded = {"image": True, "depth": self._depth is not None, "intrinsics": self._intrinsics is not None,
                  "cam_to_world": self._cam_to_world is not None}
        columns = [STATE, ACTION, *INDEX_COLUMNS]
        columns += [name for c in self.cameras for kind, name in camera_columns(c).items() if loaded[kind]]
        present = pq.read_schema(path).names
        missing = [c for c in columns if c not in present]
        if missing:
            raise ValueError(f"missing column(s) {missing}; the file has {present}")
        table = pq.read_table(path, columns=columns)
        if table.num_rows != end - start:
            raise ValueError(f"{table.num_rows} frames, but {self.root / EPISODES_FILE} says the episode has length {end - start}")
        if (table.column("episode_index").to_numpy() != episode).any():
            raise ValueError(f"the episode_index column is not {episode} on every row")
        if (table.column("frame_index").to_numpy() != np.arange(end - start)).any():
            raise ValueError(f"frame_index must run 0..{end - start - 1} in order")
        for name, target, dim in ((STATE, self._state, self.state_dim), (ACTION, self._actions, self.action_dim)):
            values = _vectors(table, name, dim)
            bad = np.flatnonzero(~np.isfinite(values).all(1))
            if bad.size:
                raise ValueError(f"NaN or inf in {name!r} at frame(s) {bad[:10].tolist()}")
            target[start:end] = torch.from_numpy(values)
        for slot, camera in enumerate(self.cameras):
            names = camera_columns(camera)
            images = _png_frames(table, names["image"], pool)
            expected = (*self._images.shape[3:], 3)
            if any(image.shape != expected for image in images):
                shapes = sorted({image.shape for image in images})
                raise ValueError(f"{names['image']!r} frames must be {list(expected)} (info.json); got {shapes}")
            self._images[start:end, slot] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
            if self._depth is not None:
                depth = _png_frames(table, names["depth"], pool)
                if any(d.shape != expected[:2] or d.dtype != np.uint16 for d in depth):
                    got = sorted({(d.shape, str(d.dtype)) for d in depth})
                    raise ValueError(f"{names['depth']!r} frames must be {list(expected[:2])} uint16; got {got}")
                self._depth[start:end, slot] = torch.from_numpy(np.stack(depth))
            for kind, target, dim in (("intrinsics", self._intrinsics, 3), ("cam_to_world", self._cam_to_world, 4)):
                if target is not None:
                    values = _vectors(table, names[kind], dim * dim)
                    bad = np.flatnonzero(~np.isfinite(values).all(1))
                    if bad.size:
                        raise ValueError(f"NaN or inf in {names[kind]!r} at frame(s) {bad[:10].tolist()}")
                    target[start:end, slot] = torch.from_numpy(values.reshape(-1, dim, dim))
        return table.column("task_index").to_numpy()

    @property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``meta/stats.json`` as float32 tensors: ``{feature: {mean, std, min, max, q01, q99, ...}}``."""
        return {
            name: {stat: torch.tensor(value, dtype=torch.float32) for stat, value in values.items()}
            for name, values in self._stats.items()
        }

    def __len__(self) -> int:
        return self._images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range for {len(self)} frames")
        end = int(self._episode_end[index])
        steps = torch.arange(index, index + self.horizon)
        sample: dict[str, Any] = {
            keys.IMAGES: self._images[index].float().div_(255.0),
            keys.TASK: self._task_of[index],
            keys.STATE: self._state[index].clone(),
            keys.ACTIONS: self._actions[steps.clamp(max=end - 1)],
            keys.ACTION_MASK: steps < end,
        }
        if self._depth is not None:
            sample[keys.DEPTH] = self._depth[index].float().div_(DEPTH_UNITS_PER_METRE)
        if self._intrinsics is not None:
            sample[keys.INTRINSICS] = self._intrinsics[index].clone()
        if self._cam_to_world is not None:
            sample[keys.CAM_TO_WORLD] = self._cam_to_world[index].clone()
        return sample


