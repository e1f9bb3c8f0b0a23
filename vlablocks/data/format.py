"""The LeRobot dataset layout, format v3.0 (the default) and v2.1, as vlablocks writes and reads it:
the layout's names and the frame encodings the writer and the reader share.

::

    v3.0                                                 v2.1
    meta/info.json   codebase_version, fps, features,    meta/info.json
                     totals, data_path, video_path
    meta/tasks.parquet        task (index), task_index   meta/tasks.jsonl      {task_index, task}
    meta/episodes/chunk-C/file-F.parquet  one row per    meta/episodes.jsonl   {episode_index, tasks, length}
        episode: its files, rows, video span, stats      meta/episodes_stats.jsonl  per-episode statistics
    meta/stats.json  {feature: {mean, std, min, max, q01, q99, count}}       (both; v2.1 LeRobot pools episodes_stats)
    data/chunk-C/file-F.parquet  many episodes           data/chunk-C/episode_E.parquet  one episode
    videos/<key>/chunk-C/file-F.mp4  many episodes       videos/chunk-C/<key>/episode_E.mp4  one episode

Parquet columns: ``observation.state`` and ``action`` (fixed-size lists of float32), ``timestamp``
(float32, ``frame_index / fps``), ``frame_index``, ``episode_index``, ``index`` (the frame's
position in the whole dataset), ``task_index`` (int64) and, per camera ``<cam>``:

- ``observation.images.<cam>``: PNG bytes in LeRobot's image struct ``{bytes, path}``, unless the
  camera is stored as video (then it is no column: its frames are in the mp4 files);
- ``observation.depth.<cam>`` (optional, vlablocks): z-depth as a 16-bit grayscale PNG of whole
  millimetres (``round(depth_m * 1000)``, read back within 0.5 mm); 0 means "no depth" and is also
  what NaN, non-positive and beyond-65.535 m depths are stored as;
- ``observation.intrinsics.<cam>`` (vlablocks): the pinhole ``K`` row-major (9 floats);
- ``observation.cam_to_world.<cam>`` (optional, vlablocks): the camera pose, row-major 4 x 4.

:class:`~vlablocks.data.writer.DatasetWriter` writes a dataset (every file atomically);
:func:`~vlablocks.data.meta.read_meta` and :class:`~vlablocks.data.reader.LeRobotDataset` read one
(either version, written by vlablocks or by LeRobot).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
from PIL import Image

VERSIONS = ("v3.0", "v2.1")
INFO_FILE, STATS_FILE = "meta/info.json", "meta/stats.json"
V21_TASKS, V21_EPISODES, V21_EPISODE_STATS = "meta/tasks.jsonl", "meta/episodes.jsonl", "meta/episodes_stats.jsonl"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_TASKS, V30_EPISODES_DIR = "meta/tasks.parquet", "meta/episodes"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CHUNKS_SIZE = 1000  # files per chunk directory
DATA_FILE_MB, VIDEO_FILE_MB = 100, 200  # v3.0: a new file once one holds this much (LeRobot's sizes)

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
CAMERA_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


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


def camera_columns(camera: str) -> dict[str, str]:
    """The column names of one camera's features, keyed ``image``, ``depth``, ``intrinsics``, ``cam_to_world``."""
    return {
        "image": IMAGE_PREFIX + camera,
        "depth": DEPTH_PREFIX + camera,
        "intrinsics": INTRINSICS_PREFIX + camera,
        "cam_to_world": CAM_TO_WORLD_PREFIX + camera,
    }


def episode_path(episode: int, template: str = V21_DATA_PATH, chunks_size: int = CHUNKS_SIZE, **names: str) -> str:
    """A v2.1 per-episode path (parquet, or with ``video_key`` an mp4), relative to the dataset root."""
    return template.format(episode_chunk=episode // chunks_size, episode_index=episode, **names)


def file_path(template: str, file: int, chunks_size: int = CHUNKS_SIZE, **names: str) -> str:
    """A v3.0 path of the ``file``-th file of its kind (``V30_DATA_PATH``, ...), relative to the root."""
    return template.format(chunk_index=file // chunks_size, file_index=file % chunks_size, **names)


def feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """``[N, D]`` -> ``{mean, std, min, max, q01, q99}``, each ``[D]``, and ``count [1]`` (float64;
    std is the population std; quantiles exact, by numpy's linear interpolation)."""
    values = np.asarray(values, dtype=np.float64)
    q01, q99 = np.quantile(values, [0.01, 0.99], axis=0)
    return {"mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0),
            "q01": q01, "q99": q99, "count": np.array([len(values)])}


def image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 ``[T, H, W, 3]`` -> per-channel ``{mean, std, min, max}`` as ``[3, 1, 1]`` in [0, 1]
    (LeRobot's layout for image statistics) and ``count [1]``; exact, from each channel's 256-level
    histogram (30x faster than reducing the frames as floats)."""
    counts = np.stack([np.bincount(images[..., c].reshape(-1), minlength=256) for c in range(3)]).astype(np.float64)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(1)
    mean = counts @ levels / total
    std = np.sqrt((counts * (levels[None] - mean[:, None]) ** 2).sum(1) / total)
    present = counts > 0
    per_channel = {"mean": mean, "std": std, "min": levels[present.argmax(1)], "max": levels[255 - present[:, ::-1].argmax(1)]}
    return {**{k: v.reshape(3, 1, 1) for k, v in per_channel.items()}, "count": np.array([len(images)])}
