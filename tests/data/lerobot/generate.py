#!/usr/bin/env python
"""Write tiny LeRobot fixture datasets with LeRobot's OWN code and record what LeRobot's loader returns.

This script is NOT part of the vlablocks test-suite and never runs there: it needs LeRobot installed
(see README.md in this folder for the two virtual environments).  The test-suite only reads its outputs.

Modes
-----
build   (default)  python generate.py build --out tests/data/lerobot
    Detects the installed LeRobot's CODEBASE_VERSION and writes
      * v3.0 LeRobot  -> <out>/v30_video, <out>/v30_images
      * v2.1 LeRobot  -> <out>/v21
    then loads each one back with LeRobotDataset(...) and writes
      <out>/<name>_reference.json          (numbers, metadata, versions)
      <out>/<name>_reference.safetensors   (decoded camera frames, uint8 CHW)

check              python generate.py check --data DIR --out FILE.json
    Loads a dataset directory written by ANOTHER tool (e.g. vlablocks) with LeRobot's loader, using the
    same delta_timestamps, and records the same values to FILE.json (+ FILE.safetensors for frames).
    If LeRobot raises, the exception type, message and traceback are recorded verbatim instead, and the
    command still exits 0 (use --strict to exit 1).

Content (deterministic; reproducible without LeRobot via `source_frame()` below / README formulae)
-------
fps 10; 3 episodes of 7, 5, 9 frames; tasks: ep0 "pick the cube", ep1 "open the drawer", ep2 "pick the cube".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np

FPS = 10
EPISODE_LENGTHS = [7, 5, 9]
EPISODE_TASKS = ["pick the cube", "open the drawer", "pick the cube"]
FRONT_SHAPE = (48, 64, 3)  # H, W, C  (non-square on purpose)
WRIST_SHAPE = (32, 32, 3)
STATE_NAMES = ["x", "y", "z", "gripper"]
ACTION_NAMES = ["dx", "dy", "dz"]
DELTA_TIMESTAMPS = {"action": [0.0, 0.1, 0.2, 0.3]}
# Second, numbers-only load: a backward window on the state (padding at episode starts).
STATE_DELTA_TIMESTAMPS = {"observation.state": [-0.2, -0.1, 0.0]}
FRONT = "observation.images.front"
WRIST = "observation.images.wrist"


# ----------------------------------------------------------------------------------------------------------
# Deterministic content (no LeRobot needed)
# ----------------------------------------------------------------------------------------------------------
def source_frame(key: str, episode: int, frame: int) -> np.ndarray:
    """uint8 HWC image handed to LeRobot's add_frame. Smooth gradients -> small lossy-codec error."""
    if key == FRONT:
        h, w, _ = FRONT_SHAPE
        y, x = np.mgrid[0:h, 0:w]
        r = 20 + 2 * x + 10 * frame
        g = 20 + 3 * y + 20 * episode
        b = np.full_like(x, 40 + 60 * episode + 5 * frame)
    elif key == WRIST:
        h, w, _ = WRIST_SHAPE
        y, x = np.mgrid[0:h, 0:w]
        r = 200 - 4 * y - 5 * frame
        g = 30 + 4 * x + 10 * episode
        b = np.full_like(x, 100 + 40 * episode + 6 * frame)
    else:
        raise KeyError(key)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def source_state(episode: int, frame: int) -> np.ndarray:
    return np.array(
        [100 * episode + frame + 0.5, 0.1 * frame, -0.25 * episode, (frame % 2) * 1.0], dtype=np.float32
    )


def source_action(episode: int, frame: int) -> np.ndarray:
    return np.array([100 * episode + frame, -0.5 * frame, 0.25 * episode + 1.0], dtype=np.float32)


def build_features(image_dtype_front: str, image_dtype_wrist: str) -> dict:
    return {
        FRONT: {"dtype": image_dtype_front, "shape": FRONT_SHAPE, "names": ["height", "width", "channels"]},
        WRIST: {"dtype": image_dtype_wrist, "shape": WRIST_SHAPE, "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": STATE_NAMES},
        "action": {"dtype": "float32", "shape": (3,), "names": ACTION_NAMES},
    }


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def to_jsonable(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return [to_jsonable(o) for o in obj.tolist()]
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return to_jsonable(dataclasses.asdict(obj))
    return repr(obj)


def lerobot_info() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ["lerobot", "torch", "torchvision", "av", "torchcodec", "datasets", "pyarrow", "pandas",
                "numpy", "huggingface-hub", "Pillow"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["codebase_version"] = codebase_version()
    return out


def codebase_version() -> str:
    try:  # LeRobot 0.4+ (v3.0)
        from lerobot.datasets.dataset_metadata import CODEBASE_VERSION
    except ImportError:
        try:  # LeRobot 0.3.x (v2.1)
            from lerobot.datasets.lerobot_dataset import CODEBASE_VERSION
        except ImportError:  # older layout
            from lerobot.common.datasets.lerobot_dataset import CODEBASE_VERSION
    return CODEBASE_VERSION


def lerobot_dataset_cls():
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError:
        from lerobot.common.datasets.lerobot_dataset import LeRobotDataset
    return LeRobotDataset


def pick_indices(episode_bounds: list[tuple[int, int]], num_frames: int) -> list[int]:
    """first frame, a middle frame, last of ep0, near-end of ep1 (padded action window), very last."""
    idx = {0, num_frames // 2, num_frames - 1}
    s0, e0 = episode_bounds[0]
    idx |= {(s0 + e0 - 1) // 2, e0 - 1}
    if len(episode_bounds) > 1:
        s1, e1 = episode_bounds[1]
        idx |= {s1, max(s1, e1 - 2), e1 - 1}
    if len(episode_bounds) > 2:
        s2, _ = episode_bounds[2]
        idx |= {s2}
    return sorted(i for i in idx if 0 <= i < num_frames)


def episode_bounds_of(ds) -> list[tuple[int, int]]:
    """(from_index, to_index) per episode, read through LeRobot's metadata (works for v2.1 and v3.0)."""
    meta = ds.meta
    eps = meta.episodes
    bounds = []
    if isinstance(eps, dict):  # v2.1: {ep_idx: {"episode_index", "tasks", "length"}}
        start = 0
        for ep in sorted(eps):
            n = int(eps[ep]["length"])
            bounds.append((start, start + n))
            start += n
    else:  # v3.0: datasets.Dataset with dataset_from_index / dataset_to_index
        for i in range(len(eps)):
            row = eps[i]
            bounds.append((int(row["dataset_from_index"]), int(row["dataset_to_index"])))
    return bounds


def describe_episodes(ds) -> list[dict]:
    eps = ds.meta.episodes
    out = []
    if isinstance(eps, dict):
        for ep in sorted(eps):
            out.append(to_jsonable(eps[ep]))
    else:
        for i in range(len(eps)):
            row = eps[i]
            out.append({k: to_jsonable(v) for k, v in row.items() if not k.startswith("stats/")})
    return out


def describe_tasks(ds) -> object:
    tasks = ds.meta.tasks
    try:
        import pandas as pd

        if isinstance(tasks, pd.DataFrame):  # v3.0: index = task string, column task_index
            return {str(t): int(r["task_index"]) for t, r in tasks.iterrows()}
    except ImportError:
        pass
    return to_jsonable(tasks)  # v2.1: {task_index: task}


# ----------------------------------------------------------------------------------------------------------
# Reference recording (used by both modes)
# ----------------------------------------------------------------------------------------------------------
def record_reference(root: Path, out_json: Path, repo_id: str | None = None, video_backend: str = "pyav",
                     compare_to_source: bool = True) -> dict:
    import torch

    LeRobotDataset = lerobot_dataset_cls()
    repo_id = repo_id or f"local/{root.name}"
    result: dict = {
        "dataset_dir": root.name,
        "repo_id": repo_id,
        "versions": lerobot_info(),
        "video_backend_requested": video_backend,
        "delta_timestamps": DELTA_TIMESTAMPS,
        "image_encoding_in_reference": "uint8 CHW = round(LeRobot float32 CHW in [0,1] * 255); "
                                       "arrays in the .safetensors sidecar named '<global index>/<key>'",
    }
    frames: dict[str, np.ndarray] = {}
    stage = "LeRobotDataset(...)"
    try:
        ds = LeRobotDataset(repo_id, root=root, delta_timestamps=DELTA_TIMESTAMPS, video_backend=video_backend)
        result["video_backend_used"] = getattr(ds, "video_backend", None) or getattr(ds, "_video_backend", None)
        stage = "metadata"
        meta = ds.meta
        info_json = json.loads((root / "meta" / "info.json").read_text())
        result["meta"] = {
            "codebase_version": info_json.get("codebase_version"),
            "num_episodes": int(ds.num_episodes),
            "num_frames": int(ds.num_frames),
            "len": len(ds),
            "fps": int(ds.fps),
            "features": to_jsonable(meta.features),
            "video_keys": list(meta.video_keys),
            "camera_keys": list(meta.camera_keys),
            "image_keys": list(getattr(meta, "image_keys", [])),
            "tasks": describe_tasks(ds),
            "episodes": describe_episodes(ds),
            "stats": to_jsonable(meta.stats) if meta.stats is not None else None,
            "info_json": info_json,
        }
        bounds = episode_bounds_of(ds)
        result["meta"]["episode_bounds"] = bounds
        indices = pick_indices(bounds, len(ds))
        result["indices"] = indices
        items = {}
        for i in indices:
            stage = f"dataset[{i}]"
            item = ds[i]
            rec = {}
            for k, v in item.items():
                if k in meta.camera_keys and isinstance(v, torch.Tensor):
                    arr = v.detach().cpu().float().numpy()
                    u8 = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
                    rec[k] = {
                        "dtype": str(v.dtype).replace("torch.", ""),
                        "shape": list(v.shape),
                        "min": float(arr.min()),
                        "max": float(arr.max()),
                        "mean": float(arr.mean()),
                        "max_abs_quantization_error_x255": float(np.abs(arr * 255.0 - u8).max()),
                        "safetensors_key": f"{i}/{k}",
                    }
                    frames[f"{i}/{k}"] = u8
                elif isinstance(v, torch.Tensor):
                    rec[k] = {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                              "value": to_jsonable(v)}
                else:
                    rec[k] = {"type": type(v).__name__, "value": to_jsonable(v)}
            if compare_to_source:
                ep = int(item["episode_index"])
                fi = int(item["frame_index"])
                errs = {}
                for k in meta.camera_keys:
                    if k in rec and k in (FRONT, WRIST):
                        src = source_frame(k, ep, fi).transpose(2, 0, 1).astype(np.float64)
                        dec = frames[f"{i}/{k}"].astype(np.float64)
                        if src.shape == dec.shape:
                            errs[k] = {"max_abs": float(np.abs(src - dec).max()),
                                       "mean_abs": float(np.abs(src - dec).mean())}
                            # which source frame is the decoded one closest to? (distinguishability check)
                            best = min(
                                ((e, f) for e, n in enumerate(EPISODE_LENGTHS) for f in range(n)),
                                key=lambda ef: np.abs(
                                    source_frame(k, *ef).transpose(2, 0, 1).astype(np.float64) - dec).mean(),
                            )
                            errs[k]["nearest_source_frame"] = {"episode_index": best[0], "frame_index": best[1]}
                rec["_error_vs_source_frame_uint8"] = errs
            items[str(i)] = rec
        result["items"] = items

        stage = "state window load"
        ds2 = LeRobotDataset(repo_id, root=root, delta_timestamps=STATE_DELTA_TIMESTAMPS,
                             video_backend=video_backend)
        sw = {"delta_timestamps": STATE_DELTA_TIMESTAMPS, "items": {}}
        for i in indices:
            stage = f"state window dataset[{i}]"
            it = ds2[i]
            sw["items"][str(i)] = {
                "observation.state": to_jsonable(it["observation.state"]),
                "observation.state_is_pad": to_jsonable(it["observation.state_is_pad"]),
            }
        result["state_window"] = sw
        result["ok"] = True
    except Exception as exc:  # record verbatim
        result["ok"] = False
        result["error"] = {
            "stage": stage,
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    st_path = out_json.with_suffix(".safetensors")
    if frames:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in frames.items()}, str(st_path),
                  metadata={"layout": "uint8 CHW, round(float*255)", "source": "LeRobotDataset.__getitem__"})
        os.chmod(st_path, 0o644)
    elif st_path.exists():
        st_path.unlink()
    return result


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------
def write_dataset(root: Path, front_dtype: str, wrist_dtype: str, use_videos: bool, vcodec: str | None) -> None:
    LeRobotDataset = lerobot_dataset_cls()
    if root.exists():
        shutil.rmtree(root)
    version = codebase_version()
    features = build_features(front_dtype, wrist_dtype)
    kwargs = dict(repo_id=f"local/{root.name}", fps=FPS, features=features, root=root, robot_type="fixture_bot",
                  use_videos=use_videos)
    if version.startswith("v3"):
        if vcodec is not None and use_videos:
            from lerobot.configs.video import RGBEncoderConfig

            kwargs["rgb_encoder"] = RGBEncoderConfig(vcodec=vcodec)
        ds = LeRobotDataset.create(**kwargs, video_backend="pyav")
    else:
        ds = LeRobotDataset.create(**kwargs, video_backend="pyav")
    for ep, (n, task) in enumerate(zip(EPISODE_LENGTHS, EPISODE_TASKS, strict=True)):
        for f in range(n):
            frame = {
                FRONT: source_frame(FRONT, ep, f),
                WRIST: source_frame(WRIST, ep, f),
                "observation.state": source_state(ep, f),
                "action": source_action(ep, f),
            }
            if version.startswith("v3"):
                frame["task"] = task
                ds.add_frame(frame)
            else:
                ds.add_frame(frame, task=task)
        ds.save_episode()
    if hasattr(ds, "finalize"):
        ds.finalize()
    # LeRobot leaves nothing else behind for us to clean, but make sure no temp images remain.
    images_dir = root / "images"
    if images_dir.exists():
        shutil.rmtree(images_dir)
    for path in root.rglob("*"):  # LeRobot writes some files (mp4 via tempfile) as 0600; make them readable
        if path.is_file():
            os.chmod(path, 0o644)


def cmd_build(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    version = codebase_version()
    print(f"LeRobot codebase_version={version}", flush=True)
    if version.startswith("v3"):
        plan = [("v30_video", "video", "video", True), ("v30_images", "image", "image", False)]
    elif version == "v2.1":
        # front camera as video, wrist camera as PNG images embedded in parquet (a mixed dataset)
        plan = [("v21", "video", "image", True)]
    else:
        raise SystemExit(f"unsupported LeRobot codebase version {version}")
    for name, fd, wd, use_videos in plan:
        if args.only and name not in args.only:
            continue
        root = out / name
        print(f"writing {root}", flush=True)
        write_dataset(root, fd, wd, use_videos, args.vcodec)
        print(f"recording reference for {root}", flush=True)
        res = record_reference(root, out / f"{name}_reference.json", video_backend=args.video_backend)
        if not res.get("ok"):
            print(res["error"]["traceback"], file=sys.stderr)
            return 1
    return 0


def cmd_check(args) -> int:
    data = Path(args.data).resolve()
    res = record_reference(data, Path(args.out).resolve(), repo_id=args.repo_id, video_backend=args.video_backend,
                           compare_to_source=not args.no_source_compare)
    print(json.dumps({"ok": res.get("ok"), "error": res.get("error", {}).get("message")}))
    return 0 if (res.get("ok") or not args.strict) else 1


def main(argv=None) -> int:
    # Never touch the Hugging Face Hub (set before LeRobot / huggingface_hub are imported; importing this
    # module for source_frame() etc. has no side effects).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="write fixture datasets + reference values")
    b.add_argument("--out", default=str(Path(__file__).resolve().parent))
    b.add_argument("--only", nargs="*", help="subset of dataset names (v30_video v30_images v21)")
    b.add_argument("--vcodec", default=None, help="override LeRobot's default video codec (v3 only)")
    b.add_argument("--video-backend", default="pyav")
    c = sub.add_parser("check", help="load a dataset written by another tool with LeRobot's loader")
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--repo-id", default=None)
    c.add_argument("--video-backend", default="pyav")
    c.add_argument("--strict", action="store_true", help="exit 1 if LeRobot raised")
    c.add_argument("--no-source-compare", action="store_true",
                   help="do not compare decoded frames with this script's source_frame() content")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "check", "-h", "--help"):
        argv = ["build", *argv]
    args = p.parse_args(argv)
    return cmd_build(args) if args.cmd == "build" else cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
