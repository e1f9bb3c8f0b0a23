"""Decode speed of :mod:`vlablocks.data.video` backends (PyAV, torchcodec) on synthetic clips.

    python benchmarks/video_decode.py                       # 300 frames 224x224 at 30 fps
    python benchmarks/video_decode.py --codecs h264 --random 100

For each codec a clip is encoded as LeRobot does (yuv420p, GOP 2, CRF 30) in a temp dir, then
decoded through :func:`decode_frames` with one decoder thread per reader (as in a DataLoader worker):
(a) sequential: every frame in one call; (b) random: single frames in shuffled order, reader cached;
(c) random, reopening the file for every frame (no reader cache). Figures are frames per second,
the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


import numpy as np  # noqa: E402

from vlablocks.data import video, video_writer  # noqa: E402

logger = logging.getLogger("video_decode")


def synthetic_clip(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """[frames, size, size, 3] uint8: a drifting gradient with moving discs and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        image = np.stack([x + 2 * t, y + t, (x + y) / 2 + 3 * t], axis=-1) % 256
        for k in range(3):
            cx, cy = size / 2 + size / 3 * np.cos(t / 20 + 2 * k), size / 2 + size / 3 * np.sin(t / 15 + k)
            image[(x - cx) ** 2 + (y - cy) ** 2 < (size / 10) ** 2] = (255 * (k == 0), 255 * (k == 1), 255 * (k == 2))
        out[t] = np.clip(image + rng.normal(0, 4, image.shape), 0, 255)
    return out


def best_rate(run: Callable[[], int], repeats: int) -> float:
    """Frames per second of the fastest of ``repeats`` calls of ``run`` (which returns frames decoded)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        best = max(best, count / (time.perf_counter() - start))
    return best


def measure(path: Path, backend: str, fps: int, frames: int, random_reads: int, repeats: int) -> dict[str, float]:
    """Frames per second for sequential, random (cached reader) and random (reopened) access."""
    tolerance = 1 / fps - 1e-4
    order = np.random.default_rng(1).integers(0, frames, size=random_reads) / fps
    every = np.arange(frames) / fps

    def sequential() -> int:
        video.clear_reader_cache()
        return len(video.decode_frames(path, every, tolerance, backend))

    def random_access(reopen: bool) -> int:
        video.clear_reader_cache()
        for t in order:
            if reopen:
                video.clear_reader_cache()
            video.decode_frames(path, [t], tolerance, backend)
        return len(order)

    return {"sequential": best_rate(sequential, repeats), "random": best_rate(lambda: random_access(False), repeats),
            "random_reopen": best_rate(lambda: random_access(True), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--random", type=int, default=150, help="single-frame reads per random-access run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--codecs", default="libsvtav1,h264,hevc")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backends = ["pyav"] + (["torchcodec"] if video.torchcodec_available() else [])
    logger.info("encoders available: %s; backends: %s", ", ".join(video_writer.available_encoders()), ", ".join(backends))
    clip = synthetic_clip(args.frames, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs.split(","):
            start = time.perf_counter()
            path = video_writer.encode_video(clip, Path(tmp) / f"{codec}.mp4", args.fps, codec=codec)
            info = video.video_info(path)
            logger.info("%s: encoded %d frames in %.1f s, %d KiB", info["video.codec"], info["video.frames"],
                        time.perf_counter() - start, path.stat().st_size // 1024)
            for backend in backends:
                rates = measure(path, backend, args.fps, args.frames, args.random, args.repeats)
                rows.append((info["video.codec"], backend, rates))
    header = "| codec | backend | sequential fps | random fps (cached reader) | random fps (reopen each) |"
    lines = [header, "|---|---|---:|---:|---:|"]
    lines += [f"| {codec} | {backend} | {r['sequential']:.0f} | {r['random']:.0f} | {r['random_reopen']:.0f} |"
              for codec, backend, r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
