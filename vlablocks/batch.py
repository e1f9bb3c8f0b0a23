"""Batch keys of the policy contract (shared by data, training, evaluation and the policy).

| key | shape | notes |
| --- | --- | --- |
| ``images`` | ``[B, N, 3, H, W]`` float in [0, 1] | N cameras |
| ``image_mask`` | ``[B, N]`` bool | optional; False for a missing camera |
| ``depth`` | ``[B, N, H, W]`` | optional geometry: z-depth (with ``intrinsics``) |
| ``intrinsics`` | ``[B, N, 3, 3]`` | pinhole K |
| ``cam_to_world`` | ``[B, N, 4, 4]`` | optional camera pose (OpenCV convention) |
| ``points`` | ``[B, N, H, W, 3]`` | optional geometry: a point map (MapAnything ``pts3d``) |
| ``ray_directions``, ``depth_along_ray`` | ``[B, N, H, W, 3]``, ``[B, N, H, W]`` | optional geometry: MapAnything rays |
| ``task`` | ``list[str]`` of length B | the language instruction |
| ``state`` | ``[B, S]`` | proprioception, raw units |
| ``actions`` | ``[B, H, A]`` | action chunk, raw units (training) |
| ``action_mask`` | ``[B, H]`` bool | optional; False past the episode end |

:func:`collate` turns a list of samples (one dict each) into such a batch.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

IMAGES = "images"
IMAGE_MASK = "image_mask"
DEPTH = "depth"
INTRINSICS = "intrinsics"
CAM_TO_WORLD = "cam_to_world"
POINTS = "points"
RAY_DIRECTIONS = "ray_directions"
DEPTH_ALONG_RAY = "depth_along_ray"
TASK = "task"
STATE = "state"
ACTIONS = "actions"
ACTION_MASK = "action_mask"

#: the per-camera geometry inputs, in the keyword names of ``GeometryEncoder.forward``.
GEOMETRY_KEYS = (DEPTH, INTRINSICS, CAM_TO_WORLD, POINTS, RAY_DIRECTIONS, DEPTH_ALONG_RAY)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples (dicts with the batch keys) -> a batch: tensors / arrays / numbers are stacked,
    strings (and other values) kept as lists, keys that are ``None`` in every sample stay ``None``."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0])
    for i, sample in enumerate(samples):
        if list(sample) != keys:
            raise ValueError(f"sample {i} has keys {sorted(sample)}; sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if all(v is None for v in values):
            batch[key] = None
        elif all(isinstance(v, (torch.Tensor, np.ndarray, bool, int, float)) for v in values):
            tensors = [torch.as_tensor(v) for v in values]
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack batch key {key!r}: samples have shapes {sorted(shapes)}")
            batch[key] = torch.stack(tensors)
        else:
            batch[key] = values
    return batch


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with its tensors moved to ``device`` (other values, e.g. task strings, kept)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
