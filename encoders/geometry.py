"""Geometry: depth / point maps -> one 3D point per vision patch -> encoded and fused with vision.

The geometry role of LLaVA-3D and of MapAnything-style inputs. Three input forms give a point
map ``[B, H, W, 3]`` (:func:`~vlablocks.encoders.points.points_from_geometry`, in :mod:`vlablocks.encoders.points`):

    (depth, intrinsics)                 z-depth + pinhole K        -> :func:`unproject_depth`
    (ray_directions, depth_along_ray)   MapAnything's rays + depth -> :func:`points_from_rays`
    points                              a ready point map (MapAnything's pts3d), taken as-is

each with an optional camera-to-world pose (OpenCV camera: x right, y down, z forward) that
moves the camera-frame points to the world. :func:`patch_points` reduces the point map to the
ViT patch grid (row-major, like the patch tokens), an encoding turns each patch point into a
vector (:class:`LLaVA3DPositionEncoding`, :class:`FrequencyPositionEncoding`), and
:class:`GeometryEncoder` adds it to (LLaVA-3D, SpatialVLA) or concatenates it with the vision
tokens, optionally mean-pooling the fused tokens per voxel (:func:`voxel_mean_pool`).

Pixel convention: pixel ``(u, v)`` (column, row) covers ``[u, u + 1) x [v, v + 1)`` and is
unprojected through its centre ``(u + 0.5, v + 0.5)``. Intrinsics calibrated with OpenCV's
convention (pixel centres at integer coordinates, as LLaVA-3D's unprojection assumes) describe
the same camera with ``cx, cy`` smaller by 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from vlablocks.blocks.mlp import Mlp
from vlablocks.encoders.points import check_patch_mode, check_shape, float_dtype, patch_points, points_from_geometry

def nerf_encoding(xyz: torch.Tensor, num_frequencies: int = 8) -> torch.Tensor:
    """NeRF frequency encoding with the input kept (SpatialVLA's Ego3D layout).

    For each coordinate ``c`` of the last axis, in order, the block
    ``[c, sin(2^0 c), ..., sin(2^(F-1) c), cos(2^0 c), ..., cos(2^(F-1) c)]``: the output is
    ``[x-block, y-block, z-block]``, i.e. ``out[..., i * (1 + 2F) + j]`` belongs to coordinate
    ``i``. Computed in at least float32.

    Shapes: ``xyz [..., C]`` -> ``[..., C * (1 + 2F)]`` (``3 + 6F`` for points).
    """
    if num_frequencies < 0:
        raise ValueError(f"num_frequencies must be >= 0, got {num_frequencies}")
    x = xyz.to(float_dtype(xyz))
    frequencies = 2.0 ** torch.arange(num_frequencies, dtype=x.dtype, device=x.device)
    angles = x[..., None] * frequencies  # [..., C, F]
    encoding = torch.cat([x[..., None], angles.sin(), angles.cos()], dim=-1)  # [..., C, 1 + 2F]
    return encoding.flatten(-2)


class LLaVA3DPositionEncoding(nn.Module):
    """LLaVA-3D's learned 3D position embedding: ``fc2(act(norm(fc1(xyz))))``.

    ``Linear(3, hidden) -> LayerNorm -> ReLU -> Linear(hidden, dim)`` (1024 -> 1024 in
    LLaVA-3D, added to the CLIP patch features). Linear weights are xavier-uniform as in the
    original.

    Args:
        dim: output width (the vision width it is added to).
        hidden_dim: hidden width (``None``: ``dim``).

    Shapes: ``xyz [..., 3]`` -> ``[..., dim]`` in the weights' dtype.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or dim
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.fc1 = nn.Linear(3, hidden_dim, **factory)
        self.norm = nn.LayerNorm(hidden_dim, **factory)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, dim, **factory)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(xyz.to(self.fc1.weight.dtype)))))


class FrequencyPositionEncoding(nn.Module):
    """SpatialVLA's Ego3D encoding: ``mlp(nerf_encoding((xyz - center) / scale))``.

    The MLP is the toolkit's :class:`~vlablocks.blocks.mlp.Mlp` ``(3 + 6F -> dim -> dim, GELU)``.
    The default ``center`` / ``scale`` map a camera-frame workspace ``x, y in [-2, 2]``,
    ``z in [0, 4]`` m to ``[-1, 1]``.

    Args:
        dim: output width.
        num_frequencies: ``F``, frequencies ``2^0 .. 2^(F-1)``.
        center: subtracted from each point (metres).
        scale: the centred points are divided by it (> 0).

    Shapes: ``xyz [..., 3]`` -> ``[..., dim]`` in the MLP's dtype.
    """

    def __init__(
        self,
        dim: int,
        num_frequencies: int = 8,
        center: Sequence[float] = (0.0, 0.0, 2.0),
        scale: float = 2.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(center) != 3:
            raise ValueError(f"center must have 3 coordinates (x, y, z), got {center}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if num_frequencies < 0:
            raise ValueError(f"num_frequencies must be >= 0, got {num_frequencies}")
        self.dim = dim
        self.num_frequencies = num_frequencies
        self.center = tuple(float(c) for c in center)
        self.scale = float(scale)
        self.mlp = Mlp(3 + 6 * num_frequencies, dim, dim, nn.GELU, device=device, dtype=dtype)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        xyz = xyz.to(float_dtype(xyz))
        centred = (xyz - torch.tensor(self.center, dtype=xyz.dtype, device=xyz.device)) / self.scale
        return self.mlp(nerf_encoding(centred, self.num_frequencies).to(self.mlp.fc1.weight.dtype))

    def extra_repr(self) -> str:
        return f"num_frequencies={self.num_frequencies}, center={self.center}, scale={self.scale}"


def voxel_mean_pool(
    tokens: torch.Tensor,
    points: torch.Tensor,
    valid: torch.Tensor,
    voxel_size: float,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average the tokens (and their points) that fall in the same voxel, per sample.

    A valid token with point ``p`` lies in voxel ``floor(p / voxel_size)``; invalid tokens are
    ignored (their points may be anything, valid points must be finite). Each sample's voxels
    come out in order of first appearance, i.e. of the lowest token index that falls in them
    (so with voxels smaller than the point spacing the output is the valid tokens, in order).
    ``M = max_tokens`` keeps each sample's first ``max_tokens`` voxels in that order (LLaVA-3D
    caps at 2560); without a cap ``M`` is the largest voxel count in the batch (a host sync).
    Slots past a sample's voxel count are zeros with ``pooled_valid`` False. Gradients flow to
    ``tokens`` and ``points``.

    Shapes: ``tokens [B, N, D]``, ``points [B, N, 3]``, ``valid [B, N]`` bool ->
    ``(pooled [B, M, D], pooled_points [B, M, 3], pooled_valid [B, M] bool)``.
    """
    check_shape("tokens", tokens, (None, None, None), "[B, N, D]")
    batch, length, width = tokens.shape
    check_shape("points", points, (batch, length, 3), "[B, N, 3] (the tokens' B, N)")
    check_shape("valid", valid, (batch, length), "[B, N] (the tokens' B, N)")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens}")

    sample, index = valid.bool().nonzero(as_tuple=True)  # sorted by (sample, token index)
    kept_tokens, kept_points = tokens[sample, index], points[sample, index]
    cells = torch.floor(kept_points.detach() / voxel_size).long()
    keys = torch.cat([sample[:, None], cells], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # lexicographic voxel ids
    num_voxels = unique.shape[0]

    # Relabel voxels by first appearance: entries are in (sample, token) order already.
    first = torch.full((num_voxels,), sample.numel(), dtype=torch.long, device=tokens.device)
    first = first.scatter_reduce(0, inverse, torch.arange(sample.numel(), device=tokens.device), reduce="amin")
    order = first.argsort()
    relabel = torch.empty_like(order)
    relabel[order] = torch.arange(num_voxels, device=tokens.device)
    voxel = relabel[inverse]
    voxel_sample = unique[order, 0]

    count = torch.bincount(voxel, minlength=num_voxels)[:, None]
    pooled = tokens.new_zeros(num_voxels, width).index_add(0, voxel, kept_tokens) / count.to(tokens.dtype)
    pooled_points = points.new_zeros(num_voxels, 3).index_add(0, voxel, kept_points) / count.to(points.dtype)

    per_sample = torch.bincount(voxel_sample, minlength=batch)
    slot = torch.arange(num_voxels, device=tokens.device) - (per_sample.cumsum(0) - per_sample)[voxel_sample]
    size = max_tokens if max_tokens is not None else int(per_sample.max()) if batch > 0 else 0
    keep = slot < size
    target = (voxel_sample[keep], slot[keep])
    out = tokens.new_zeros(batch, size, width).index_put(target, pooled[keep])
    out_points = points.new_zeros(batch, size, 3).index_put(target, pooled_points[keep])
    out_valid = torch.zeros(batch, size, dtype=torch.bool, device=tokens.device).index_put(
        target, torch.ones((), dtype=torch.bool, device=tokens.device)
    )
    return out, out_points, out_valid


def _add_geometry(
    vision: torch.Tensor, encoded: torch.Tensor, patch_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = vision + torch.where(patch_valid[..., None], encoded, torch.zeros_like(encoded))
    return tokens, torch.ones_like(patch_valid)


def _concat_geometry(
    vision: torch.Tensor, encoded: torch.Tensor, patch_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    geometry = torch.where(patch_valid[..., None], encoded, torch.zeros_like(encoded))
    return torch.cat([vision, geometry], dim=1), torch.cat([torch.ones_like(patch_valid), patch_valid], dim=1)


_FUSIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "add": _add_geometry,
    "concat": _concat_geometry,
}


class GeometryEncoder(nn.Module):
    """Fuses per-patch 3D geometry with vision tokens (LLaVA-3D / SpatialVLA / MapAnything inputs).

    ::

        geometry (one form) -> points [B, H, W, 3] -> patch_points -> xyz [B, N, 3] -> encoding
        vision tokens [B, N, D] ----------------------------------------------------------> fuse
                                                        -> voxel_mean_pool (optional) -> tokens

    Fusion:

    - ``"add"``: ``vision + encoding(xyz)`` where the patch has valid geometry, ``vision`` alone
      elsewhere; every output token is valid (the vision token is real either way).
    - ``"concat"``: ``[vision ; encoding(xyz)]`` along the sequence (``N' = 2N``); a geometry
      token is valid iff its patch is (invalid ones are zeros).

    With ``voxel_size`` (``"add"`` only), the fused tokens are mean-pooled per voxel of their
    patch points (:func:`voxel_mean_pool`); patches without valid geometry have no voxel and are
    dropped.

    Args:
        encoding: maps ``[B, N, 3]`` points to ``[B, N, vision_dim]`` (e.g.
            :class:`LLaVA3DPositionEncoding`, :class:`FrequencyPositionEncoding`); its width is
            checked here when it has a ``dim`` attribute, else at the first forward.
        vision_dim: width ``D`` of the vision tokens (and of the output).
        fusion: ``"add"`` or ``"concat"``.
        patch_mode: ``"nearest"`` or ``"mean"`` (see :func:`patch_points`).
        voxel_size: voxel edge in the points' unit (LLaVA-3D: 0.2 m); ``None``: no pooling.
        max_tokens: cap on pooled tokens (LLaVA-3D: 2560); needs ``voxel_size``.
    """

    def __init__(
        self,
        encoding: nn.Module,
        vision_dim: int,
        fusion: str = "add",
        patch_mode: str = "nearest",
        voxel_size: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if fusion not in _FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(_FUSIONS)}, got {fusion!r}")
        check_patch_mode(patch_mode)
        if voxel_size is not None and fusion != "add":
            raise ValueError(f"voxel pooling (voxel_size={voxel_size}) needs fusion='add', got fusion={fusion!r}")
        if voxel_size is not None and not voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0 or None, got {voxel_size}")
        if max_tokens is not None and (voxel_size is None or max_tokens <= 0):
            raise ValueError(
                f"max_tokens must be a positive integer and needs voxel_size; got max_tokens={max_tokens}, "
                f"voxel_size={voxel_size}"
            )
        encoding_dim = getattr(encoding, "dim", vision_dim)
        if encoding_dim != vision_dim:
            raise ValueError(f"the encoding's output width must equal vision_dim={vision_dim}, got {encoding_dim}")
        self.encoding = encoding
        self.vision_dim = vision_dim
        self.fusion = fusion
        self.patch_mode = patch_mode
        self.voxel_size = voxel_size
        self.max_tokens = max_tokens

    @property
    def out_dim(self) -> int:
        """Width of the output tokens (``vision_dim``)."""
        return self.vision_dim

    def forward(
        self,
        vision_tokens: torch.Tensor,
        grid: tuple[int, int],
        *,
        depth: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        cam_to_world: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        ray_directions: torch.Tensor | None = None,
        depth_along_ray: torch.Tensor | None = None,
        pixel_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vision_tokens [B, gh * gw, D]`` (row-major patches) + one geometry form (see
        :func:`points_from_geometry`) -> ``(tokens [B, N', D], valid [B, N'] bool)``."""
        gh, gw = grid
        layout = f"[B, gh * gw, vision_dim] = [B, {gh * gw}, {self.vision_dim}]"
        check_shape("vision_tokens", vision_tokens, (None, gh * gw, self.vision_dim), layout)
        xyz, pixel_ok = points_from_geometry(
            depth=depth, intrinsics=intrinsics, cam_to_world=cam_to_world, points=points,
            ray_directions=ray_directions, depth_along_ray=depth_along_ray, pixel_valid=pixel_valid,
        )
        if xyz.shape[0] != vision_tokens.shape[0]:
            raise ValueError(
                f"the geometry's batch size must match vision_tokens' ({vision_tokens.shape[0]}), got {xyz.shape[0]}"
            )
        patch_xyz, patch_valid = patch_points(xyz, pixel_ok, (gh, gw), self.patch_mode)
        encoded = self.encoding(patch_xyz)
        if encoded.shape != vision_tokens.shape:
            raise ValueError(
                f"the encoding must map [B, N, 3] to {tuple(vision_tokens.shape)}, got {tuple(encoded.shape)}"
            )
        tokens, valid = _FUSIONS[self.fusion](vision_tokens, encoded.to(vision_tokens.dtype), patch_valid)
        if self.voxel_size is not None:
            tokens, _, valid = voxel_mean_pool(tokens, patch_xyz, patch_valid, self.voxel_size, self.max_tokens)
        return tokens, valid

    def extra_repr(self) -> str:
        return (
            f"vision_dim={self.vision_dim}, fusion={self.fusion!r}, patch_mode={self.patch_mode!r}, "
            f"voxel_size={self.voxel_size}, max_tokens={self.max_tokens}"
        )
