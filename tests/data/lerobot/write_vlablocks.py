"""Write the fixture content (generate.py's source_frame / source_state / source_action) with
vlablocks' own DatasetWriter, for LeRobot's loader to read back (``generate.py check``).

Run in vlablocks' environment: ``.venv/bin/python tests/data/lerobot/write_vlablocks.py``; then
check each output with LeRobot (README.md, "The reverse check").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from generate import (EPISODE_LENGTHS, EPISODE_TASKS, FPS, FRONT, STATE_NAMES, WRIST, source_action, source_frame,
                      source_state)
from vlablocks.data import DatasetWriter

HERE = Path(__file__).resolve().parent
#: output name -> (format version, cameras as video)
OUTPUTS = {"vlablocks_v30_video": ("v3.0", True), "vlablocks_v21_video": ("v2.1", True)}


def episode(index: int, length: int) -> dict[str, np.ndarray]:
    """One episode's frames as DatasetWriter takes them (intrinsics: a fixed pinhole K per camera)."""
    frames: dict[str, np.ndarray] = {
        "observation.state": np.stack([source_state(index, f) for f in range(length)]),
        "action": np.stack([source_action(index, f) for f in range(length)]),
    }
    for key in (FRONT, WRIST):
        camera = key.removeprefix("observation.images.")
        frames[key] = np.stack([source_frame(key, index, f) for f in range(length)])
        height, width = frames[key].shape[1:3]
        k = np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], dtype=np.float32)
        frames[f"observation.intrinsics.{camera}"] = np.repeat(k[None], length, 0)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    for name, (version, video) in OUTPUTS.items():
        writer = DatasetWriter(args.out / name, fps=FPS, cameras=["front", "wrist"], state_dim=4, action_dim=3,
                               robot_type="fixture_bot", state_names=STATE_NAMES, version=version, video=video,
                               overwrite=True)
        for index, (length, task) in enumerate(zip(EPISODE_LENGTHS, EPISODE_TASKS)):
            writer.add_episode(episode(index, length), task)
        print(writer.finalize())


if __name__ == "__main__":
    main()
