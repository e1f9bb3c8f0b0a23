"""Tests for vlablocks.encoders.geometry: unprojection, patch points, encodings, voxel pooling, fusion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlablocks.encoders.geometry import (
    FrequencyPositionEncoding,
    GeometryEncoder,
    LLaVA3DPositionEncoding,
    nerf_encoding,
    voxel_mean_pool,
)
from vlablocks.encoders.points import (
    patch_points,
    points_from_geometry,
    points_from_rays,
    transform_points,
    unproject_depth,
    valid_depth_mask,
)

H, W = 12, 16


def intrinsics(batch: int, skew: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = torch.tensor([[20.0, skew, 7.3], [0.0, 22.0, 5.1], [0.0, 0.0, 1.0]], dtype=dtype)
    return k.expand(batch, 3, 3).clone()


def random_pose(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random rigid cam-to-world poses (proper rotations, translations in [-1, 1])."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(batch, 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.linalg.det(q) < 0, :, 0] *= -1
    pose = torch.eye(4, dtype=torch.float64).repeat(batch, 1, 1)
    pose[:, :3, :3] = q
    pose[:, :3, 3] = torch.rand(batch, 3, generator=gen, dtype=torch.float64) * 2 - 1
    return pose.to(dtype)


def plane_depth(k: torch.Tensor, normal: torch.Tensor, offset: float) -> torch.Tensor:
    """Analytic z-depth of the plane ``normal . X = offset`` at every pixel centre, in float64."""
    fx, skew, cx, fy, cy = (float(k[0, 0]), float(k[0, 1]), float(k[0, 2]), float(k[1, 1]), float(k[1, 2]))
    depth = torch.empty(H, W, dtype=torch.float64)
    for v in range(H):
        for u in range(W):
            y = (v + 0.5 - cy) / fy
            x = (u + 0.5 - cx - skew * y) / fx
            depth[v, u] = offset / (normal[0] * x + normal[1] * y + normal[2])
    return depth


# ----------------------------------------------------------------------------- unprojection


@pytest.mark.parametrize("skew", [0.0, 0.7])
def test_unproject_recovers_plane(skew: float) -> None:
    normal = torch.tensor([0.2, -0.3, 1.0], dtype=torch.float64)
    normal = normal / normal.norm()
    offset = 1.5
    k = intrinsics(2, skew)
    depth = plane_depth(k[0].double(), normal, offset).expand(2, H, W).float()
    points = unproject_depth(depth, k)
    assert points.shape == (2, H, W, 3) and points.dtype == torch.float32
    residual = points.double() @ normal - offset
    assert residual.abs().max().item() <= 1e-4
    # Pixel-centre convention: projecting back with K lands on (u + 0.5, v + 0.5).
    pixels = torch.einsum("ij,bhwj->bhwi", k[0].double(), points.double())
    pixels = pixels[..., :2] / pixels[..., 2:]
    v, u = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    expected = torch.stack([u, v], -1).double() + 0.5
    assert (pixels - expected).abs().max().item() <= 1e-4
    assert torch.equal(points[..., 2], depth)


def test_unproject_with_pose_gives_world_plane() -> None:
    normal = torch.tensor([-0.4, 0.1, 1.0], dtype=torch.float64)
    normal = normal / normal.norm()
    offset = 2.0
    k = intrinsics(3)
    depth = plane_depth(k[0].double(), normal, offset).expand(3, H, W).float()
    pose = random_pose(3, seed=3)
    world = unproject_depth(depth, k, pose.float())
    # Plane in the world frame: n_w = R n, d_w = d + n_w . t.
    normal_world = pose[:, :3, :3] @ normal
    offset_world = offset + (normal_world * pose[:, :3, 3]).sum(-1)
    residual = torch.einsum("bhwi,bi->bhw", world.double(), normal_world) - offset_world[:, None, None]
    assert residual.abs().max().item() <= 1e-4
    # Same as LLaVA-3D's homogeneous `pose @ [x, y, z, 1]` applied to the camera points.
    camera = unproject_depth(depth, k).double()
    homogeneous = torch.cat([camera, torch.ones(3, H, W, 1, dtype=torch.float64)], -1)
    expected = torch.einsum("bij,bhwj->bhwi", pose, homogeneous)[..., :3]
    assert (world.double() - expected).abs().max().item() <= 1e-5


def test_points_from_rays_matches_unproject() -> None:
    gen = torch.Generator().manual_seed(0)
    k = intrinsics(2, skew=0.3)
    rays = unproject_depth(torch.ones(2, H, W), k)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    depth_along_ray = torch.rand(2, H, W, generator=gen) * 3 + 0.5
    depth_z = depth_along_ray * rays[..., 2]
    pose = random_pose(2, seed=1, dtype=torch.float32)
    for cam_to_world in (None, pose):
        from_rays = points_from_rays(rays, depth_along_ray, cam_to_world)
        from_depth = unproject_depth(depth_z, k, cam_to_world)
        torch.testing.assert_close(from_rays, from_depth, atol=1e-5, rtol=1e-5)


def test_unproject_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"depth must have shape \[B, H, W\], got \(2, 1, 4, 4\)"):
        unproject_depth(torch.ones(2, 1, 4, 4), intrinsics(2))
    with pytest.raises(ValueError, match=r"intrinsics must have shape \[B, 3, 3\], got \(2, 4, 4\)"):
        unproject_depth(torch.ones(2, 4, 4), torch.eye(4).expand(2, 4, 4))
    with pytest.raises(ValueError, match=r"cam_to_world must have shape \[B, 4, 4\], got \(2, 3, 4\)"):
        unproject_depth(torch.ones(2, 4, 4), intrinsics(2), torch.zeros(2, 3, 4))


def test_valid_depth_mask() -> None:
    depth = torch.tensor([[[1.0, 0.0, -1.0, float("nan"), float("inf"), 1e-3]]])
    assert valid_depth_mask(depth).tolist() == [[[True, False, False, False, False, True]]]


# ----------------------------------------------------------------------------- patch points


def index_points(batch: int = 2) -> torch.Tensor:
    """points[b, r, c] = (r, c, b): each point names its pixel."""
    b, r, c = torch.meshgrid(torch.arange(batch), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([r, c, b], -1).float()


@pytest.mark.parametrize("grid", [(3, 4), (4, 4), (2, 8), (12, 16), (1, 1)])
def test_patch_points_nearest_picks_centre_pixel(grid: tuple[int, int]) -> None:
    points = index_points()
    valid = torch.ones(2, H, W, dtype=torch.bool)
    xyz, patch_valid = patch_points(points, valid, grid, "nearest")
    gh, gw = grid
    ph, pw = H // gh, W // gw
    assert xyz.shape == (2, gh * gw, 3) and patch_valid.all()
    for b in range(2):
        for i in range(gh):
            for j in range(gw):
                row, col = xyz[b, i * gw + j, :2].tolist()
                # the pixel whose centre is nearest the patch centre (lower/right one on a tie)
                centre_r, centre_c = (i + 0.5) * ph, (j + 0.5) * pw
                assert abs(row + 0.5 - centre_r) <= 0.5 and row + 0.5 >= centre_r
                assert abs(col + 0.5 - centre_c) <= 0.5 and col + 0.5 >= centre_c
                assert row == i * ph + ph // 2 and col == j * pw + pw // 2
    resized = F.interpolate(points.permute(0, 3, 1, 2), size=grid, mode="nearest-exact")
    assert torch.equal(xyz, resized.flatten(2).transpose(1, 2))


def test_patch_points_nearest_invalid_centre() -> None:
    points = index_points()
    valid = torch.ones(2, H, W, dtype=torch.bool)
    # grid (3, 4): patch (1, 2) of sample 1 samples pixel (6, 10); make it NaN and invalid.
    points[1, 6, 10] = float("nan")
    valid[1, 6, 10] = False
    valid[0, 0, 0] = False  # not a sampled pixel: no effect
    xyz, patch_valid = patch_points(points, valid, (3, 4), "nearest")
    expected_valid = torch.ones(2, 12, dtype=torch.bool)
    expected_valid[1, 1 * 4 + 2] = False
    assert torch.equal(patch_valid, expected_valid)
    assert torch.equal(xyz[1, 6], torch.zeros(3))
    assert torch.isfinite(xyz).all()


def test_patch_points_mean_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(2, H, W, 3, generator=gen, dtype=torch.float64)
    valid = torch.rand(2, H, W, generator=gen) > 0.4
    valid[0, :4, :4] = False  # one fully invalid patch for grid (3, 4)
    points[~valid] = float("nan")
    gh, gw = 3, 4
    xyz, patch_valid = patch_points(points, valid, (gh, gw), "mean")
    ph, pw = H // gh, W // gw
    for b in range(2):
        for i in range(gh):
            for j in range(gw):
                picked = [
                    points[b, r, c].tolist()
                    for r in range(i * ph, (i + 1) * ph)
                    for c in range(j * pw, (j + 1) * pw)
                    if valid[b, r, c]
                ]
                patch = i * gw + j
                assert bool(patch_valid[b, patch]) == bool(picked)
                expected = [sum(p[a] for p in picked) / len(picked) for a in range(3)] if picked else [0.0] * 3
                assert torch.allclose(xyz[b, patch], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert not patch_valid[0, 0]


@pytest.mark.parametrize("mode", ["nearest", "mean"])
def test_patch_points_drop_the_pixels_a_strided_patch_embedding_never_reads(mode) -> None:
    # 12 x 16 pixels on a 5 x 3 grid: 2 x 5 pixel patches over the top-left 10 x 15 pixels
    points, valid = index_points(), torch.rand(2, H, W, generator=torch.Generator().manual_seed(0)) > 0.3
    cropped = patch_points(points[:, :10, :15], valid[:, :10, :15], (5, 3), mode)
    for got, expected in zip(patch_points(points, valid, (5, 3), mode), cropped):
        assert torch.equal(got, expected)


def test_patch_points_errors() -> None:
    points, valid = index_points(), torch.ones(2, H, W, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"at least one pixel per patch.*H, W = \(12, 16\) and grid = \(13, 4\)"):
        patch_points(points, valid, (13, 4))
    with pytest.raises(ValueError, match=r"patch mode must be one of \['mean', 'nearest'\], got 'bilinear'"):
        patch_points(points, valid, (3, 4), "bilinear")
    with pytest.raises(ValueError, match=r"valid must have shape \[B, H, W\]"):
        patch_points(points, valid[:, :, :4], (3, 4))


# ----------------------------------------------------------------------------- voxel pooling


def brute_force_voxel_pool(tokens, points, valid, voxel_size, max_tokens):
    """Per-voxel means with Python dicts (insertion order = first appearance)."""
    batch, _, width = tokens.shape
    per_sample = []
    for b in range(batch):
        voxels: dict[tuple[int, int, int], list[int]] = {}
        for n in range(tokens.shape[1]):
            if valid[b, n]:
                key = tuple(math.floor(float(c) / voxel_size) for c in points[b, n])
                voxels.setdefault(key, []).append(n)
        per_sample.append(list(voxels.values()))
    size = max_tokens if max_tokens is not None else max(len(v) for v in per_sample)
    pooled = torch.zeros(batch, size, width, dtype=tokens.dtype)
    pooled_points = torch.zeros(batch, size, 3, dtype=points.dtype)
    pooled_valid = torch.zeros(batch, size, dtype=torch.bool)
    for b, groups in enumerate(per_sample):
        for slot, members in enumerate(groups[:size]):
            pooled[b, slot] = tokens[b, members].mean(0)
            pooled_points[b, slot] = points[b, members].mean(0)
            pooled_valid[b, slot] = True
    return pooled, pooled_points, pooled_valid


@pytest.mark.parametrize("voxel_size", [0.1, 0.35, 0.8, 5.0])
@pytest.mark.parametrize("max_tokens", [None, 3, 40])
def test_voxel_pool_matches_brute_force(voxel_size: float, max_tokens: int | None) -> None:
    gen = torch.Generator().manual_seed(int(voxel_size * 100))
    tokens = torch.randn(3, 30, 5, generator=gen, dtype=torch.float64)
    points = torch.rand(3, 30, 3, generator=gen, dtype=torch.float64) * 2 - 1
    valid = torch.rand(3, 30, generator=gen) > 0.25
    valid[2, ::2] = False
    points[~valid] = float("nan")  # invalid tokens are ignored whatever their points
    got = voxel_mean_pool(tokens, points, valid, voxel_size, max_tokens)
    expected = brute_force_voxel_pool(tokens, points, valid, voxel_size, max_tokens)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


def test_voxel_pool_cap_is_deterministic_and_keeps_first_voxels() -> None:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 50, 4, generator=gen)
    points = torch.rand(2, 50, 3, generator=gen) * 4
    valid = torch.ones(2, 50, dtype=torch.bool)
    full, full_points, full_valid = voxel_mean_pool(tokens, points, valid, 0.5)
    capped, capped_points, capped_valid = voxel_mean_pool(tokens, points, valid, 0.5, max_tokens=6)
    assert capped.shape == (2, 6, 4) and full.shape[1] > 6
    assert torch.equal(capped, full[:, :6]) and torch.equal(capped_points, full_points[:, :6])
    assert capped_valid.all()
    again = voxel_mean_pool(tokens, points, valid, 0.5, max_tokens=6)
    assert torch.equal(again[0], capped)


def test_voxel_pool_tiny_voxels_keep_valid_tokens_in_order_and_pass_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 6, 3, generator=gen, requires_grad=True)
    points = torch.randn(2, 6, 3, generator=gen)
    valid = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    pooled, pooled_points, pooled_valid = voxel_mean_pool(tokens, points, valid, 1e-6)
    assert pooled.shape == (2, 4, 3)
    assert torch.equal(pooled[0], tokens[0, [0, 2, 3, 5]])
    assert torch.equal(pooled[1, 0], tokens[1, 2]) and torch.equal(pooled[1, 1:], torch.zeros(3, 3))
    assert pooled_valid.tolist() == [[True] * 4, [True, False, False, False]]
    pooled.sum().backward()
    assert torch.equal(tokens.grad, valid[..., None].float().expand_as(tokens))


def test_voxel_pool_errors() -> None:
    tokens, points, valid = torch.zeros(1, 4, 2), torch.zeros(1, 4, 3), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"voxel_size must be > 0, got 0"):
        voxel_mean_pool(tokens, points, valid, 0.0)
    with pytest.raises(ValueError, match=r"max_tokens must be a positive integer or None, got 0"):
        voxel_mean_pool(tokens, points, valid, 0.1, 0)
    with pytest.raises(ValueError, match=r"points must have shape \[B, N, 3\]"):
        voxel_mean_pool(tokens, points[:, :3], valid, 0.1)


# ----------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("num_frequencies", [0, 1, 4, 8])
def test_nerf_encoding_matches_formula(num_frequencies: int) -> None:
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(2, 5, 3, generator=gen) * 4 - 2
    out = nerf_encoding(xyz, num_frequencies)
    assert out.shape == (2, 5, 3 + 6 * num_frequencies)
    for point, encoded in zip(xyz.reshape(-1, 3).tolist(), out.reshape(-1, out.shape[-1]).double()):
        expected = []
        for c in point:
            expected += [c]
            expected += [math.sin(2.0**k * c) for k in range(num_frequencies)]
            expected += [math.cos(2.0**k * c) for k in range(num_frequencies)]
        torch.testing.assert_close(encoded, torch.tensor(expected, dtype=torch.float64), atol=2e-5, rtol=0)


def test_nerf_encoding_rejects_negative_frequencies() -> None:
    with pytest.raises(ValueError, match=r"num_frequencies must be >= 0, got -1"):
        nerf_encoding(torch.zeros(3), -1)


def assert_every_parameter_gets_gradient(module: torch.nn.Module, out: torch.Tensor) -> None:
    out.square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_frequency_encoding_is_mlp_of_centred_nerf() -> None:
    torch.manual_seed(0)
    encoding = FrequencyPositionEncoding(16, num_frequencies=4, center=(0.5, -1.0, 2.0), scale=3.0)
    assert encoding.mlp.fc1.in_features == 3 + 6 * 4 and isinstance(encoding.mlp.act, torch.nn.GELU)
    xyz = torch.randn(2, 7, 3)
    out = encoding(xyz)
    assert out.shape == (2, 7, 16)
    centred = (xyz - torch.tensor([0.5, -1.0, 2.0])) / 3.0
    torch.testing.assert_close(out, encoding.mlp(nerf_encoding(centred, 4)))
    assert_every_parameter_gets_gradient(encoding, out)


def test_frequency_encoding_defaults_are_spatialvlas() -> None:
    encoding = FrequencyPositionEncoding(8)
    assert (encoding.num_frequencies, encoding.center, encoding.scale) == (8, (0.0, 0.0, 2.0), 2.0)
    assert encoding.mlp.fc1.in_features == 51
    with pytest.raises(ValueError, match=r"scale must be > 0, got 0"):
        FrequencyPositionEncoding(8, scale=0.0)


def test_llava3d_encoding_layers_and_gradients() -> None:
    torch.manual_seed(0)
    encoding = LLaVA3DPositionEncoding(12, hidden_dim=20)
    xyz = torch.randn(2, 5, 3)
    out = encoding(xyz)
    assert out.shape == (2, 5, 12)
    hidden = F.layer_norm(xyz @ encoding.fc1.weight.T + encoding.fc1.bias, (20,), encoding.norm.weight, encoding.norm.bias)
    torch.testing.assert_close(out, hidden.relu() @ encoding.fc2.weight.T + encoding.fc2.bias)
    with torch.no_grad():  # make the LayerNorm affine non-trivial so its gradient is not degenerate
        encoding.norm.weight.normal_()
    assert_every_parameter_gets_gradient(encoding, encoding(xyz))
    assert LLaVA3DPositionEncoding(8).fc1.out_features == 8


# ----------------------------------------------------------------------------- GeometryEncoder

GRID = (3, 4)
DIM = 8


def scene(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    depth = torch.rand(batch, H, W, generator=gen) * 2 + 0.5
    depth[0, 6, 10] = 0.0  # the nearest pixel of patch (1, 2) of sample 0
    depth[1, 2, 2] = float("nan")  # the nearest pixel of patch (0, 0) of sample 1
    vision = torch.randn(batch, GRID[0] * GRID[1], DIM, generator=gen)
    return vision, depth, intrinsics(batch), random_pose(batch, seed=seed, dtype=torch.float32)


def test_geometry_add_equals_vision_plus_encoding_on_valid_patches() -> None:
    torch.manual_seed(0)
    encoder = GeometryEncoder(LLaVA3DPositionEncoding(DIM), DIM, "add")
    assert encoder.out_dim == DIM
    vision, depth, k, pose = scene()
    tokens, valid = encoder(vision, GRID, depth=depth, intrinsics=k, cam_to_world=pose)
    assert tokens.shape == vision.shape and valid.shape == (2, 12) and valid.all()
    xyz, patch_valid = patch_points(unproject_depth(depth, k, pose), valid_depth_mask(depth), GRID)
    assert patch_valid.sum() == 22 and not patch_valid[0, 6] and not patch_valid[1, 0]
    expected = vision + encoder.encoding(xyz)
    torch.testing.assert_close(tokens[patch_valid], expected[patch_valid])
    assert torch.equal(tokens[~patch_valid], vision[~patch_valid])
    assert torch.isfinite(tokens).all()
    assert_every_parameter_gets_gradient(encoder, tokens)


def test_geometry_concat_appends_geometry_tokens() -> None:
    torch.manual_seed(0)
    encoder = GeometryEncoder(FrequencyPositionEncoding(DIM, num_frequencies=3), DIM, "concat", patch_mode="mean")
    vision, depth, k, _ = scene()
    tokens, valid = encoder(vision, GRID, depth=depth, intrinsics=k)
    assert tokens.shape == (2, 24, DIM) and valid.shape == (2, 24)
    xyz, patch_valid = patch_points(unproject_depth(depth, k), valid_depth_mask(depth), GRID, "mean")
    assert torch.equal(tokens[:, :12], vision) and valid[:, :12].all()
    assert torch.equal(valid[:, 12:], patch_valid)
    torch.testing.assert_close(tokens[:, 12:], encoder.encoding(xyz))  # every mean patch has valid depth
    depth[0, :4, 8:12] = 0.0  # empty patch (0, 2) of sample 0
    tokens, valid = encoder(vision, GRID, depth=depth, intrinsics=k)
    assert not valid[0, 12 + 2] and torch.equal(tokens[0, 12 + 2], torch.zeros(DIM))
    assert valid[:, 12:].sum() == 23


def test_geometry_input_forms_agree() -> None:
    torch.manual_seed(0)
    encoder = GeometryEncoder(LLaVA3DPositionEncoding(DIM), DIM)
    vision, depth, k, pose = scene()
    from_depth = encoder(vision, GRID, depth=depth, intrinsics=k, cam_to_world=pose)[0]
    world = unproject_depth(depth, k, pose)
    camera = unproject_depth(depth, k)
    from_world_points = encoder(vision, GRID, points=world, pixel_valid=valid_depth_mask(depth))[0]
    from_camera_points = encoder(vision, GRID, points=camera, cam_to_world=pose, pixel_valid=valid_depth_mask(depth))[0]
    rays = camera / camera.norm(dim=-1, keepdim=True)
    from_rays = encoder(vision, GRID, ray_directions=rays, depth_along_ray=camera.norm(dim=-1), cam_to_world=pose)[0]
    for other in (from_world_points, from_camera_points, from_rays):
        torch.testing.assert_close(other, from_depth, atol=1e-4, rtol=1e-4)


def test_points_from_geometry_validity() -> None:
    points = torch.ones(1, 2, 2, 3)
    points[0, 0, 1, 2] = float("inf")
    mask = torch.tensor([[[True, True], [False, True]]])
    _, valid = points_from_geometry(points=points, pixel_valid=mask)
    assert valid.tolist() == [[[True, False], [False, True]]]
    rays = torch.tensor([0.0, 0.0, 1.0]).expand(1, 2, 2, 3)
    _, valid = points_from_geometry(ray_directions=rays, depth_along_ray=torch.tensor([[[1.0, 0.0], [-1.0, 2.0]]]))
    assert valid.tolist() == [[[True, False], [False, True]]]


def test_geometry_voxel_pooling_pools_fused_tokens() -> None:
    torch.manual_seed(0)
    encoder = GeometryEncoder(LLaVA3DPositionEncoding(DIM), DIM, voxel_size=0.5, max_tokens=5)
    plain = GeometryEncoder(encoder.encoding, DIM)
    vision, depth, k, pose = scene()
    tokens, valid = encoder(vision, GRID, depth=depth, intrinsics=k, cam_to_world=pose)
    fused, _ = plain(vision, GRID, depth=depth, intrinsics=k, cam_to_world=pose)
    xyz, patch_valid = patch_points(unproject_depth(depth, k, pose), valid_depth_mask(depth), GRID)
    expected, _, expected_valid = voxel_mean_pool(fused, xyz, patch_valid, 0.5, 5)
    assert tokens.shape == (2, 5, DIM)
    torch.testing.assert_close(tokens, expected)
    assert torch.equal(valid, expected_valid)


def test_geometry_encoder_constructor_errors() -> None:
    encoding = LLaVA3DPositionEncoding(DIM)
    with pytest.raises(ValueError, match=r"fusion must be one of \['add', 'concat'\], got 'sum'"):
        GeometryEncoder(encoding, DIM, "sum")
    with pytest.raises(ValueError, match=r"voxel pooling \(voxel_size=0.2\) needs fusion='add', got fusion='concat'"):
        GeometryEncoder(encoding, DIM, "concat", voxel_size=0.2)
    with pytest.raises(ValueError, match=r"max_tokens must be a positive integer and needs voxel_size"):
        GeometryEncoder(encoding, DIM, max_tokens=10)
    with pytest.raises(ValueError, match=r"patch mode must be one of"):
        GeometryEncoder(encoding, DIM, patch_mode="max")
    with pytest.raises(ValueError, match=r"output width must equal vision_dim=16, got 8"):
        GeometryEncoder(encoding, 16)


def test_geometry_encoder_input_errors() -> None:
    encoder = GeometryEncoder(LLaVA3DPositionEncoding(DIM), DIM)
    vision, depth, k, pose = scene()
    points = unproject_depth(depth, k)
    forms = r"\(depth, intrinsics\), points, or \(ray_directions, depth_along_ray\)"
    with pytest.raises(ValueError, match=rf"expected exactly one geometry input form, {forms}.*got none"):
        encoder(vision, GRID)
    with pytest.raises(ValueError, match=r"exactly one geometry input form.*got none"):
        encoder(vision, GRID, cam_to_world=pose)
    with pytest.raises(ValueError, match=r"got \(depth, intrinsics\) and points"):
        encoder(vision, GRID, depth=depth, intrinsics=k, points=points)
    with pytest.raises(ValueError, match=rf"incomplete geometry input \(depth, intrinsics\): got only depth; .*{forms}"):
        encoder(vision, GRID, depth=depth)
    with pytest.raises(ValueError, match=r"incomplete geometry input \(ray_directions, depth_along_ray\): got only ray"):
        encoder(vision, GRID, ray_directions=points)
    with pytest.raises(ValueError, match=r"at least one pixel per patch.*H, W = \(12, 16\) and grid = \(3, 17\)"):
        encoder(torch.zeros(2, 51, DIM), (3, 17), depth=depth, intrinsics=k)
    with pytest.raises(ValueError, match=r"vision_tokens must have shape \[B, gh \* gw, vision_dim\] = \[B, 12, 8\]"):
        encoder(vision[:, :10], GRID, depth=depth, intrinsics=k)
    with pytest.raises(ValueError, match=r"batch size must match vision_tokens' \(1\), got 2"):
        encoder(vision[:1], GRID, depth=depth, intrinsics=k)


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_geometry_encoder_builds_and_runs_on_meta(fusion: str) -> None:
    encoding = FrequencyPositionEncoding(DIM, device="meta")
    encoder = GeometryEncoder(encoding, DIM, fusion)
    assert all(p.device.type == "meta" for p in encoder.parameters())
    assert all(p.device.type == "meta" for p in LLaVA3DPositionEncoding(DIM, device="meta").parameters())
    meta = {"device": "meta"}
    tokens, valid = encoder(
        torch.empty(2, 12, DIM, **meta), GRID, depth=torch.empty(2, H, W, **meta), intrinsics=torch.empty(2, 3, 3, **meta)
    )
    length = 12 if fusion == "add" else 24
    assert tokens.shape == (2, length, DIM) and tokens.device.type == "meta" and valid.shape == (2, length)


def test_geometry_encoder_keeps_vision_dtype() -> None:
    torch.manual_seed(0)
    encoder = GeometryEncoder(LLaVA3DPositionEncoding(DIM, dtype=torch.bfloat16), DIM)
    vision, depth, k, _ = scene()
    tokens, _ = encoder(vision.bfloat16(), GRID, depth=depth, intrinsics=k)
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens).all()


def test_voxel_size_must_be_positive_or_none():
    GeometryEncoder(nn.Linear(3, 8), 8, voxel_size=None)
    for voxel_size in (0.0, -0.1):
        with pytest.raises(ValueError, match=rf"voxel_size must be > 0 or None, got {voxel_size}"):
            GeometryEncoder(nn.Linear(3, 8), 8, voxel_size=voxel_size)


# ----------------------------------------------------------------------------- dtypes


def test_geometry_math_runs_in_at_least_float32_and_follows_the_points_dtype() -> None:
    """bf16 inputs are computed in float32, float64 ones stay float64, and a pose in another
    dtype is cast to the points' (not the other way round)."""
    gen = torch.Generator().manual_seed(0)
    xyz = (torch.rand(2, 5, 3, generator=gen) * 4 - 2).bfloat16()
    encoded = nerf_encoding(xyz, 4)
    assert encoded.dtype == torch.float32
    torch.testing.assert_close(encoded, nerf_encoding(xyz.float(), 4), atol=0, rtol=0)

    points = torch.rand(2, H, W, 3, generator=gen)
    pose = random_pose(2, seed=1, dtype=torch.float64)
    moved = transform_points(points, pose)
    assert moved.dtype == torch.float32
    torch.testing.assert_close(moved, transform_points(points, pose.float()), atol=0, rtol=0)

    rays = torch.randn(2, H, W, 3, generator=gen)
    depth = torch.rand(2, H, W, generator=gen) + 0.5
    low = points_from_rays(rays.bfloat16(), depth.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, rays.bfloat16().float() * depth.bfloat16().float()[..., None], atol=0, rtol=0)
    wide = points_from_rays(rays, depth.double())
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, rays.double() * depth.double()[..., None], atol=0, rtol=0)


def test_an_encoding_of_the_wrong_shape_is_named_in_the_error() -> None:
    """An encoding without a ``dim`` attribute is only checked when it runs."""
    vision, depth, k, _ = scene()
    encoder = GeometryEncoder(nn.Linear(3, DIM + 1), DIM)
    with pytest.raises(ValueError, match=r"the encoding must map \[B, N, 3\] to \(2, 12, 8\), got \(2, 12, 9\)"):
        encoder(vision, GRID, depth=depth, intrinsics=k)
