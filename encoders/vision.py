"""Vision backbones (images in [0, 1] -> patch tokens) and projectors to the LLM width.

Every backbone is a :class:`VisionBackbone`: ``forward(images [B, 3, H, W] in [0, 1]) ->
tokens [B, N, out_dim]`` with ``N = gh * gw`` patch tokens in row-major order (like a ViT), so a
geometry encoder can attach one 3D point to each token. Each backbone owns its pixel
normalisation; nothing upstream normalises. Four backbones:

- :class:`PatchViT`: a small ViT trained from scratch, the offline default;
- :class:`ConvNet`: a small conv net trained from scratch (locality built in: the choice for
  learning from a few dozen demonstrations);
- :class:`~vlablocks.encoders.siglip.SiglipVision`: a transformers SigLIP vision tower from a local checkpoint (or built
  from a config without weights, e.g. on the meta device);
- :class:`~vlablocks.encoders.timm_vision.TimmVision`: any timm backbone, ViT-like (prefix tokens dropped) or convolutional
  (feature map flattened).

The pretrained families live beside this module: :mod:`vlablocks.encoders.siglip` and
:mod:`vlablocks.encoders.timm_vision`; projectors to the LLM width in
:mod:`vlablocks.encoders.projectors`.

Nothing here downloads: transformers loads with ``local_files_only=True`` and timm models are
created with ``pretrained=False`` or from a local weights file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlablocks.blocks.mlp import Mlp

logger = logging.getLogger(__name__)

Device = torch.device | str | None

#: SigLIP's pixel convention (``SiglipImageProcessor``): ``(x - 0.5) / 0.5`` maps [0, 1] to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

def check_images(images: torch.Tensor, image_size: int) -> None:
    """Raise ValueError unless ``images`` is a float ``[B, 3, image_size, image_size]`` tensor.

    The [0, 1] value range is the caller's contract and is not checked (that would need a
    device sync per call).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W]; got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"images must be {image_size} x {image_size} pixels (the backbone's image_size); "
            f"got {tuple(images.shape[-2:])}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor with values in [0, 1]; got dtype {images.dtype} "
            "(convert uint8 images with images.float() / 255)"
        )


class VisionBackbone(nn.Module):
    """Base of every vision backbone: ``[0, 1]`` images -> normalised pixels -> patch tokens.

    Subclasses implement :meth:`forward_pixels`; :meth:`forward` checks the images and applies
    the backbone's own normalisation ``(images - mean) / std`` first.

    Attributes:
        out_dim: token width.
        image_size: expected square input size in pixels.
        patch_size: pixels per token along each axis (the effective stride for conv nets).
        grid: ``(gh, gw)`` patch grid; tokens are in row-major order, ``N = gh * gw``.

    Shapes: ``images [B, 3, image_size, image_size]`` -> ``tokens [B, N, out_dim]``.
    """

    def __init__(
        self,
        out_dim: int,
        image_size: int,
        patch_size: int,
        grid: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = (int(grid[0]), int(grid[1]))
        factory = {"device": device, "dtype": dtype or torch.float32}
        self.register_buffer("pixel_mean", torch.tensor(mean, **factory).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, **factory).view(1, 3, 1, 1), persistent=False)
        self.gradient_checkpointing = False

    @property
    def num_tokens(self) -> int:
        """``gh * gw``."""
        return self.grid[0] * self.grid[1]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] -> normalised pixels in the dtype of the pixel statistics."""
        check_images(images, self.image_size)
        return ((images - self.pixel_mean) / self.pixel_std).to(self.pixel_mean.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, S, S]`` in [0, 1] -> ``tokens [B, N, out_dim]``."""
        return self.forward_pixels(self.normalize(images))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the backbone's blocks / stages in the backward pass instead of keeping
        their activations (subclasses that wrap a library model switch the library's own)."""
        self.gradient_checkpointing = enabled

    def _run(self, block: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``block(*args)``, checkpointed when :meth:`set_gradient_checkpointing` is on and grad is enabled."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``pixels [B, 3, S, S]`` -> ``tokens [B, N, out_dim]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, image_size={self.image_size}, patch_size={self.patch_size}, grid={self.grid}"


# --------------------------------------------------------------------------------------------
# PatchViT: the offline default
# --------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention through ``F.scaled_dot_product_attention``.

    Shapes: ``[B, N, width] -> [B, N, width]``.
    """

    def __init__(
        self, width: int, num_heads: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width ({width}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, device=device, dtype=dtype)
        self.proj = nn.Linear(width, width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding, flattened row-major.

    Shapes: ``[B, 3, S, S] -> [B, (S / patch_size)^2, width]``.
    """

    def __init__(
        self, patch_size: int, width: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class ViTBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (GELU MLP).

    Shapes: ``[B, N, width] -> [B, N, width]``.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(width, eps=1e-6, **factory)
        self.attn = SelfAttention(width, num_heads, **factory)
        self.norm2 = nn.LayerNorm(width, eps=1e-6, **factory)
        self.mlp = Mlp(width, int(width * mlp_ratio), width, nn.GELU, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchViT(VisionBackbone):
    """Small ViT trained from scratch: conv patch embedding + learned positions + pre-LN blocks.

    No class token; a final LayerNorm. Pixels are normalised with mean 0.5, std 0.5. Parameter
    names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``pos_embed``,
    ``blocks.i.attn.qkv``, ``norm``...), so a timm ViT built with ``class_token=False`` loads
    one to one.

    Args:
        image_size: input size in pixels (square, a multiple of ``patch_size``).
        patch_size: patch size in pixels.
        width: token width (``out_dim``).
        depth: number of transformer blocks.
        num_heads: attention heads (``width`` must be a multiple).
        mlp_ratio: MLP hidden width over ``width``.

    Shapes: ``images [B, 3, S, S]`` -> ``tokens [B, (S / patch_size)^2, width]``.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        side = image_size // patch_size
        super().__init__(width, image_size, patch_size, (side, side), SIGLIP_MEAN, SIGLIP_STD, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(patch_size, width, **factory)
        self.pos_embed = nn.Parameter(torch.empty(1, side * side, width, **factory))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(ViTBlock(width, num_heads, mlp_ratio, **factory) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6, **factory)

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed  # [B, N, D]
        for block in self.blocks:
            x = self._run(block, x)
        return self.norm(x)


class ConvNormAct(nn.Sequential):
    """``k x k`` convolution (``padding = k // 2``, no bias) -> GroupNorm -> GELU.

    Shapes: ``[B, C_in, H, W] -> [B, C_out, H / stride, W / stride]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        groups: int = 8,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        if out_channels % groups:
            raise ValueError(f"channels ({out_channels}) must be a multiple of norm_groups ({groups})")
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False, **factory),
            nn.GroupNorm(groups, out_channels, **factory),
            nn.GELU(),
        )


class ConvNet(VisionBackbone):
    """Small conv net trained from scratch: the image encoder of Diffusion Policy / DrQ-style policies.

    Each stage halves the resolution with a stride-2 :class:`ConvNormAct` and then applies
    ``convs_per_stage - 1`` residual stride-1 ones (``x + conv(x)``). A 1x1 convolution maps the
    last stage to ``width``; the ``gh x gw`` map becomes row-major tokens with learned positions
    and a final LayerNorm. Convolutions give the locality and translation equivariance a
    from-scratch ViT must learn from data, which matters with a few dozen demonstrations.
    Pixels are normalised with mean 0.5, std 0.5.

    Args:
        image_size: input size in pixels (square, a multiple of ``2 ** len(channels)``).
        channels: output channels of each stage (stride ``2 ** len(channels)`` in all).
        convs_per_stage: convolutions per stage (the first one strided).
        width: token width (``out_dim``).
        norm_groups: GroupNorm groups (every entry of ``channels`` must be a multiple).

    Shapes: ``images [B, 3, S, S]`` -> ``tokens [B, (S / 2 ** len(channels))^2, width]``.
    """

    def __init__(
        self,
        image_size: int = 96,
        channels: Sequence[int] = (32, 64, 128, 128),
        convs_per_stage: int = 2,
        width: int = 128,
        norm_groups: int = 8,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        stride = 2 ** len(channels)
        if not channels:
            raise ValueError("channels must name at least one stage")
        if image_size % stride:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of 2 ** len(channels) = {stride} (channels={list(channels)})"
            )
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1; got {convs_per_stage}")
        side = image_size // stride
        super().__init__(width, image_size, stride, (side, side), SIGLIP_MEAN, SIGLIP_STD, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.stages = nn.ModuleList()
        in_channels = 3
        for out_channels in channels:
            convs = [ConvNormAct(in_channels, out_channels, 2, groups=norm_groups, **factory)]
            convs += [ConvNormAct(out_channels, out_channels, groups=norm_groups, **factory) for _ in range(convs_per_stage - 1)]
            self.stages.append(nn.ModuleList(convs))
            in_channels = out_channels
        self.proj = nn.Conv2d(in_channels, width, 1, **factory)
        self.pos_embed = nn.Parameter(torch.empty(1, side * side, width, **factory))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.norm = nn.LayerNorm(width, eps=1e-6, **factory)

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for stage in self.stages:
            x = self._run(self._stage, stage, x)
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, gh * gw, width]
        return self.norm(tokens + self.pos_embed)

    @staticmethod
    def _stage(stage: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """One stage: the strided conv, then the residual ones."""
        down, *residual = stage
        x = down(x)
        for conv in residual:
            x = x + conv(x)
        return x
