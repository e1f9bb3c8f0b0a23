"""Training-time image augmentation that keeps geometry consistent.

DrQ-style random shifts: each sample's images (and depth maps) move by the same random integer
offset of up to ``max_shift`` pixels, borders replicated, and the camera intrinsics' principal
point moves with them so unprojected depth still lands on the right 3D points.
"""

from __future__ import annotations

import torch


def random_shift(
    images: torch.Tensor,
    max_shift: int,
    depth: torch.Tensor | None = None,
    intrinsics: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Shift every sample by one random offset in ``[-max_shift, max_shift]^2`` pixels.

    Output pixel ``(u, v)`` shows input pixel ``(u + dx, v + dy)`` (borders replicated), so the
    principal point becomes ``(cx - dx, cy - dy)``.

    Args:
        images: ``[B, N, C, H, W]``.
        max_shift: largest offset in pixels (0: unchanged).
        depth: ``[B, N, H, W]`` or ``None``.
        intrinsics: ``[B, N, 3, 3]`` or ``None``.
        generator: draws the offsets.

    Returns:
        ``(images, depth, intrinsics)`` shifted (inputs are not modified).
    """
    if max_shift <= 0:
        return images, depth, intrinsics
    b, n, c, h, w = images.shape
    draw_on = None if generator is None else generator.device  # a CUDA generator draws on the GPU
    offsets = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator, device=draw_on).to(images.device)
    dx, dy = offsets[:, 0], offsets[:, 1]
    rows = (torch.arange(h, device=images.device)[None, :] + dy[:, None]).clamp(0, h - 1)  # [B, H]
    cols = (torch.arange(w, device=images.device)[None, :] + dx[:, None]).clamp(0, w - 1)  # [B, W]

    def shift(x: torch.Tensor) -> torch.Tensor:  # [B, ..., H, W]
        lead = x.shape[1:-2]
        view = [b] + [1] * len(lead)
        x = torch.gather(x, -2, rows.view(*view, h, 1).expand(b, *lead, h, w))
        return torch.gather(x, -1, cols.view(*view, 1, w).expand(b, *lead, h, w))

    images = shift(images)
    if depth is not None:
        depth = shift(depth)
    if intrinsics is not None:
        intrinsics = intrinsics.clone()
        intrinsics[..., 0, 2] -= dx.view(b, 1).to(intrinsics.dtype)
        intrinsics[..., 1, 2] -= dy.view(b, 1).to(intrinsics.dtype)
    return images, depth, intrinsics
