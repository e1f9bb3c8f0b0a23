"""Read a dataset in the LeRobot layout (:mod:`vlablocks.data.format`) into memory and serve
the policy's batch keys with action chunks and their padding masks."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from vlablocks.data.format import (
    ACTION,
    DEPTH_UNITS_PER_METRE,
    EPISODES_FILE,
    IMAGE_PREFIX,
    INDEX_COLUMNS,
    INFO_FILE,
    STAT_NAMES,
    STATE,
    STATS_FILE,
    TASKS_FILE,
    camera_columns,
    decode_png,
    episode_path,
)
from vlablocks.policy import batch as keys

logger = logging.getLogger(__name__)


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
        self._check_stats()
        files = self._episode_files(info, episodes)
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
            for episode, (start, end), path in zip(progress, self.episode_ranges, files):
                index = int(episode["episode_index"])
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

    def _episode_files(self, info: Mapping[str, Any], episodes: Sequence[Mapping[str, Any]]) -> list[Path]:
        """Each episode's parquet file: the episode indices must be distinct and every file must lie
        inside the dataset (``data_path`` comes from a file a stranger may have written)."""
        if not episodes:
            raise ValueError(f"{self.root / EPISODES_FILE}: the dataset has no episodes")
        counts = Counter(int(e["episode_index"]) for e in episodes)
        repeated = sorted(i for i, n in counts.items() if n > 1)
        if repeated:
            raise ValueError(f"{self.root / EPISODES_FILE}: episode_index {repeated} listed more than once "
                             "(each episode must be listed once)")
        root = self.root.resolve()
        files = [self.root / episode_path(i, info["data_path"], int(info["chunks_size"])) for i in counts]
        outside = [str(f) for f in files if not f.resolve().is_relative_to(root)]
        if outside:
            raise ValueError(f"{self.root / INFO_FILE}: data_path {info['data_path']!r} points outside the dataset "
                             f"({outside[0]}); it must be a path relative to {self.root}")
        return files

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

    def _check_stats(self) -> None:
        """The statistics of the features training normalises (state, action), when present: numbers,
        finite, as wide as the feature, ``std >= 0``. Checked on open, before any frame is read."""
        path = self.root / STATS_FILE
        for name in (STATE, ACTION):
            width = int(np.prod(self.features[name].get("shape", [0])))
            for stat, values in (self._stats.get(name) or {}).items():
                if stat not in STAT_NAMES:
                    continue
                try:
                    array = np.asarray(values, dtype=np.float64).reshape(-1)
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: {name}.{stat} must be a list of numbers; got {str(values)[:80]}") from None
                if array.size != width:
                    raise ValueError(f"{path}: {name}.{stat} has {array.size} values; the feature has {width} "
                                     f"({INFO_FILE})")
                bad = np.flatnonzero(~np.isfinite(array))
                if bad.size:
                    raise ValueError(f"{path}: {name}.{stat} must be finite; dims {bad[:10].tolist()} are "
                                     f"{array[bad[:10]].tolist()}")
                if stat == "std" and (array < 0).any():
                    raise ValueError(f"{path}: {name}.std must be >= 0; got {array.min():.4g}")

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
