"""Stream a large LeRobot v3.0 video dataset from disk with bounded memory, and compare the loader's
throughput with what a ``mid_llava3d_deepfusion`` training step consumes (issue 20).

    python benchmarks/data_stream.py                         # generate /tmp/vlablocks_stream_100k once, then measure
    python benchmarks/data_stream.py --data /tmp/vlablocks_stream_100k   # reuse it (generation skipped)

1. Generation (skipped when ``--data`` already holds a dataset): ``--episodes`` x ``--length``
   frames at ``--size`` px, the camera stored as AV1 video (libsvtav1, LeRobot's default),
   16-bit depth PNGs and intrinsics (the recipe has a geometry encoder), smooth synthetic content
   that changes every frame (drifting gradients and moving blocks).
2. Streaming: ``LeRobotDataset(cache=False)`` as the trainer opens it (the recipe's horizon and
   image size: frames are decoded, resized with padding 224 -> 256, depth PNGs decoded) in a
   shuffled ``DataLoader`` at the training batch, with 0 and with 2 workers; samples/s over
   ``--batches`` batches after ``--warmup`` ones. Memory is sampled every 0.25 s over the main
   process and its workers: the peak of the summed RSS (counts pages shared between the forked
   processes once per process: an upper bound) and of the summed PSS (shared pages split).
3. Training: one loss + backward + AdamW step of the recipe at the same batch, timed as
   ``vlablocks bench`` does (:func:`~vlablocks.tools.bench_setup.make_train_step`, median of
   ``--repeats`` after warm-up), in the same run; one step on a streamed batch checks the data fits.
4. Video decode (single random frames from the dataset's first video file) with PyAV and
   torchcodec, through ``benchmarks/video_decode.py``'s ``measure``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self


import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader

from vlablocks.data import DatasetWriter, LeRobotDataset, video
from vlablocks.io.atomic import write_json
from vlablocks.policy.batch import collate
from vlablocks.tools.bench import machine_description, median_ms
from vlablocks.tools.bench_setup import BenchSettings, build_for_bench, make_train_step

logger = logging.getLogger("data_stream")

CAMERA = "front"
TASKS = [f"move the {c} block to the {s} side" for c in ("red", "green", "blue", "yellow", "white")
         for s in ("left", "right")]
MIB = 1024**2


# ------------------------------------------------------------------------------------ generation


def synthetic_episode(episode: int, length: int, size: int, state_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    """One episode's frames: drifting RGB gradients with three moving blocks, a depth plane with the
    blocks nearer the camera, constant intrinsics, smooth state and action curves."""
    rng = np.random.default_rng(episode)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    slope = rng.uniform(0.3, 1.2, 3).astype(np.float32)
    speed = rng.uniform(0.5, 3.0, 3).astype(np.float32)
    colours = rng.integers(0, 256, (3, 3), dtype=np.uint8)
    phase = rng.uniform(0, 2 * np.pi, (3, 2))
    block = size // 7
    images = np.empty((length, size, size, 3), np.uint8)
    depth = np.empty((length, size, size), np.float32)
    plane = 1.0 + 0.5 * y / size  # metres: the floor recedes towards the top of the frame
    for t in range(length):
        image = np.stack([slope[0] * x + speed[0] * t, slope[1] * y + speed[1] * t,
                          slope[2] * (x + y) / 2 + speed[2] * t], axis=-1) % 256
        frame_depth = plane.copy()
        for k in range(3):
            cx = int((size - block) * (0.5 + 0.45 * np.sin(t / 25 + phase[k, 0])))
            cy = int((size - block) * (0.5 + 0.45 * np.cos(t / 35 + phase[k, 1])))
            image[cy:cy + block, cx:cx + block] = colours[k]
            frame_depth[cy:cy + block, cx:cx + block] = 0.6 + 0.1 * k
        images[t], depth[t] = image, frame_depth
    steps = np.arange(length, dtype=np.float32)[:, None]
    state = np.sin(steps / 30 + np.arange(state_dim) + episode).astype(np.float32)
    action = np.cos(steps / 30 + np.arange(action_dim) + episode).astype(np.float32)
    focal = float(size)
    intrinsics = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], np.float32)
    return {"observation.state": state, "action": action, f"observation.images.{CAMERA}": images,
            f"observation.depth.{CAMERA}": depth,
            f"observation.intrinsics.{CAMERA}": np.broadcast_to(intrinsics, (length, 3, 3)).copy()}


def generate(root: Path, episodes: int, length: int, size: int, fps: float, state_dim: int, action_dim: int,
             codec: str) -> float:
    """Write the dataset to ``root``; returns the seconds it took."""
    start = time.perf_counter()
    writer = DatasetWriter(root, fps, [CAMERA], state_dim, action_dim, depth=True, robot_type="synthetic",
                           version="v3.0", video=True, video_codec=codec)
    try:
        for episode in range(episodes):
            writer.add_episode(synthetic_episode(episode, length, size, state_dim, action_dim), TASKS[episode % len(TASKS)])
            if (episode + 1) % 10 == 0 or episode + 1 == episodes:
                elapsed = time.perf_counter() - start
                logger.info("generated %d/%d episodes (%d frames) in %.0f s, ~%.0f s left", episode + 1, episodes,
                            (episode + 1) * length, elapsed, elapsed / (episode + 1) * (episodes - episode - 1))
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return time.perf_counter() - start


def folder_bytes(root: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


# ------------------------------------------------------------------------------------ memory


@dataclass
class MemoryPeak:
    """Peaks over the samples: summed RSS and PSS of the main process and its children (bytes),
    and the largest VmHWM any one of them reported."""

    rss: int = 0
    pss: int = 0
    processes: int = 0


class MemorySampler:
    """Sample the memory of this process and its children every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak = interval, MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._main = psutil.Process()

    def _sample(self) -> None:
        rss = pss = count = 0
        for process in [self._main, *self._main.children(recursive=True)]:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss, count = rss + info.rss, pss + info.pss, count + 1
        self.peak.rss, self.peak.pss = max(self.peak.rss, rss), max(self.peak.pss, pss)
        self.peak.processes = max(self.peak.processes, count)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------ measurements


def stream(dataset: LeRobotDataset, batch: int, workers: int, batches: int, warmup: int, seed: int) -> dict[str, Any]:
    """Samples/s of a shuffled DataLoader over ``batches`` batches after ``warmup``, with memory peaks."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed), drop_last=True)
    with MemorySampler() as memory:
        batches_iter: Iterator[dict[str, Any]] = iter(loader)
        for _ in range(warmup):
            next(batches_iter)
        start = time.perf_counter()
        for _ in range(batches):
            last = next(batches_iter)
        seconds = time.perf_counter() - start
        del batches_iter  # shuts the workers down
    rate = batches * batch / seconds
    logger.info("%d workers: %d batches of %d in %.1f s: %.0f samples/s; peak RSS %.0f MiB, PSS %.0f MiB (%d processes)",
                workers, batches, batch, seconds, rate, memory.peak.rss / MIB, memory.peak.pss / MIB, memory.peak.processes)
    return {"samples_per_s": rate, "seconds": seconds, "peak_rss_mib": memory.peak.rss / MIB,
            "peak_pss_mib": memory.peak.pss / MIB, "processes": memory.peak.processes, "last_batch": last}


def train_rate(recipe: str, batch: int, repeats: int, warmup: int, real_batch: dict[str, Any]) -> dict[str, float]:
    """Samples/s of the recipe's training step at ``batch`` (timed as ``vlablocks bench`` does), and
    the loss of one step on a streamed batch (the data fits the model)."""
    settings = BenchSettings(train_batch=batch, repeats=repeats, warmup=warmup, memory=False)
    vla = build_for_bench(recipe, (), settings.seed, settings.device)
    vla.train()
    loss = vla(real_batch, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    vla.zero_grad(set_to_none=True)
    logger.info("one step on a streamed batch: loss %.4f", loss.item())
    step_ms = median_ms({"train_step_ms": make_train_step(vla, settings)}, repeats, warmup, "cpu")["train_step_ms"]
    logger.info("training step at batch %d: %.0f ms (median of %d)", batch, step_ms, repeats)
    return {"train_step_ms": step_ms, "samples_per_s": 1000 * batch / step_ms, "streamed_loss": loss.item()}


def decode_rates(path: Path, fps: float, frames: int, reads: int) -> dict[str, float]:
    """Single random frames per second from ``path`` with each available backend (video_decode.py's measure)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from video_decode import measure  # benchmarks/video_decode.py

    backends = ["pyav"] + (["torchcodec"] if video.torchcodec_available() else [])
    rates = {}
    for backend in backends:
        rates[backend] = measure(path, backend, round(fps), frames, reads, repeats=2)["random"]
        logger.info("%s: %.0f random frames/s", backend, rates[backend])
    video.clear_reader_cache()
    return rates


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/vlablocks_stream_100k"),
                        help="dataset folder: reused when it holds a dataset, generated otherwise")
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--length", type=int, default=200, help="frames per episode")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--codec", default="libsvtav1")
    parser.add_argument("--recipe", default="mid_llava3d_deepfusion")
    parser.add_argument("--batch", type=int, default=32, help="the training batch (the recipe's train.batch_size)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=200, help="timed loader batches per worker count")
    parser.add_argument("--warmup", type=int, default=5, help="untimed loader batches first (worker start-up)")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps (median)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    probe = build_for_bench(args.recipe, (), 0, "cpu")
    config, image_size = probe.config, probe.vision.image_size
    geometry = probe.geometry is not None
    del probe
    logger.info("%s: image size %d, horizon %d, state %d, action %d, geometry %s", args.recipe, image_size,
                config.horizon, config.state_dim, config.action_dim, geometry)

    generation_s = None
    if (args.data / "meta" / "info.json").is_file():
        logger.info("reusing the dataset in %s", args.data)
    else:
        generation_s = generate(args.data, args.episodes, args.length, args.size, args.fps, config.state_dim,
                                config.action_dim, args.codec)
        logger.info("generated %s in %.0f s", args.data, generation_s)

    dataset = LeRobotDataset(args.data, horizon=config.horizon, image_size=image_size, load_depth=geometry, cache=False)
    info = json.loads((args.data / "meta" / "info.json").read_text())
    feature = info["features"][f"observation.images.{CAMERA}"]
    height, width = feature["shape"][:2]
    frames = len(dataset)
    rgb_bytes = frames * height * width * 3
    disk = {"all": folder_bytes(args.data), "videos": folder_bytes(args.data, "videos/**/*")}
    logger.info("%d frames %dx%d; decoded RGB %.0f MiB (+ depth: %.0f MiB); on disk %.0f MiB (videos %.0f MiB)", frames,
                height, width, rgb_bytes / MIB, dataset.decoded_bytes() / MIB, disk["all"] / MIB, disk["videos"] / MIB)

    baseline_mib = psutil.Process().memory_info().rss / MIB
    logger.info("main process RSS before streaming: %.0f MiB (torch, the recipe probe, generation leftovers)", baseline_mib)
    first_video = min(args.data.glob("videos/**/*.mp4"))
    decode = decode_rates(first_video, args.fps, min(frames, 3 * args.length), 200)
    loaders = {w: stream(dataset, args.batch, w, args.batches, args.warmup, seed=w) for w in args.workers}
    real_batch = loaders[args.workers[-1]].pop("last_batch")
    for result in loaders.values():
        result.pop("last_batch", None)
    trainer = train_rate(args.recipe, args.batch, args.repeats, 2, real_batch)

    machine = machine_description("cpu")
    rows = [("frames (episodes x length)", f"{frames:,} ({len(dataset.episode_ranges)} x {args.length})"),
            ("resolution stored -> loaded", f"{height}x{width} -> {image_size}x{image_size}"),
            ("codec", f"{feature['info']['video.codec']} ({feature['info']['video.pix_fmt']}), depth 16-bit PNG"),
            ("on disk (MiB): all / videos", f"{disk['all'] / MIB:,.0f} / {disk['videos'] / MIB:,.0f}"),
            ("decoded RGB (MiB) [+ 16-bit depth]", f"{rgb_bytes / MIB:,.0f} [{dataset.decoded_bytes() / MIB:,.0f}]")]
    if generation_s is not None:
        rows.append(("generation (s)", f"{generation_s:,.0f}"))
    rows.append(("main process RSS before streaming (MiB)", f"{baseline_mib:,.0f}"))
    for workers, result in loaders.items():
        rows.append((f"loader samples/s, {workers} workers", f"{result['samples_per_s']:.0f}"))
        rows.append((f"peak RSS / PSS (MiB), {workers} workers ({result['processes']} processes)",
                     f"{result['peak_rss_mib']:,.0f} / {result['peak_pss_mib']:,.0f}"))
    rows.append((f"trainer samples/s ({args.recipe}, batch {args.batch}, step {trainer['train_step_ms']:.0f} ms)",
                 f"{trainer['samples_per_s']:.1f}"))
    for workers, result in loaders.items():
        rows.append((f"loader / trainer, {workers} workers", f"{result['samples_per_s'] / trainer['samples_per_s']:.1f}x"))
    for backend, rate in decode.items():
        rows.append((f"random-frame decode, {backend} (frames/s)", f"{rate:.0f}"))
    print(f"\n{machine['cpu']}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| figure | value |\n| --- | ---: |")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
    if args.json:
        figures = {"frames": frames, "height": height, "width": width, "image_size": image_size, "disk_bytes": disk,
                   "rgb_bytes": rgb_bytes, "decoded_bytes": dataset.decoded_bytes(), "generation_s": generation_s,
                   "baseline_rss_mib": baseline_mib, "loaders": loaders, "trainer": trainer, "decode_fps": decode,
                   "machine": machine}
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
