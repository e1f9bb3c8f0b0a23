"""Episode videos: frames ``[T, H, W, 3]`` -> an mp4 (with imageio-ffmpeg) or else a GIF, written atomically."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlablocks.io.atomic import atomic_path

GIF_MAX_FPS = 25  # browsers slow down GIF frames shorter than 20 ms: GIFs keep every k-th frame
VIDEO_SIZE = 256  # px of rollout videos for people, whatever the policy's input resolution (96-128 px)


def write_video(frames: Sequence[np.ndarray], stem: str | Path, fps: float) -> Path:
    """Frames ``[H, W, 3]`` uint8 -> ``stem.mp4`` (needs imageio-ffmpeg) or else ``stem.gif``.

    The GIF keeps every k-th frame so that it plays at most :data:`GIF_MAX_FPS` frames per second
    (real time). Written atomically; returns the path.
    """
    frames, stem = list(frames), Path(stem)
    if not frames:
        raise ValueError(f"no frames for the video {stem}")
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return _write_mp4(frames, stem.with_name(stem.name + ".mp4"), fps)
    import imageio.v2 as imageio

    stride = max(1, math.ceil(fps / GIF_MAX_FPS))
    path = stem.with_name(stem.name + ".gif")
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, frames[::stride], format="GIF", duration=1000.0 * stride / fps, loop=0)
    return path


def _write_mp4(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    import imageio_ffmpeg

    height, width = frames[0].shape[:2]
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), fps=fps, codec="libx264", macro_block_size=2,
            output_params=["-f", "mp4"], ffmpeg_log_level="error",
        )
        try:
            writer.send(None)  # start ffmpeg
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()
    return path
