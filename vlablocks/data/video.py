"""Video frames for LeRobot-style datasets: decode frames at timestamps (PyAV or torchcodec) and read
the stream fields LeRobot writes into ``info.json`` (encoding: :mod:`vlablocks.data.video_writer`).

Timestamps are seconds, absolute within the file (LeRobot v3.0 files hold many episodes one after
another). Decoded frames are uint8 ``[T, 3, H, W]``; frames to encode are uint8 ``[T, H, W, 3]``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch


logger = logging.getLogger(__name__)

BACKENDS = ("pyav", "torchcodec")
CACHE_SIZE = 8  # open readers kept per process (several cameras x consecutive chunk files)
DECODER_THREADS = 1  # per reader; DataLoader workers give the parallelism


class VideoNotFoundError(FileNotFoundError):
    """A video file that does not exist."""


class VideoDecodeError(ValueError):
    """Frames that cannot be decoded as requested."""


class FrameToleranceError(VideoDecodeError):
    """A requested timestamp whose nearest decoded frame is farther than the tolerance."""


@dataclass
class _Entry:
    reader: Any  # av.container.InputContainer or torchcodec VideoDecoder
    lock: threading.Lock = field(default_factory=threading.Lock)


class _ReaderCache:
    """LRU of open readers, private to one process: a fork starts the child with an empty cache,
    since a demuxer shares its file offset with the parent's copy."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def get(self, key: tuple, opener: Callable[[], Any]) -> _Entry:
        if self._pid != os.getpid():  # forked: drop the parent's readers, and its lock's state
            self._pid, self._lock, self._entries = os.getpid(), threading.Lock(), OrderedDict()
        key = (self._pid, *key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        entry = _Entry(opener())
        with self._lock:
            entry = self._entries.setdefault(key, entry)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                # Dropped, not closed: a thread may still be decoding from it; GC closes it.
                self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = _ReaderCache(CACHE_SIZE)


def clear_reader_cache() -> None:
    """Forget this process's open readers."""
    _CACHE.clear()


@functools.cache
def torchcodec_available() -> bool:
    """Whether torchcodec imports here (it needs FFmpeg's shared libraries on the system)."""
    try:
        _torchcodec_decoder_class()
    except (ImportError, OSError, RuntimeError) as error:
        logger.debug("torchcodec unavailable: %s", error)
        return False
    return True


def _torchcodec_decoder_class() -> type:
    # Optional dependency, imported on use: loading it loads the system's FFmpeg libraries.
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder


def _resolve_backend(backend: str | None) -> str:
    backend = backend or "pyav"
    if backend not in BACKENDS:
        raise ValueError(f"video backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torchcodec" and not torchcodec_available():
        raise VideoDecodeError("video backend 'torchcodec' requested; got an import failure "
                               "(pip install torchcodec and system FFmpeg 4-8 shared libraries)")
    return backend


def _open_pyav(path: Path) -> av.container.InputContainer:
    container = av.open(str(path), "r")
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: expected a video stream; got streams {list(container.streams)}")
    container.streams.video[0].thread_count = DECODER_THREADS
    return container


def open_reader(path: str | os.PathLike, backend: str | None = None) -> Any:
    """This process's cached reader for ``path``: a PyAV container or a torchcodec VideoDecoder."""
    return _reader_entry(Path(path), _resolve_backend(backend)).reader


def _reader_entry(path: Path, backend: str) -> _Entry:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise VideoNotFoundError(f"{path}: expected a video file; got no such file") from None
    # A rewritten file (new mtime or size) gets a new reader.
    key = (backend, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if backend == "pyav":
        return _CACHE.get(key, lambda: _open_pyav(path))
    # "exact" seek mode: "approximate" returns the next frame on H.265 streams with B-frames.
    return _CACHE.get(key, lambda: _torchcodec_decoder_class()(str(path), seek_mode="exact",
                                                               num_ffmpeg_threads=DECODER_THREADS))


def decode_frames(path: str | os.PathLike, timestamps: Sequence[float] | np.ndarray | torch.Tensor,
                  tolerance_s: float, backend: str | None = None) -> torch.Tensor:
    """Frames nearest to ``timestamps`` [T] (seconds within the file) as uint8 [T, 3, H, W].

    Raises FrameToleranceError when a nearest frame is farther than ``tolerance_s`` (LeRobot uses
    ``1 / fps - 1e-4``). ``backend``: "pyav" (default) or "torchcodec".
    """
    path, backend = Path(path), _resolve_backend(backend)
    query = np.asarray(torch.as_tensor(timestamps, dtype=torch.float64).reshape(-1))
    if query.size == 0 or not np.isfinite(query).all():
        raise ValueError(f"{path}: expected finite timestamps; got {query.tolist()}")
    entry = _reader_entry(path, backend)
    with entry.lock:
        if backend == "pyav":
            frames, times = _decode_pyav(entry.reader, path, query)
            return torch.stack([_pyav_to_tensor(frames[i]) for i in _nearest(path, query, times, tolerance_s)])
        frames, times = _decode_torchcodec(entry.reader, query)
        return frames[torch.as_tensor(_nearest(path, query, times, tolerance_s))].contiguous()


def _decode_pyav(container: av.container.InputContainer, path: Path,
                 query: np.ndarray) -> tuple[list[av.VideoFrame], np.ndarray]:
    """Decoded frames covering [min(query), max(query)] and their times [N]."""
    stream = container.streams.video[0]
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    first, last = float(query.min()), float(query.max())
    frame_s = 1 / float(stream.average_rate or stream.guessed_rate or 30)
    back = 0.0
    while True:
        target = max(first - back, start)
        # backward=True: the keyframe at or before target. With B-frames the demuxer seeks by decode
        # time, so a keyframe may show after `first`; then seek again from earlier.
        container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        frames, times = [], []
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            frames.append(frame)
            times.append(float(frame.pts * stream.time_base))
            if times[-1] >= last:
                break
        if not times:
            raise VideoDecodeError(f"{path}: expected frames from {target:.4f} s on; got none decoded")
        if times[0] <= first or target <= start:
            return frames, np.asarray(times)
        back = max(2 * back, times[0] - first + frame_s)


def _decode_torchcodec(decoder: Any, query: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Frames at the indices nearest to ``query`` [T] (as LeRobot does), [T, 3, H, W], and their times."""
    meta = decoder.metadata
    begin = meta.begin_stream_seconds or 0.0
    indices = np.clip(np.round((query - begin) * meta.average_fps), 0, meta.num_frames - 1)
    batch = decoder.get_frames_at(indices=indices.astype(int).tolist())
    return batch.data, batch.pts_seconds.numpy().astype(np.float64)


def _nearest(path: Path, query: np.ndarray, times: np.ndarray, tolerance_s: float) -> np.ndarray:
    """Index into ``times`` [N] of the nearest frame to each of ``query`` [T], within tolerance."""
    order = np.argsort(times, kind="stable")
    sorted_times = times[order]
    if len(times) == 1:
        chosen = np.zeros(len(query), dtype=np.int64)
    else:
        right = np.clip(np.searchsorted(sorted_times, query), 1, len(times) - 1)
        pick_left = np.abs(query - sorted_times[right - 1]) <= np.abs(sorted_times[right] - query)
        chosen = order[np.where(pick_left, right - 1, right)]
    distance = np.abs(times[chosen] - query)
    bad = distance > tolerance_s
    if bad.any():
        raise FrameToleranceError(
            f"{path}: requested timestamps {np.round(query[bad], 4).tolist()} expected a frame within "
            f"tolerance_s={tolerance_s:.4g}; got nearest frames at {np.round(times[chosen][bad], 4).tolist()}")
    return chosen


def _pyav_to_tensor(frame: av.VideoFrame) -> torch.Tensor:
    """One frame as uint8 [3, H, W]."""
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def video_info(path: str | os.PathLike) -> dict[str, Any]:
    """The video fields LeRobot writes into info.json's ``features[key]["info"]``, plus
    ``video.frames`` (the frame count in the mp4 header)."""
    path = Path(path)
    if not path.is_file():
        raise VideoNotFoundError(f"{path}: expected a video file; got no such file")
    with av.open(str(path), "r") as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: expected a video stream; got streams {list(container.streams)}")
        stream = container.streams.video[0]
        pix_fmt, fps = stream.codec_context.pix_fmt, stream.average_rate or stream.guessed_rate
        return {"video.height": stream.height, "video.width": stream.width,
                "video.codec": stream.codec_context.codec.canonical_name, "video.pix_fmt": pix_fmt,
                "video.is_depth_map": False, "video.fps": float(fps) if fps else None,
                "video.channels": len(av.VideoFormat(pix_fmt).components) if pix_fmt else None,
                "video.frames": stream.frames, "has_audio": bool(container.streams.audio)}
