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

:func:`collate` turns a list of samples (one dict each) into such a batch; :func:`check_batch`
checks one against what a policy reads (:class:`BatchSpec`) and raises :class:`BatchError`.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

#: dtypes a float input may have (float64, numpy's default, would meet fp32 weights and fail later).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BatchError(ValueError):
    """A batch does not fit the policy: the message names the key, the expected and the received value."""


@dataclass(frozen=True)
class BatchSpec:
    """What a policy reads from a batch.

    Attributes:
        image_size: ``H = W`` of ``images`` (``None``: the policy has no vision encoder).
        any_image_size: images of any ``H x W`` are accepted (the policy resizes them).
        geometry: the policy reads per-camera geometry (depth + intrinsics, points or rays).
        state_dim: the largest state width (``None``: no state is read).
        horizon, action_dim: ``actions`` are ``[B, horizon, A]`` with ``A <= action_dim``.
        actions: ``actions`` are required (training loss) rather than ignored.
    """

    image_size: int | None
    geometry: bool
    state_dim: int | None
    horizon: int
    action_dim: int
    actions: bool
    any_image_size: bool = False


def _layout(key: str, value: Any, dims: Sequence[int | str | None], layout: str, sizes: dict[str, int],
            floating: bool) -> None:
    """``value`` is a tensor matching ``dims`` (int: exact, str: a size shared across keys, None: any)."""
    if not isinstance(value, torch.Tensor):
        raise BatchError(f"batch[{key!r}]: expected a tensor {layout}; got {type(value).__name__}")
    if value.dim() != len(dims):
        raise BatchError(f"batch[{key!r}]: expected {layout}; got shape {list(value.shape)}")
    for axis, (want, got) in enumerate(zip(dims, value.shape)):
        if isinstance(want, int) and got != want:
            raise BatchError(f"batch[{key!r}]: expected {layout} with size {want} in dim {axis}; got shape {list(value.shape)}")
        if isinstance(want, str):
            if sizes.setdefault(want, got) != got:
                raise BatchError(f"batch[{key!r}]: expected {layout} with {want} = {sizes[want]} (as in the other keys); "
                                 f"got shape {list(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        hint = " (scale uint8 images to [0, 1])" if value.dtype == torch.uint8 else ""
        raise BatchError(f"batch[{key!r}]: expected a float32 / bfloat16 / float16 tensor; got {value.dtype}{hint}")
    if not floating and value.dtype != torch.bool:
        raise BatchError(f"batch[{key!r}]: expected a bool tensor; got {value.dtype}")


def check_batch(batch: Mapping[str, Any], spec: BatchSpec, device: torch.device) -> None:
    """Check the keys a policy reads: presence, type, shape, batch size, dtype, device, finite
    values and images in ``[0, 1]``. Keys the policy does not read are ignored. Per-pixel
    geometry (``depth``, ``points``, rays) may hold NaN / inf / non-positive depth or points
    beyond ``MAX_POINT_COORDINATE``: that marks invalid pixels
    (:func:`vlablocks.encoders.points.points_from_geometry`), not an error.

    The value checks are reduced on the tensors' device and read back once.

    Raises:
        BatchError: naming the key, the expected and the received value.
    """
    if not isinstance(batch, Mapping):
        raise BatchError(f"the batch must be a mapping of batch keys; got {type(batch).__name__}")
    sizes: dict[str, int] = {}
    floats: list[tuple[str, torch.Tensor]] = []

    def read(key: str, dims: Sequence[int | str | None], layout: str, required: bool, floating: bool = True,
             finite: bool = True) -> None:
        value = batch.get(key)
        if value is None:
            if required:
                raise BatchError(f"batch[{key!r}] is missing: this policy reads {layout}")
            return
        _layout(key, value, dims, layout, sizes, floating)
        if value.device != device:
            raise BatchError(f"batch[{key!r}]: expected a tensor on {device} (the policy's device); got {value.device} "
                             "(vlablocks.policy.batch.to_device moves a batch)")
        if floating and finite:
            floats.append((key, value))

    if spec.image_size is not None:
        if spec.any_image_size:
            read(IMAGES, ("B", "N", 3, None, None), "images [B, N, 3, H, W]", required=True)
        else:
            size = spec.image_size
            read(IMAGES, ("B", "N", 3, size, size), f"images [B, N, 3, {size}, {size}]", required=True)
        read(IMAGE_MASK, ("B", "N"), "image_mask [B, N]", required=False, floating=False)
        if spec.geometry:
            read(DEPTH, ("B", "N", None, None), "depth [B, N, H, W]", required=False, finite=False)
            read(INTRINSICS, ("B", "N", 3, 3), "intrinsics [B, N, 3, 3]", required=batch.get(DEPTH) is not None)
            read(CAM_TO_WORLD, ("B", "N", 4, 4), "cam_to_world [B, N, 4, 4]", required=False)
            read(POINTS, ("B", "N", None, None, 3), "points [B, N, H, W, 3]", required=False, finite=False)
            read(RAY_DIRECTIONS, ("B", "N", None, None, 3), "ray_directions [B, N, H, W, 3]", required=False,
                 finite=False)
            read(DEPTH_ALONG_RAY, ("B", "N", None, None), "depth_along_ray [B, N, H, W]",
                 required=batch.get(RAY_DIRECTIONS) is not None, finite=False)
            if all(batch.get(k) is None for k in (DEPTH, POINTS, RAY_DIRECTIONS)):
                raise BatchError("batch['depth'] is missing: this policy has a geometry encoder and reads depth + "
                                 "intrinsics (+ cam_to_world), points, or ray_directions + depth_along_ray")
    if spec.state_dim is not None:
        read(STATE, ("B", None), f"state [B, S] with S <= {spec.state_dim}", required=True)
        if batch[STATE].shape[-1] > spec.state_dim:
            raise BatchError(f"batch['state']: expected at most {spec.state_dim} dims (policy.state_dim); "
                             f"got shape {list(batch[STATE].shape)}")
    if spec.actions:
        read(ACTIONS, ("B", spec.horizon, None), f"actions [B, {spec.horizon}, A] with A <= {spec.action_dim}", required=True)
        if batch[ACTIONS].shape[-1] > spec.action_dim:
            raise BatchError(f"batch['actions']: expected at most {spec.action_dim} dims (policy.action_dim); "
                             f"got shape {list(batch[ACTIONS].shape)}")
        read(ACTION_MASK, ("B", spec.horizon), f"action_mask [B, {spec.horizon}]", required=False, floating=False)

    _check_tasks(batch.get(TASK), sizes)
    _check_values(floats, device)


def _check_tasks(tasks: Any, sizes: dict[str, int]) -> None:
    """``task``: a list of B strings, B as in the other keys and > 0."""
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        got = f"{type(tasks).__name__} {tasks!r}" if not isinstance(tasks, (list, tuple)) else \
            f"a list with {sorted({type(t).__name__ for t in tasks})}"
        raise BatchError(f"batch['task']: expected a list of B instruction strings; got {got[:200]}")
    if sizes.setdefault("B", len(tasks)) != len(tasks):
        raise BatchError(f"batch['task']: expected B = {sizes['B']} strings (as in the other keys); got {len(tasks)}")
    if sizes["B"] == 0:
        raise BatchError("the batch is empty (B = 0)")


def _check_values(floats: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
    """Finite values everywhere, images in [0, 1] and intrinsics with focal lengths > 0: one
    reduction per tensor on ``device``, read back once."""
    if not floats:
        return
    ok = torch.stack([_value_flag(key, value).to(device) for key, value in floats]).tolist()
    for (key, value), fine in zip(floats, ok):
        if fine:
            continue
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise BatchError(f"batch[{key!r}]: expected finite values; got {bad} NaN / inf of {value.numel()}")
        if key == IMAGES:
            raise BatchError(f"batch[{key!r}]: expected values in [0, 1]; got min {value.min().item():.4g}, "
                             f"max {value.max().item():.4g}")
        raise BatchError(f"batch[{key!r}]: expected pinhole K with focal lengths fx, fy > 0; got smallest "
                         f"{_focal_lengths(value).min().item():.4g}")


def _value_flag(key: str, value: torch.Tensor) -> torch.Tensor:
    """A 0-d bool: the values of ``key`` are fine. Images: in [0, 1] (one min / max pass, which NaN
    and inf fail too); intrinsics: finite with fx, fy > 0; anything else: finite."""
    if key == IMAGES:
        low, high = torch.aminmax(value)
        return (low >= 0) & (high <= 1)
    finite = torch.isfinite(value).all()
    if key == INTRINSICS:
        return finite & (_focal_lengths(value) > 0).all()
    return finite


def _focal_lengths(intrinsics: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` K -> ``[..., 2]`` (fx, fy), a view."""
    return torch.diagonal(intrinsics, dim1=-2, dim2=-1)[..., :2]
