"""Encode frames to mp4 as LeRobot does (AV1 through SVT-AV1 by default, H.264 or HEVC on request;
yuv420p, a keyframe every ``gop`` frames), appending episode after episode to one file.

:class:`VideoWriter` writes to a hidden temporary file beside the target and renames it into place
on :meth:`~VideoWriter.close`; :meth:`~VideoWriter.abort` (or an exception inside ``with``) leaves
no file. Frames are uint8 ``[T, H, W, 3]`` (numpy or torch).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch

logger = logging.getLogger(__name__)

# Encoders tried for each accepted codec name, in order. AV1 and HEVC fall back to H.264 last
# (with a warning): every decoder LeRobot uses reads H.264.
_AV1, _HEVC, _H264 = ("libsvtav1", "libaom-av1", "librav1e", "libx264"), ("libx265", "libx264"), ("libx264",)
ENCODER_ORDER: dict[str, tuple[str, ...]] = {
    "libsvtav1": _AV1, "av1": _AV1, "hevc": _HEVC, "libx265": _HEVC, "h264": _H264, "libx264": _H264}


class VideoEncodeError(ValueError):
    """Frames or settings that cannot be encoded."""


@functools.cache
def available_encoders() -> tuple[str, ...]:
    """The encoders named in :data:`ENCODER_ORDER` that this PyAV build's FFmpeg has."""
    names = dict.fromkeys(name for order in ENCODER_ORDER.values() for name in order)
    return tuple(name for name in names if name in av.codecs_available and av.Codec(name, "w").is_encoder)


def resolve_encoder(codec: str) -> str:
    """The encoder used for ``codec``: the first available of :data:`ENCODER_ORDER`
    (libsvtav1/av1 -> libaom-av1 -> librav1e -> libx264; hevc/libx265 -> libx264; h264/libx264)."""
    if codec not in ENCODER_ORDER:
        raise VideoEncodeError(f"codec must be one of {sorted(ENCODER_ORDER)}; got {codec!r}")
    candidates, available = ENCODER_ORDER[codec], available_encoders()
    name = next((name for name in candidates if name in available), None)
    if name is None:
        raise VideoEncodeError(f"codec {codec!r}: expected one of encoders {candidates}; got only {available}")
    if name != candidates[0]:
        logger.warning("encoder %s is not in this FFmpeg build; using %s", candidates[0], name)
    return name


def _encoder_options(encoder: str, crf: int, gop: int, preset: str | None) -> dict[str, str]:
    options = {"g": str(gop), "crf": str(crf)}
    if encoder == "libsvtav1":
        options["preset"] = preset or "10"
    elif encoder == "libaom-av1":
        options["cpu-used"] = preset or "8"
    elif encoder in ("libx264", "libx265"):
        options["preset"] = preset or "medium"
        if encoder == "libx265":
            options["x265-params"] = "log-level=error"
    return options


def check_frames(frames: np.ndarray | torch.Tensor, path: Path, pix_fmt: str = "yuv420p") -> np.ndarray:
    """``frames`` as contiguous uint8 ``[T, H, W, 3]`` (VideoEncodeError naming ``path`` otherwise;
    yuv420p needs even sizes: no silent padding)."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0 or array.dtype != np.uint8:
        raise VideoEncodeError(f"{path}: frames must be uint8 [T>0, H, W, 3]; got {array.dtype} {list(array.shape)}")
    height, width = array.shape[1:3]
    odd_h = "420" in pix_fmt and height % 2
    odd_w = ("420" in pix_fmt or "422" in pix_fmt) and width % 2
    if odd_h or odd_w:
        raise VideoEncodeError(f"{path}: pix_fmt {pix_fmt} needs even height and width; got {height}x{width} "
                               "(crop or pad the frames first)")
    return np.ascontiguousarray(array)


def _to_av_frame(image: np.ndarray) -> av.VideoFrame:
    """One ``[H, W, 3]`` uint8 image as an RGB frame."""
    return av.VideoFrame.from_ndarray(image, format="rgb24")


class VideoWriter:
    """An mp4 file written clip after clip: ``append`` clips (an episode each, say), then ``close``
    (atomic rename into place). ``frames_written / fps`` is the timestamp the next appended frame
    will have: an episode's ``from_timestamp`` in a v3.0 dataset.

    Each clip is encoded by an encoder of its own into a hidden temporary file, whose packets are
    then copied into the file (no re-encoding), as LeRobot concatenates episodes: no encoder runs
    for longer than a clip (SVT-AV1 was seen to stall after ~80k frames in one session here).
    """

    def __init__(self, path: str | os.PathLike, fps: float, codec: str = "libsvtav1", crf: int = 30, gop: int = 2,
                 pix_fmt: str = "yuv420p", preset: str | None = None) -> None:
        self.path, self.fps, self.pix_fmt = Path(path), fps, pix_fmt
        self.encoder = resolve_encoder(codec)
        if self.encoder == "libsvtav1":  # SVT-AV1 prints a banner per file on stderr unless told errors only
            os.environ.setdefault("SVT_LOG", "1")
        self._options = _encoder_options(self.encoder, crf, gop, preset)
        self._rate = Fraction(fps).limit_denominator(1001 * 1000)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._temporary(".tmp.mp4")
        self._container = av.open(str(self._tmp), "w", format="mp4")
        self._stream: av.VideoStream | None = None
        self._size: tuple[int, int] | None = None
        self.frames_written = 0

    def _temporary(self, suffix: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix, dir=self.path.parent)
        os.close(fd)
        return Path(name)

    def append(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode uint8 ``[T, H, W, 3]`` frames after those already written (same size)."""
        array = check_frames(frames, self.path, self.pix_fmt)
        if self._size is not None and array.shape[1:3] != self._size:
            raise VideoEncodeError(f"{self.path}: frames must be {self._size[0]}x{self._size[1]} like the "
                                   f"earlier ones; got {array.shape[1]}x{array.shape[2]}")
        self._size = array.shape[1:3]
        clip = self._temporary(".clip.mp4")
        try:
            self._encode_clip(array, clip)
            self._copy_packets(clip)
        finally:
            clip.unlink(missing_ok=True)
        self.frames_written += len(array)

    def _encode_clip(self, array: np.ndarray, clip: Path) -> None:
        with av.open(str(clip), "w", format="mp4") as container:
            stream = container.add_stream(self.encoder, rate=self._rate)
            stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], self.pix_fmt
            stream.options = self._options
            for index, image in enumerate(array):
                frame = _to_av_frame(image)
                frame.pts, frame.time_base = index, 1 / self._rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))

    def _copy_packets(self, clip: Path) -> None:
        """The clip's packets into the file, shifted by the frames already written."""
        with av.open(str(clip), "r") as source:
            template = source.streams.video[0]
            if self._stream is None:
                self._stream = self._container.add_stream_from_template(template, opaque=True)
            shift = Fraction(self.frames_written) / self._rate / template.time_base
            if shift.denominator != 1:
                raise VideoEncodeError(f"{self.path}: the clip's time base {template.time_base} does not count whole "
                                       f"frames at {self.fps} fps")
            for packet in source.demux(template):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packet.pts = None if packet.pts is None else packet.pts + int(shift)
                packet.dts = None if packet.dts is None else packet.dts + int(shift)
                packet.stream = self._stream
                self._container.mux(packet)

    @property
    def bytes_written(self) -> int:
        """The size of the file so far (what the encoder has flushed)."""
        return self._tmp.stat().st_size

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        if self._stream is None:
            self.abort()
            raise VideoEncodeError(f"{self.path}: no frames were appended")
        self._container.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)
        os.replace(self._tmp, self.path)
        logger.debug("wrote %s: %d frames %s at %s fps", self.path, self.frames_written, self.encoder, self.fps)
        return self.path

    def abort(self) -> None:
        """Drop what was written: no file is left."""
        try:
            self._container.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def encode_video(frames: np.ndarray | torch.Tensor, path: str | os.PathLike, fps: float, codec: str = "libsvtav1",
                 crf: int = 30, gop: int = 2, pix_fmt: str = "yuv420p", preset: str | None = None) -> Path:
    """Write uint8 ``[T, H, W, 3]`` ``frames`` to an mp4 at ``path``, atomically; returns the path."""
    array = check_frames(frames, Path(path), pix_fmt)
    with VideoWriter(path, fps, codec, crf, gop, pix_fmt, preset) as writer:
        writer.append(array)
    return Path(path)
