"""Random-shift augmentation keeps images, depth and intrinsics consistent."""

import torch

from vlablocks.policy.augment import random_shift
from vlablocks.encoders.points import unproject_depth


def test_shift_moves_pixels_and_principal_point_together():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 3, 16, 16, generator=gen)
    depth = 1.0 + torch.rand(3, 2, 16, 16, generator=gen)
    intrinsics = torch.tensor([[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]]).expand(3, 2, 3, 3).clone()
    out, out_depth, out_k = random_shift(images, 3, depth, intrinsics, torch.Generator().manual_seed(1))
    offsets = torch.randint(-3, 4, (3, 2), generator=torch.Generator().manual_seed(1))
    for b in range(3):
        dx, dy = offsets[b].tolist()
        for v in range(16):
            for u in range(16):
                src_v, src_u = min(max(v + dy, 0), 15), min(max(u + dx, 0), 15)
                assert torch.equal(out[b, :, :, v, u], images[b, :, :, src_v, src_u])
                assert torch.equal(out_depth[b, :, v, u], depth[b, :, src_v, src_u])
        assert torch.equal(out_k[b, :, 0, 2], intrinsics[b, :, 0, 2] - dx)
    # interior pixels unproject to the same 3D points as before the shift
    before = unproject_depth(depth.flatten(0, 1), intrinsics.flatten(0, 1)).view(3, 2, 16, 16, 3)
    after = unproject_depth(out_depth.flatten(0, 1), out_k.flatten(0, 1)).view(3, 2, 16, 16, 3)
    for b in range(3):
        dx, dy = offsets[b].tolist()
        torch.testing.assert_close(after[b, :, 4:12, 4:12], before[b, :, 4 + dy:12 + dy, 4 + dx:12 + dx])
    assert random_shift(images, 0)[0] is images
