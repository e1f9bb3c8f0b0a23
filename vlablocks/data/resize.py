"""Fit a dataset's frames to a recipe's square image size: resize keeping the aspect ratio, then
pad (as LeRobot's and openpi's ``resize_with_pad``), with the pinhole intrinsics and depth
following the same map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PadResize:
    """The map from an ``H x W`` frame to a ``size x size`` one: scale by ``scale`` (to
    ``new_h x new_w``), then place at ``(top, left)`` in a zero canvas."""

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def new_shape(self) -> tuple[int, int]:
        return max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale))

    @property
    def offset(self) -> tuple[int, int]:
        """``(top, left)`` padding: the resized frame sits centred."""
        new_h, new_w = self.new_shape
        return (self.size - new_h) // 2, (self.size - new_w) // 2

    @property
    def identity(self) -> bool:
        return self.height == self.width == self.size

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """``[..., 3, H, W]`` float -> ``[..., 3, size, size]`` (bilinear, antialiased; black padding)."""
        if self.identity:
            return images
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        resized = F.interpolate(flat, size=self.new_shape, mode="bilinear", antialias=True, align_corners=False)
        return self._pad(resized.clamp_(0.0, 1.0)).reshape(*lead, 3, self.size, self.size)

    def depth(self, depth: torch.Tensor) -> torch.Tensor:
        """``[..., H, W]`` metres -> ``[..., size, size]`` (nearest: no depth mixed across edges; 0 padding = no depth)."""
        if self.identity:
            return depth
        lead = depth.shape[:-2]
        flat = depth.reshape(-1, 1, *depth.shape[-2:])
        resized = F.interpolate(flat, size=self.new_shape, mode="nearest-exact")
        return self._pad(resized).reshape(*lead, self.size, self.size)

    def intrinsics(self, intrinsics: torch.Tensor) -> torch.Tensor:
        """``[..., 3, 3]`` K of the ``H x W`` frame -> K of the padded ``size x size`` one (pixel
        centres at ``+0.5``: ``u' = sx u + left``, so ``fx' = sx fx`` and ``cx' = sx cx + left``)."""
        if self.identity:
            return intrinsics
        (new_h, new_w), (top, left) = self.new_shape, self.offset
        sx, sy = new_w / self.width, new_h / self.height
        out = intrinsics.clone()
        out[..., 0, :] *= sx
        out[..., 1, :] *= sy
        out[..., 0, 2] += left * intrinsics[..., 2, 2]
        out[..., 1, 2] += top * intrinsics[..., 2, 2]
        return out

    def _pad(self, resized: torch.Tensor) -> torch.Tensor:
        (new_h, new_w), (top, left) = self.new_shape, self.offset
        return F.pad(resized, (left, self.size - new_w - left, top, self.size - new_h - top))
