"""Images of any size to a vision encoder's square input: resize keeping the aspect ratio, then
zero-pad (``policy.resize_images``), exactly as LeRobot's pi0 / pi0.5 (openpi's
``resize_with_pad_torch``: centred padding) and SmolVLA (``resize_with_pad``: padding on the left
and top) prepare their cameras. The dataset reader's own resize
(:class:`vlablocks.data.resize.PadResize`) also maps depth and intrinsics; this one is the
policy's, for images that reach it at another size."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def resize_with_pad(images: torch.Tensor, size: int, align: Literal["center", "top_left"] = "center") -> torch.Tensor:
    """``images [B, 3, H, W]`` in [0, 1] -> ``[B, 3, size, size]``.

    The longer side becomes ``size`` and the other ``int(side / ratio)`` (truncated, as LeRobot
    does), bilinear without antialiasing (``align_corners=False``), clamped to [0, 1]; the rest
    is black padding, split evenly (the extra pixel after) for ``"center"``, all before the
    image for ``"top_left"``. Images that already have the size are returned as they are.
    """
    height, width = images.shape[-2:]
    if height == width == size:
        return images
    ratio = max(width / size, height / size)
    new_h, new_w = int(height / ratio), int(width / ratio)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    pad_h, pad_w = size - new_h, size - new_w
    if align == "center":
        top, left = pad_h // 2, pad_w // 2
    elif align == "top_left":
        top, left = pad_h, pad_w
    else:
        raise ValueError(f"align must be 'center' or 'top_left'; got {align!r}")
    return F.pad(resized, (left, pad_w - left, top, pad_h - top))
