"""Requests -> policy batches: the observation map and the conversion of one observation.

A request is one unbatched observation, as openpi's clients send it: a map from request keys to
arrays and strings. The observation map names which request key feeds which batch key
(:mod:`vlablocks.policy.batch`)::

    images: [observation/image, observation/wrist_image]   # cameras, in the policy's order
    state: observation/state                              # [S] raw units (null: not sent)
    prompt: prompt                                        # the instruction (str)
    noise: noise                                          # optional [H, A_model] start noise
    previous: previous_actions                            # real-time chunking: the queued actions [P, A]
    delay: inference_delay                                #   and the delay d (control steps) they cover
    depth: observation/depth                              # geometry policies: [N, H, W] metres,
    intrinsics: observation/intrinsics                    #   [N, 3, 3] pinhole K,
    cam_to_world: observation/cam_to_world                #   optional [N, 4, 4] poses (cameras stacked)

The default follows openpi's LIBERO example (``observation/image``, ``observation/wrist_image``,
``observation/state``, ``prompt``), cut to the policy's camera count; a YAML file with any of
these keys overrides it (:func:`load_observation_map`).

Images arrive as ``uint8 [H, W, 3]`` (0..255) or ``float [3, H, W]`` in [0, 1]; they become
``images [1, N, 3, size, size]`` float32 in [0, 1], another ``H x W`` resized keeping the aspect
ratio and padded (the policy's own ``policy.resize_images`` mode when it has one, else
:class:`vlablocks.data.resize.PadResize`, as the dataset reader does, with the depth and the
intrinsics following the same map).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vlablocks.data.resize import PadResize
from vlablocks.policy import batch as keys
from vlablocks.policy.batch import BatchError
from vlablocks.policy.images import resize_with_pad
from vlablocks.policy.vla import VLA

#: openpi's LIBERO example keys, first camera first; more cameras are ``observation/image_<i>``.
DEFAULT_CAMERA_KEYS = ("observation/image", "observation/wrist_image")


#: the observation map's fields that name one request key each.
SINGLE_KEYS = ("state", "prompt", "noise", "depth", "intrinsics", "cam_to_world", "previous", "delay")
#: geometry inputs a request may carry for a policy with a geometry encoder: (field, dims per camera).
GEOMETRY = (("depth", 2), ("intrinsics", 2), ("cam_to_world", 2))
GEOMETRY_FIELDS = tuple(name for name, _ in GEOMETRY)


class RequestError(BatchError):
    """A request does not fit the observation map or the policy (the message names the request key)."""


@dataclass(frozen=True)
class ObservationMap:
    """Request key of each batch input. ``state`` / ``noise`` may be ``None`` (never read)."""

    images: tuple[str, ...] = DEFAULT_CAMERA_KEYS[:1]
    state: str | None = "observation/state"
    prompt: str = "prompt"
    noise: str | None = "noise"
    previous: str | None = "previous_actions"
    delay: str | None = "inference_delay"
    depth: str | None = "observation/depth"
    intrinsics: str | None = "observation/intrinsics"
    cam_to_world: str | None = "observation/cam_to_world"

    def __post_init__(self) -> None:
        names = [*self.images, *(getattr(self, name) for name in SINGLE_KEYS)]
        used = [n for n in names if n is not None]
        if not all(isinstance(n, str) and n for n in used):
            raise ValueError(f"observation map: request keys must be non-empty strings; got {used}")
        if len(set(used)) != len(used):
            raise ValueError(f"observation map: a request key is used twice: {used}")

    def as_dict(self) -> dict[str, Any]:
        """The map as metadata / YAML: ``{"images": [...], "state": ..., "prompt": ..., "noise": ...}``."""
        out = {k: v for k, v in asdict(self).items() if v is not None or k not in GEOMETRY_FIELDS}
        out["images"] = list(self.images)
        return out

    def without_geometry(self) -> ObservationMap:
        """The map for a policy that reads no geometry (its depth / intrinsics / pose keys unset)."""
        return replace(self, **dict.fromkeys(GEOMETRY_FIELDS))


def default_observation_map(num_cameras: int = 1) -> ObservationMap:
    """openpi's LIBERO keys for ``num_cameras`` cameras (``observation/image``,
    ``observation/wrist_image``, then ``observation/image_2``, ...)."""
    if num_cameras < 1:
        raise ValueError(f"num_cameras must be >= 1; got {num_cameras}")
    extra = [f"observation/image_{i}" for i in range(len(DEFAULT_CAMERA_KEYS), num_cameras)]
    return ObservationMap(images=(*DEFAULT_CAMERA_KEYS, *extra)[:num_cameras])


def load_observation_map(path: str | Path, base: ObservationMap | None = None) -> ObservationMap:
    """``base`` (default :func:`default_observation_map`) with the keys a YAML file sets
    (``images``, ``state``, ``prompt``, ``noise``). ValueError naming the file for anything else."""
    base = base or default_observation_map()
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    fields = ("images", *SINGLE_KEYS)
    if not isinstance(data, dict) or set(data) - set(fields):
        unknown = sorted(set(data) - set(fields)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: an observation map has the keys {list(fields)}; got {unknown}")
    images = data.get("images", list(base.images))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images:
        raise ValueError(f"{path}: images must be a non-empty list of request keys; got {images!r}")
    values = {name: data.get(name, getattr(base, name)) for name in SINGLE_KEYS}
    if values["prompt"] is None:
        raise ValueError(f"{path}: prompt must name a request key (the policy reads an instruction)")
    try:
        return ObservationMap(images=tuple(images), **values)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _array(request: Mapping[str, Any], key: str, what: str) -> np.ndarray:
    if key not in request:
        raise RequestError(f"request[{key!r}] is missing: the observation map reads {what} from it "
                           f"(request keys: {sorted(map(str, request))[:12]})")
    value = request[key]
    if isinstance(value, (list, tuple, int, float)):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "uifb":
        got = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
        raise RequestError(f"request[{key!r}]: expected a numeric array ({what}); got {got}")
    return value


def image_tensor(value: np.ndarray, key: str) -> torch.Tensor:
    """``uint8 [H, W, 3]`` or ``float [3, H, W]`` in [0, 1] -> ``float32 [3, H, W]`` in [0, 1]."""
    if value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] == 3:
        return torch.tensor(value).permute(2, 0, 1).float().div_(255.0)
    if value.dtype.kind == "f" and value.ndim == 3 and value.shape[0] == 3:
        return torch.tensor(value, dtype=torch.float32)
    raise RequestError(f"request[{key!r}]: expected an image uint8 [H, W, 3] or float [3, H, W] in [0, 1]; "
                       f"got {value.dtype} {list(value.shape)}")


def _geometry(request: Mapping[str, Any], obs_map: ObservationMap, images: Sequence[torch.Tensor],
              vla: VLA) -> dict[str, torch.Tensor]:
    """Images, depth, intrinsics (and poses) of a geometry policy's request, every camera fitted to
    the policy's size by one :class:`~vlablocks.data.resize.PadResize` map (the dataset reader's)."""
    out: dict[str, torch.Tensor] = {}
    for name, dims in GEOMETRY:
        key = getattr(obs_map, name)
        if key is None or (name == "cam_to_world" and key not in request):
            continue
        value = torch.tensor(_array(request, key, f"{name} [N, ...] (one per camera)"), dtype=torch.float32)
        if value.dim() != dims + 1 or value.shape[0] != len(images):
            raise RequestError(f"request[{key!r}]: expected {name} of the {len(images)} camera(s) stacked, "
                               f"{dims + 1} dims; got shape {list(value.shape)}")
        out[name] = value
    if "depth" not in out or "intrinsics" not in out:
        raise RequestError("this policy has a geometry encoder: it reads depth and intrinsics, but the observation map "
                           f"names no request key for {'depth' if 'depth' not in out else 'intrinsics'}")
    fitted: dict[str, list[torch.Tensor]] = {keys.IMAGES: [], keys.DEPTH: [], keys.INTRINSICS: []}
    for i, image in enumerate(images):
        resize = PadResize(*image.shape[-2:], vla.vision.image_size)
        fitted[keys.IMAGES].append(resize.images(image))
        fitted[keys.DEPTH].append(resize.depth(out["depth"][i]))
        fitted[keys.INTRINSICS].append(resize.intrinsics(out["intrinsics"][i]))
    batch = {name: torch.stack(values)[None] for name, values in fitted.items()}
    if "cam_to_world" in out:
        batch[keys.CAM_TO_WORLD] = out["cam_to_world"][None]
    return batch


def fit_images(images: Sequence[torch.Tensor], vla: VLA) -> torch.Tensor:
    """``N`` images ``[3, H_i, W_i]`` -> ``[N, 3, size, size]`` at the policy's image size."""
    size, mode = vla.vision.image_size, vla.config.resize_images
    out = []
    for image in images:
        height, width = image.shape[-2:]
        if height == width == size:
            out.append(image)
        elif mode != "none":  # what the policy would do itself (needed when cameras differ in size)
            out.append(resize_with_pad(image[None], size, mode.removeprefix("pad_"))[0])
        else:
            out.append(PadResize(height, width, size).images(image))
    return torch.stack(out)


def rtc_inputs(request: Mapping[str, Any], obs_map: ObservationMap, vla: VLA) -> tuple[torch.Tensor, int] | None:
    """``(previous [1, P, A] raw actions, delay d)`` of a real-time-chunking request, or ``None``
    when the request carries no previous chunk (a plain chunk is sampled)."""
    if obs_map.previous is None or request.get(obs_map.previous) is None:
        return None
    previous = _array(request, obs_map.previous, "the queued actions [P, A]")
    width, horizon = vla.normalizer["action"].width, vla.config.horizon
    if previous.ndim != 2 or previous.shape[1] != width or not 1 <= previous.shape[0] <= horizon:
        raise RequestError(f"request[{obs_map.previous!r}]: expected the queued actions [P, {width}] with 1 <= P <= "
                           f"{horizon}; got shape {list(previous.shape)}")
    delay = request.get(obs_map.delay, 0) if obs_map.delay is not None else 0
    if isinstance(delay, np.generic):
        delay = delay.item()
    if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= previous.shape[0]:
        raise RequestError(f"request[{obs_map.delay!r}]: expected an int delay in [0, {previous.shape[0]}] (at most the "
                           f"queued actions); got {delay!r}")
    return torch.tensor(previous, dtype=torch.float32)[None], delay


def to_batch(request: Any, obs_map: ObservationMap, vla: VLA) -> tuple[dict[str, Any], torch.Tensor | None]:
    """One request -> ``(batch of 1 on the CPU, noise [1, H, A_model] or None)``.

    Raises:
        RequestError: a key is missing or a value has the wrong type / layout (the policy's own
            :meth:`~vlablocks.policy.vla.VLA.check_batch` checks the rest).
    """
    if not isinstance(request, Mapping):
        raise RequestError(f"a request must be a map of observation keys; got {type(request).__name__}")
    prompt = request.get(obs_map.prompt)
    if not isinstance(prompt, str):
        got = "nothing" if prompt is None else type(prompt).__name__
        raise RequestError(f"request[{obs_map.prompt!r}]: expected the instruction string; got {got}")
    batch: dict[str, Any] = {keys.TASK: [prompt]}
    if vla.vision is not None:
        images = [image_tensor(_array(request, key, f"camera {i}"), key) for i, key in enumerate(obs_map.images)]
        if vla.geometry is not None:
            batch.update(_geometry(request, obs_map, images, vla))
        else:
            batch[keys.IMAGES] = fit_images(images, vla)[None]
    if vla.config.state_dim is not None and obs_map.state is not None:
        state = _array(request, obs_map.state, "the state [S]")
        if state.ndim != 1:
            raise RequestError(f"request[{obs_map.state!r}]: expected the state [S]; got shape {list(state.shape)}")
        batch[keys.STATE] = torch.tensor(state, dtype=torch.float32)[None]
    noise = None
    if obs_map.noise is not None and request.get(obs_map.noise) is not None:
        value = _array(request, obs_map.noise, "the start noise [H, A]")
        shape = [vla.config.horizon, vla.config.action_dim]
        if list(value.shape) != shape:
            raise RequestError(f"request[{obs_map.noise!r}]: expected start noise {shape} ([H, A] of the model, "
                               f"normalised action space); got shape {list(value.shape)}")
        noise = torch.tensor(value, dtype=torch.float32)[None]
    return batch, noise
