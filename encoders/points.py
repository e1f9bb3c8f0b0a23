"""Point maps, the pure math of the geometry encoder: depth / rays / points (+ camera pose) ->
a point map ``[B, H, W, 3]`` (:func:`points_from_geometry`) -> one 3D point per vision patch
(:func:`patch_points`).

Pixel convention: pixel ``(u, v)`` (column, row) covers ``[u, u + 1) x [v, v + 1)`` and is
unprojected through its centre ``(u + 0.5, v + 0.5)``. Intrinsics calibrated with OpenCV's
convention (pixel centres at integer coordinates, as LLaVA-3D's unprojection assumes) describe
the same camera with ``cx, cy`` smaller by 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: The accepted geometry input forms, as quoted by the error messages.
GEOMETRY_FORMS = (
    "(depth, intrinsics), points, or (ray_directions, depth_along_ray), "
    "each with an optional cam_to_world"
)

#: A point with a coordinate beyond this (in the geometry's units: 10 km for metric depth) is
#: invalid, like a non-finite one: sensors' "no return" codes (1e30, 65535 m) and degenerate
#: intrinsics would otherwise overflow the encoders' float32 arithmetic.
MAX_POINT_COORDINATE = 1e4


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None], layout: str) -> None:
    """Raise a ValueError unless ``tensor.shape`` matches ``expected`` (``None``: any size)."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        raise ValueError(f"{name} must have shape {layout}, got {shape}")


def float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of ``tensors``, at least float32 (geometry needs the precision)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def transform_points(points: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """Apply a rigid (or affine) camera-to-world pose: ``R @ X + t`` per point.

    Shapes: ``points [B, H, W, 3]``, ``cam_to_world [B, 4, 4]`` -> ``[B, H, W, 3]``.
    """
    check_shape("cam_to_world", cam_to_world, (points.shape[0], 4, 4), "[B, 4, 4]")
    pose = cam_to_world.to(points.dtype)
    rotated = torch.einsum("bij,bhwj->bhwi", pose[:, :3, :3], points)
    return rotated + pose[:, None, None, :3, 3]


def unproject_depth(
    depth: torch.Tensor,
    intrinsics: torch.Tensor,
    cam_to_world: torch.Tensor | None = None,
) -> torch.Tensor:
    """Back-project a z-depth map through a pinhole camera, at pixel centres.

    Pixel ``(u, v)`` (column, row) is taken at its centre ``(u + 0.5, v + 0.5)``; with
    ``K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` the camera-frame point is
    ``Y = (v + 0.5 - cy) * z / fy``, ``X = (u + 0.5 - cx - s * Y / z) * z / fx`` (the usual
    ``(u - cx) * z / fx`` when the skew ``s`` is 0), ``Z = z``. With ``cam_to_world`` the points
    are moved to the world frame (:func:`transform_points`). Invalid depths (0, NaN, inf) give
    meaningless points; mask them with :func:`valid_depth_mask`.

    Shapes: ``depth [B, H, W]``, ``intrinsics [B, 3, 3]``, ``cam_to_world [B, 4, 4]`` ->
    ``[B, H, W, 3]`` in ``depth``'s dtype promoted to at least float32.
    """
    check_shape("depth", depth, (None, None, None), "[B, H, W]")
    batch, height, width = depth.shape
    check_shape("intrinsics", intrinsics, (batch, 3, 3), "[B, 3, 3]")
    dtype = float_dtype(depth, intrinsics)
    z = depth.to(dtype)
    k = intrinsics.to(dtype)[:, :, :, None, None].unbind(1)  # rows of K, each [B, 3, 1, 1]
    fx, skew, cx = k[0].unbind(1)
    fy, cy = k[1][:, 1], k[1][:, 2]
    v = torch.arange(height, dtype=dtype, device=depth.device)[:, None] + 0.5
    u = torch.arange(width, dtype=dtype, device=depth.device) + 0.5
    y_over_z = (v - cy) / fy
    x_over_z = (u - cx - skew * y_over_z) / fx
    points = torch.stack([x_over_z * z, y_over_z * z, z], dim=-1)
    return points if cam_to_world is None else transform_points(points, cam_to_world)


def points_from_rays(
    ray_directions: torch.Tensor,
    depth_along_ray: torch.Tensor,
    cam_to_world: torch.Tensor | None = None,
) -> torch.Tensor:
    """MapAnything's factorisation: ``point = ray_direction * depth_along_ray`` (+ pose).

    ``ray_directions`` are unit vectors in the camera frame (not re-normalised here), so
    ``depth_along_ray`` is the Euclidean distance from the camera centre; the matching z-depth
    is ``depth_along_ray * ray_z``.

    Shapes: ``ray_directions [B, H, W, 3]``, ``depth_along_ray [B, H, W]``,
    ``cam_to_world [B, 4, 4]`` -> ``[B, H, W, 3]``.
    """
    check_shape("ray_directions", ray_directions, (None, None, None, 3), "[B, H, W, 3]")
    check_shape("depth_along_ray", depth_along_ray, ray_directions.shape[:3], "[B, H, W] (the rays' B, H, W)")
    dtype = float_dtype(ray_directions, depth_along_ray)
    points = ray_directions.to(dtype) * depth_along_ray.to(dtype)[..., None]
    return points if cam_to_world is None else transform_points(points, cam_to_world)


def valid_depth_mask(depth: torch.Tensor) -> torch.Tensor:
    """``depth > 0`` and finite. Shapes: ``[B, H, W]`` -> bool ``[B, H, W]``."""
    return torch.isfinite(depth) & (depth > 0)


def points_from_geometry(
    *,
    depth: torch.Tensor | None = None,
    intrinsics: torch.Tensor | None = None,
    cam_to_world: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    ray_directions: torch.Tensor | None = None,
    depth_along_ray: torch.Tensor | None = None,
    pixel_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve exactly one geometry input form to a point map and its validity.

    Forms (see :data:`GEOMETRY_FORMS`): ``(depth, intrinsics)`` (valid where the depth is
    positive and finite), ``points`` (valid where finite; camera-frame points if
    ``cam_to_world`` is given, otherwise used as they are, e.g. MapAnything's world ``pts3d``)
    or ``(ray_directions, depth_along_ray)`` (valid where the depth is positive and everything
    finite). In every form a point with a coordinate beyond :data:`MAX_POINT_COORDINATE` is
    invalid. ``pixel_valid`` (e.g. MapAnything's ``mask``) is AND-ed with the default validity.

    Shapes: ``[B, H, W]`` depths and masks, ``[B, H, W, 3]`` points and rays, ``[B, 3, 3]`` K,
    ``[B, 4, 4]`` pose -> ``(points [B, H, W, 3], valid [B, H, W] bool)``.
    """
    forms = {
        "(depth, intrinsics)": {"depth": depth, "intrinsics": intrinsics},
        "points": {"points": points},
        "(ray_directions, depth_along_ray)": {
            "ray_directions": ray_directions,
            "depth_along_ray": depth_along_ray,
        },
    }
    complete = [form for form, parts in forms.items() if all(p is not None for p in parts.values())]
    for form, parts in forms.items():
        given = [name for name, p in parts.items() if p is not None]
        if given and len(given) < len(parts):
            raise ValueError(
                f"incomplete geometry input {form}: got only {', '.join(given)}; "
                f"expected exactly one of {GEOMETRY_FORMS}"
            )
    if len(complete) != 1:
        got = " and ".join(complete) if complete else "none"
        raise ValueError(f"expected exactly one geometry input form, {GEOMETRY_FORMS}; got {got}")

    if depth is not None and intrinsics is not None:
        xyz = unproject_depth(depth, intrinsics, cam_to_world)
        valid = valid_depth_mask(depth)
    elif ray_directions is not None and depth_along_ray is not None:
        xyz = points_from_rays(ray_directions, depth_along_ray, cam_to_world)
        valid = valid_depth_mask(depth_along_ray) & torch.isfinite(ray_directions).all(-1)
    else:
        assert points is not None  # the only complete form left
        check_shape("points", points, (None, None, None, 3), "[B, H, W, 3]")
        xyz = points if cam_to_world is None else transform_points(points.to(float_dtype(points)), cam_to_world)
        valid = torch.isfinite(points).all(-1)
    valid = valid & (xyz.abs() <= MAX_POINT_COORDINATE).all(-1)  # False for NaN and inf too
    if pixel_valid is not None:
        check_shape("pixel_valid", pixel_valid, valid.shape, "[B, H, W] (the geometry's B, H, W)")
        valid = valid & pixel_valid.bool()
    return xyz, valid


def _nearest_patch_points(
    points: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    (gh, gw), (height, width) = grid, points.shape[1:3]
    ph, pw = height // gh, width // gw
    rows = torch.arange(gh, device=points.device) * ph + ph // 2
    cols = torch.arange(gw, device=points.device) * pw + pw // 2
    return points[:, rows][:, :, cols], valid[:, rows][:, :, cols]


def _mean_patch_points(
    points: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    (gh, gw), (batch, height, width) = grid, points.shape[:3]
    blocks = points.reshape(batch, gh, height // gh, gw, width // gw, 3)
    count = valid.reshape(batch, gh, height // gh, gw, width // gw).sum(dim=(2, 4))
    mean = blocks.sum(dim=(2, 4)) / count.clamp(min=1)[..., None].to(points.dtype)
    return mean, count > 0


_PATCH_MODES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "nearest": _nearest_patch_points,
    "mean": _mean_patch_points,
}


def check_patch_mode(mode: str) -> None:
    if mode not in _PATCH_MODES:
        raise ValueError(f"patch mode must be one of {sorted(_PATCH_MODES)}, got {mode!r}")


def patch_points(
    points: torch.Tensor,
    valid: torch.Tensor,
    grid: tuple[int, int],
    mode: str = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One 3D point per patch of a ``gh x gw`` grid, in row-major order (a ViT's token order).

    A patch is ``ph x pw = H // gh x W // gw`` pixels; the last ``H % gh`` rows and ``W % gw``
    columns are dropped, as a strided patch embedding never reads them (SigLIP's 14-pixel
    patches cover 378 of 384 pixels).

    - ``"nearest"`` (LLaVA-3D's nearest downsampling): the pixel nearest the patch centre, row
      ``i * ph + ph // 2`` and column ``j * pw + pw // 2`` (for an even patch size the centre
      falls between two pixels and the lower/right one is taken), i.e.
      ``F.interpolate(mode="nearest-exact")``. The patch is valid iff that pixel is.
    - ``"mean"`` (SpatialVLA-like): the mean of the patch's valid pixels; valid iff it has one.

    Invalid patches get the point ``(0, 0, 0)`` (never NaN, so encodings of them stay finite).

    Shapes: ``points [B, H, W, 3]``, ``valid [B, H, W]`` bool ->
    ``(patch_xyz [B, gh * gw, 3], patch_valid [B, gh * gw] bool)``.
    """
    check_patch_mode(mode)
    check_shape("points", points, (None, None, None, 3), "[B, H, W, 3]")
    check_shape("valid", valid, points.shape[:3], "[B, H, W] (the points' B, H, W)")
    batch, height, width = points.shape[:3]
    gh, gw = grid
    if not (0 < gh <= height and 0 < gw <= width):
        raise ValueError(
            f"the geometry needs at least one pixel per patch: H, W >= grid (gh, gw) > 0; got H, W = "
            f"({height}, {width}) and grid = {tuple(grid)}"
        )
    height, width = gh * (height // gh), gw * (width // gw)
    points, valid = points[:, :height, :width], valid[:, :height, :width].bool()
    points = torch.where(valid[..., None], points, torch.zeros((), dtype=points.dtype, device=points.device))
    xyz, patch_valid = _PATCH_MODES[mode](points, valid, (gh, gw))
    return xyz.reshape(batch, gh * gw, 3), patch_valid.reshape(batch, gh * gw)
