"""Serve a LeRobot dataset (format v2.1 or v3.0; frames as images or video) as policy batch items
with action chunks and their padding masks, streaming frames from disk or from a memory cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlablocks.data import video
from vlablocks.data.format import (
    ACTION,
    CAM_TO_WORLD_PREFIX,
    DEPTH_PREFIX,
    DEPTH_UNITS_PER_METRE,
    IMAGE_PREFIX,
    INFO_FILE,
    INTRINSICS_PREFIX,
    STAT_NAMES,
    STATS_FILE,
    STATE,
    feature_stats,
)
from vlablocks.data.frames import ParquetImages
from vlablocks.data.meta import DatasetMeta, EpisodeMeta, read_meta
from vlablocks.data.resize import PadResize
from vlablocks.data.table import EpisodeError, FrameTable, read_table
from vlablocks.policy import batch as keys

logger = logging.getLogger(__name__)

#: ``cache=None`` keeps decoded frames in memory when they take at most this many bytes.
CACHE_LIMIT_BYTES = 2 * 1024**3
#: how far (seconds) a decoded video frame may lie from the timestamp asked for: LeRobot's default.
TOLERANCE_S = 1e-4


@dataclass(frozen=True)
class DataSelection:
    """Which features of a dataset a policy reads (see :class:`LeRobotDataset`): ``cameras``
    (``None``: all), the state and action features, and whether to recompute their statistics."""

    cameras: tuple[str, ...] | None = None
    state_key: str = STATE
    action_key: str = ACTION
    recompute_stats: bool = False


class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobot dataset; sample ``i`` (a frame of the whole dataset) is a policy batch item.

    ``images [N_cam, 3, S, S]`` float in [0, 1] (each camera resized-with-pad to ``image_size``
    ``S`` when given, else at its own size), ``task`` (str), ``state [S_dim]``, ``actions [horizon,
    A]`` (the chunk starting at frame ``i``; steps past the episode end repeat its last action)
    and ``action_mask [horizon]`` (False past the episode end), plus, when every selected camera
    has them (vlablocks' geometry features), ``depth [N_cam, S, S]`` metres (0 = no depth; only
    with ``load_depth``), ``intrinsics [N_cam, 3, 3]`` and ``cam_to_world [N_cam, 4, 4]``.

    ``cameras``: camera names (``front`` for ``observation.images.front``) or whole feature
    keys; ``None`` takes every camera. ``state_key`` / ``action_key`` name the features read as
    state and actions. Frames are read when a sample is asked for (one parquet row group or one
    video seek; DataLoader workers each open their own files), or, with ``cache``, decoded once
    into memory as uint8: ``None`` caches when that takes at most :data:`CACHE_LIMIT_BYTES`. A
    video frame is the decoded frame nearest to the episode's offset in the file plus the frame's
    ``timestamp``, and must lie within ``tolerance_s`` of it (LeRobot's rule and default).
    :attr:`stats` are ``meta/``'s, completed from the frames (``recompute_stats``: replaced).
    ``history`` adds windows as LeRobot's ``delta_timestamps`` do, ``{feature: [offsets in s]}`` for
    a selected camera or a numeric feature: ``sample[feature]`` ``[K, ...]`` and ``[K]`` bool
    ``sample[feature + "_is_pad"]`` (keys a policy does not read pass its batch checks untouched).

    The frame table (every non-image value) is read and checked at once, episode by episode: a bad
    episode raises :class:`~vlablocks.data.table.EpisodeError` naming the file and the episode,
    unless ``skip_bad_episodes`` leaves it out (listed in ``skipped``). A frame that cannot be
    decoded raises an EpisodeError too, when it is cached or asked for.
    """

    def __init__(
        self,
        root: str | Path,
        horizon: int,
        cameras: Sequence[str] | None = None,
        image_size: int | None = None,
        load_depth: bool = True,
        skip_bad_episodes: bool = False,
        cache: bool | None = None,
        state_key: str = STATE,
        action_key: str = ACTION,
        tolerance_s: float = TOLERANCE_S,
        recompute_stats: bool = False,
        history: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1; got {horizon}")
        self.root, self.horizon, self.image_size, self.tolerance_s = Path(root), horizon, image_size, tolerance_s
        self.recompute_stats = recompute_stats
        self.meta: DatasetMeta = read_meta(self.root)
        self.fps, self.features, self.state_key, self.action_key = self.meta.fps, self.meta.features, state_key, action_key
        self.camera_keys = self._select_cameras(cameras)
        self.cameras = [k.removeprefix(IMAGE_PREFIX) for k in self.camera_keys]
        sizes = sorted({self._shape(c) for c in self.camera_keys})
        if image_size is None and len(sizes) > 1:
            raise ValueError(f"{self.root / INFO_FILE}: the selected cameras {self.cameras} have different image "
                             f"sizes {sizes}; pass image_size to resize them to one, or select cameras of one size")
        self.state_dim, self.action_dim = self._width(state_key), self._width(action_key)
        self._check_stats()
        self._geometry = {kind: self._present(prefix) for kind, prefix in
                          (("depth", DEPTH_PREFIX), ("intrinsics", INTRINSICS_PREFIX), ("cam_to_world", CAM_TO_WORLD_PREFIX))}
        self._geometry["depth"] &= load_depth
        vectors = {state_key: self.state_dim, action_key: self.action_dim}
        for kind, dim in (("intrinsics", 9), ("cam_to_world", 16)):
            if self._geometry[kind]:
                vectors.update({self._column(kind, c): dim for c in self.camera_keys})
        self._history = self._history_offsets(history or {})
        vectors.update({k: self._width(k) for k in self._history if k not in self.camera_keys and k not in vectors})
        self.table: FrameTable = read_table(self.meta, vectors, skip_bad_episodes)
        self.skipped = self.table.skipped
        self.episode_ranges = self.table.ranges
        self._check_tasks()
        self._episode = self.table.episode_of(np.arange(len(self.table))).astype(np.int32)
        lengths = [e - s for s, e in self.table.ranges]
        self._episode_start = np.repeat([start for start, _ in self.table.ranges], lengths)
        self._episode_end = np.repeat([end for _, end in self.table.ranges], lengths)
        self._images = {c: ParquetImages(c) for c in self.camera_keys if c not in self.meta.video_keys}
        self._depths = {c: ParquetImages(self._column("depth", c)) for c in self.camera_keys} if self._geometry["depth"] else {}
        self._resize = {c: PadResize(*self._shape(c), image_size) for c in self.camera_keys} if image_size else {}
        for camera, resize in self._resize.items():
            if not resize.identity:
                logger.info("%s: %s frames are %dx%d; resized with padding to %dx%d", self.root.name, camera,
                            resize.height, resize.width, image_size, image_size)
        self._cache: dict[str, torch.Tensor] | None = None
        if cache or (cache is None and self.decoded_bytes() <= CACHE_LIMIT_BYTES):
            self._fill_cache()

    # ------------------------------------------------------------------ layout

    def _select_cameras(self, cameras: Sequence[str] | None) -> list[str]:
        """Feature keys of the selected cameras (``front`` and ``observation.images.front`` both name one)."""
        available = [k for k in self.meta.image_keys if not k.startswith(DEPTH_PREFIX)]
        if cameras is None:
            if not available:
                raise ValueError(f"{self.root / INFO_FILE}: the dataset has no image or video features")
            return available
        chosen = [c if c in available else IMAGE_PREFIX + c for c in cameras]
        unknown = [c for c, k in zip(cameras, chosen) if k not in available]
        if unknown or not chosen:
            names = [k[len(IMAGE_PREFIX):] if k.startswith(IMAGE_PREFIX) else k for k in available]
            raise ValueError(f"cameras {list(cameras)} requested; the dataset has image cameras {names}")
        return chosen

    def _width(self, key: str) -> int:
        feature = self.features.get(key)
        if feature is None:
            raise ValueError(f"{self.root / INFO_FILE}: features must include {key!r}; got {sorted(self.features)}")
        return int(np.prod(feature["shape"]))

    def _shape(self, camera: str) -> tuple[int, int]:
        """``(H, W)`` of a camera feature (shape ``[H, W, C]``, or ``[C, H, W]`` when its names say so)."""
        feature = self.features[camera]
        shape, names = list(feature["shape"]), feature.get("names") or []
        if len(names) == 3 and names[0] in ("channel", "channels"):
            return int(shape[1]), int(shape[2])
        return int(shape[0]), int(shape[1])

    def _column(self, kind: str, camera: str) -> str:
        prefix = {"depth": DEPTH_PREFIX, "intrinsics": INTRINSICS_PREFIX, "cam_to_world": CAM_TO_WORLD_PREFIX}[kind]
        return prefix + camera.removeprefix(IMAGE_PREFIX)

    def _present(self, prefix: str) -> bool:
        """Whether every selected camera has the feature ``prefix + camera``."""
        have = [prefix + c.removeprefix(IMAGE_PREFIX) in self.features for c in self.camera_keys]
        if any(have) and not all(have):
            with_it = [c for c, h in zip(self.camera_keys, have) if h]
            raise ValueError(f"{self.root / INFO_FILE}: cameras {with_it} have {prefix}* but {self.camera_keys} were "
                             "selected; select cameras that all have it or none")
        return all(have)

    def _history_offsets(self, history: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
        """Frame offsets of ``history`` (seconds, as LeRobot's ``delta_timestamps``): multiples of
        ``1 / fps``, for a selected camera or a numeric feature."""
        offsets = {}
        for key, deltas in history.items():
            numeric = self.features.get(key, {}).get("dtype") in ("float32", "float64", "int64", "int32", "bool")
            if key not in self.camera_keys and not numeric:
                raise ValueError(f"history: {key!r} must be a selected camera {self.camera_keys} or a numeric feature of "
                                 f"{self.root / INFO_FILE}")
            steps = np.asarray(deltas, dtype=np.float64) * self.fps
            if steps.ndim != 1 or not len(steps) or (np.abs(steps - np.round(steps)) > self.tolerance_s * self.fps).any():
                raise ValueError(f"history[{key!r}]: offsets must be a list of multiples of 1 / fps = {1 / self.fps:g} s; "
                                 f"got {list(deltas)}")
            offsets[key] = np.round(steps).astype(np.int64)
        return offsets

    def _check_stats(self) -> None:
        """The statistics of the state and action features, when present: numbers, finite, as wide
        as the feature, ``std >= 0``. Checked on open, before any frame is read."""
        path = self.root / STATS_FILE
        for name, width in ((self.state_key, self.state_dim), (self.action_key, self.action_dim)):
            for stat, values in (self.meta.stats.get(name) or {}).items():
                if stat not in STAT_NAMES:
                    continue
                try:
                    array = np.asarray(values, dtype=np.float64).reshape(-1)
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: {name}.{stat} must be a list of numbers; got {str(values)[:80]}") from None
                if array.size != width:
                    raise ValueError(f"{path}: {name}.{stat} has {array.size} values; the feature has {width} ({INFO_FILE})")
                bad = np.flatnonzero(~np.isfinite(array))
                if bad.size:
                    raise ValueError(f"{path}: {name}.{stat} must be finite; dims {bad[:10].tolist()} are "
                                     f"{array[bad[:10]].tolist()}")
                if stat == "std" and (array < 0).any():
                    raise ValueError(f"{path}: {name}.std must be >= 0; got {array.min():.4g}")

    def _check_tasks(self) -> None:
        unknown = sorted(set(np.unique(self.table.task_index).tolist()) - set(self.meta.tasks))
        if unknown:
            raise ValueError(f"{self.root / 'meta'}: task_index {unknown} used by the episodes is not listed in the tasks")
        self.tasks: list[str] = [self.meta.tasks[i] for i in sorted(self.meta.tasks)]

    @cached_property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """The dataset statistics as float32 tensors, ``{feature: {mean, std, min, max, q01, q99, ...}}``,
        the state's and the actions' under ``observation.state`` and ``action`` whatever their
        features are called. Statistics of those two that ``meta/`` lacks (a v2.1 dataset has no
        quantiles), or all of theirs with ``recompute_stats``, are computed from the frames kept."""
        stats = {name: dict(values) for name, values in self.meta.stats.items() if isinstance(values, dict)}
        for canonical, key in ((STATE, self.state_key), (ACTION, self.action_key)):
            stored = {} if self.recompute_stats else stats.get(key, {})
            missing = [k for k in STAT_NAMES if k not in stored]
            if missing:  # quantiles over every frame: only when needed
                logger.info("%s: %s statistics %s computed from its %d frames", self.root.name, key, missing, len(self))
                stored = {**feature_stats(self.table.vectors[key]), **stored}
            stats[canonical] = stored
        return {name: {stat: torch.tensor(np.asarray(value, dtype=np.float64), dtype=torch.float32)
                       for stat, value in values.items()} for name, values in stats.items()}

    # ------------------------------------------------------------------ frames

    def decoded_bytes(self) -> int:
        """Bytes the decoded frames of the selected cameras take as uint8 (+ 16-bit depth)."""
        per_frame = sum(3 * h * w + (2 * h * w if self._depths else 0) for h, w in map(self._shape, self.camera_keys))
        return per_frame * len(self.table)

    def _fill_cache(self) -> None:
        """Decode every frame of the selected cameras into uint8 tensors, episode by episode."""
        cache: dict[str, torch.Tensor] = {}
        for camera in self.camera_keys:
            h, w = self._shape(camera)
            cache[camera] = torch.empty(len(self.table), 3, h, w, dtype=torch.uint8)
            if self._depths:
                cache[self._column("depth", camera)] = torch.empty(len(self.table), h, w, dtype=torch.uint16)
        ranges = tqdm(list(enumerate(self.table.ranges)), desc=f"loading {self.root.name}", unit="episode")
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PNG decoding in parallel
            for slot, (start, end) in ranges:
                frames = np.arange(start, end)
                for camera in self.camera_keys:
                    cache[camera][start:end] = self._decode_images(camera, slot, frames, pool)
                    if self._depths:
                        cache[self._column("depth", camera)][start:end] = self._decode_depth(camera, slot, frames, pool)
        self._cache = cache

    def _decode_images(self, camera: str, slot: int, frames: np.ndarray, pool: Executor | None = None) -> torch.Tensor:
        """uint8 ``[T, 3, H, W]`` of ``camera`` at the given frames of one episode (EpisodeError
        naming the file and the episode when a frame cannot be decoded)."""
        episode = self.table.episodes[slot]
        path = episode.data_file if camera in self._images else episode.videos[camera].path
        try:
            decoded = self._decode(camera, episode, frames, pool)
        except ValueError as err:  # the video module's errors, an unreadable image
            raise EpisodeError(path, episode.index, str(err).removeprefix(f"{path}: ")) from None
        expected = (3, *self._shape(camera))
        if tuple(decoded.shape[1:]) != expected:
            raise EpisodeError(path, episode.index, f"{camera!r} frames are {list(decoded.shape[1:])}; "
                                                    f"{INFO_FILE} says {list(expected)}")
        return decoded

    def _decode_depth(self, camera: str, slot: int, frames: np.ndarray, pool: Executor | None = None) -> torch.Tensor:
        """uint16 millimetres ``[T, H, W]`` of ``camera``'s depth at the given frames of one episode."""
        episode = self.table.episodes[slot]
        try:
            depth = self._depths[camera].frames(episode.data_file, self.table.file_row[frames].tolist(), pool)
        except ValueError as err:
            raise EpisodeError(episode.data_file, episode.index, str(err)) from None
        if any(d.dtype != np.uint16 or d.shape != self._shape(camera) for d in depth):
            got = sorted({(d.shape, str(d.dtype)) for d in depth})
            raise EpisodeError(episode.data_file, episode.index, f"{self._column('depth', camera)!r} frames must be "
                                                                 f"{list(self._shape(camera))} uint16; got {got}")
        return torch.from_numpy(np.stack(depth))

    def _decode(self, camera: str, episode: EpisodeMeta, frames: np.ndarray, pool: Executor | None) -> torch.Tensor:
        """Embedded images by their rows, video frames by their timestamps (the episode's offset in
        the file plus the frames' own ``timestamp``)."""
        if camera in self._images:
            images = self._images[camera].frames(episode.data_file, self.table.file_row[frames].tolist(), pool)
            return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        span = episode.videos[camera]
        times = (span.from_timestamp + self.table.timestamp[frames]).tolist()
        return video.decode_frames(span.path, times, self.tolerance_s)

    def _frame(self, camera: str, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One frame of ``camera``: uint8 ``[3, H, W]`` and (with depth) uint16 ``[H, W]``."""
        if self._cache is not None:
            depth = self._cache.get(self._column("depth", camera))
            return self._cache[camera][index], None if depth is None else depth[index]
        slot = int(self._episode[index])
        image = self._decode_images(camera, slot, np.array([index]))[0]
        if not self._depths:
            return image, None
        return image, self._decode_depth(camera, slot, np.array([index]))[0]

    # ------------------------------------------------------------------ samples

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range for {len(self)} frames")
        end = int(self._episode_end[index])
        steps = np.minimum(np.arange(index, index + self.horizon), end - 1)
        vectors = self.table.vectors
        sample: dict[str, Any] = {
            keys.TASK: self.meta.tasks[int(self.table.task_index[index])],
            keys.STATE: torch.from_numpy(vectors[self.state_key][index].copy()),
            keys.ACTIONS: torch.from_numpy(vectors[self.action_key][steps]),
            keys.ACTION_MASK: torch.arange(index, index + self.horizon) < end,
        }
        images, depths, intrinsics = [], [], []
        for camera in self.camera_keys:
            image, depth = self._frame(camera, index)
            image = image.float().div_(255.0)
            depth = None if depth is None else depth.float().div_(DEPTH_UNITS_PER_METRE)
            resize = self._resize.get(camera)
            if resize is not None:
                image = resize.images(image)
                depth = None if depth is None else resize.depth(depth)
            images.append(image)
            depths.append(depth)
            if self._geometry["intrinsics"]:
                k = torch.from_numpy(vectors[self._column("intrinsics", camera)][index].reshape(3, 3).copy())
                intrinsics.append(k if resize is None else resize.intrinsics(k))
        sample[keys.IMAGES] = torch.stack(images)
        if self._depths:
            sample[keys.DEPTH] = torch.stack(depths)
        if intrinsics:
            sample[keys.INTRINSICS] = torch.stack(intrinsics)
        if self._geometry["cam_to_world"]:
            sample[keys.CAM_TO_WORLD] = torch.stack([torch.from_numpy(vectors[self._column("cam_to_world", c)][index].reshape(4, 4).copy())
                                                     for c in self.camera_keys])
        sample.update(self._history_items(index))
        return sample

    def _history_items(self, index: int) -> dict[str, torch.Tensor]:
        """``history`` windows of frame ``index``: ``{key: [K, ...], key_is_pad: [K]}``; frames outside
        the episode repeat its nearest one and are flagged (LeRobot's padding)."""
        items: dict[str, torch.Tensor] = {}
        start, end = int(self._episode_start[index]), int(self._episode_end[index])
        for key, offsets in self._history.items():
            frames = index + offsets
            clamped = np.clip(frames, start, end - 1)
            items[f"{key}_is_pad"] = torch.from_numpy((frames < start) | (frames >= end))
            if key in self.table.vectors:
                items[key] = torch.from_numpy(self.table.vectors[key][clamped])
                continue
            if self._cache is not None:
                images = self._cache[key][torch.from_numpy(clamped)]
            else:  # one decode call for the window: one seek per video file
                images = self._decode_images(key, int(self._episode[index]), clamped)
            images = images.float().div_(255.0)
            resize = self._resize.get(key)
            items[key] = images if resize is None else resize.images(images)
        return items
