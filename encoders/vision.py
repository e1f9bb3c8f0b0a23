"""Vision backbones (images in [0, 1] -> patch tokens) and projectors to the LLM width.

Every backbone is a :class:`VisionBackbone`: ``forward(images [B, 3, H, W] in [0, 1]) ->
tokens [B, N, out_dim]`` with ``N = gh * gw`` patch tokens in row-major order (like a ViT), so a
geometry encoder can attach one 3D point to each token. Each backbone owns its pixel
normalisation; nothing upstream normalises. Four backbones:

- :class:`PatchViT`: a small ViT trained from scratch, the offline default;
- :class:`ConvNet`: a small conv net trained from scratch (locality built in: the choice for
  learning from a few dozen demonstrations);
- :class:`SiglipVision`: a transformers SigLIP vision tower from a local checkpoint (or built
  from a config without weights, e.g. on the meta device);
- :class:`TimmVision`: any timm backbone, ViT-like (prefix tokens dropped) or convolutional
  (feature map flattened).

Projectors map ``out_dim`` to the LLM width: :class:`LinearProjector` (pi0 / PaliGemma) and
:class:`Mlp2xGeluProjector` (LLaVA's ``mlp2x_gelu``; :func:`llava_projector_state_dict` renames
LLaVA checkpoint keys onto it).

Nothing here downloads: transformers loads with ``local_files_only=True`` and timm models are
created with ``pretrained=False`` or from a local weights file.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlablocks.blocks.device import device_context
from vlablocks.blocks.mlp import Mlp

logger = logging.getLogger(__name__)

Device = torch.device | str | None

#: SigLIP's pixel convention (``SiglipImageProcessor``): ``(x - 0.5) / 0.5`` maps [0, 1] to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

#: ``SiglipVisionConfig`` keyword arguments of SigLIP So400m/14 at 224 px (pi0's vision tower):
#: 27 layers, width 1152, MLP 4304, 16 heads, patch 14 -> a 16 x 16 grid of 256 tokens.
SIGLIP_SO400M_PATCH14_224: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
}


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


# --------------------------------------------------------------------------------------------
# SigLIP (transformers)
# --------------------------------------------------------------------------------------------


def _siglip_pixel_stats(path: str) -> tuple[Sequence[float], Sequence[float]]:
    """``image_mean`` / ``image_std`` of the checkpoint's preprocessor_config.json, else 0.5 / 0.5."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return SIGLIP_MEAN, SIGLIP_STD
    processor = json.loads(file.read_text())
    logger.debug("SigLIP pixel statistics from %s", file)
    return processor.get("image_mean", SIGLIP_MEAN), processor.get("image_std", SIGLIP_STD)


class SiglipVision(VisionBackbone):
    """SigLIP vision tower of transformers: patch tokens of one layer, no pooling head.

    Give exactly one of ``path`` (a local ``SiglipVisionModel`` checkpoint, loaded with
    ``from_pretrained(path, local_files_only=True, use_safetensors=True)``: never a pickled
    ``.bin``) or ``config`` (``SiglipVisionConfig``
    keyword arguments, e.g. ``config.to_dict()``: random weights, e.g. ``device="meta"`` to size a
    full recipe; see :data:`SIGLIP_SO400M_PATCH14_224`).

    Which tokens (transformers 5 ``SiglipVisionModel``: ``hidden_states`` holds ``L + 1``
    entries, index 0 the patch embeddings, index ``i`` the output of layer ``i``, all WITHOUT
    ``post_layernorm``; ``last_hidden_state`` is ``post_layernorm(hidden_states[-1])``):

    - ``select_layer=None``: ``last_hidden_state``, the post-layernorm output (pi0 / PaliGemma);
    - ``select_layer=i``: ``hidden_states[i]`` without the post-layernorm, negative from the
      end (LLaVA uses ``-2``, the penultimate layer).

    Layers after the selected one, the unused ``post_layernorm`` and the attention-pooling head
    are removed from ``self.model`` (no wasted compute, every parameter gets a gradient), so
    this module's state dict holds only the kept weights.

    Pixels are normalised with the checkpoint's ``preprocessor_config.json`` ``image_mean`` /
    ``image_std`` when present, else SigLIP's 0.5 / 0.5.

    Args:
        path: local checkpoint directory.
        config: ``SiglipVisionConfig`` keyword arguments.
        select_layer: see above.
        device: where the model is built (``config``) or moved (``path``).
        dtype: parameter dtype (``None``: float32, also for checkpoints stored in bf16).

    Shapes: ``images [B, 3, S, S]`` -> ``tokens [B, (S / patch)^2, hidden_size]``.
    """

    def __init__(
        self,
        path: str | None = None,
        config: Mapping[str, Any] | None = None,
        select_layer: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if (path is None) == (config is None):
            raise ValueError(
                "SiglipVision needs exactly one of path (a local checkpoint) or config "
                f"(SiglipVisionConfig keyword arguments); got path={path!r}, config={config!r}"
            )
        dtype = dtype or torch.float32
        if path is not None:
            model = SiglipVisionModel.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype)
            mean, std = _siglip_pixel_stats(path)
        else:
            with device_context(device):
                model = SiglipVisionModel(SiglipVisionConfig(**config))
            mean, std = SIGLIP_MEAN, SIGLIP_STD
        model.to(device=device, dtype=dtype)
        #: the architecture as built, before trimming: what a saved recipe needs to rebuild it.
        self_config = {key: getattr(model.config, key) for key in SIGLIP_ARCHITECTURE_KEYS}
        _keep_selected_layers(model, select_layer)

        cfg = model.config
        side = cfg.image_size // cfg.patch_size
        super().__init__(cfg.hidden_size, cfg.image_size, cfg.patch_size, (side, side), mean, std, device, dtype)
        self.select_layer = select_layer
        self.model = model
        self.architecture = self_config

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """transformers' own per-layer checkpointing of the SigLIP encoder."""
        super().set_gradient_checkpointing(enabled)
        model = self.model
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            enable, disable, kwargs = (model.activation_checkpointing_enable, model.activation_checkpointing_disable,
                                       "activation_checkpointing_kwargs")
        else:
            enable, disable, kwargs = (model.gradient_checkpointing_enable, model.gradient_checkpointing_disable,
                                       "gradient_checkpointing_kwargs")
        if enabled:
            enable(**{kwargs: {"use_reentrant": False}})
        else:
            disable()

    def export_recipe(self, node: Mapping[str, Any], directory: Path) -> dict[str, Any]:
        """The recipe node to save with a checkpoint: the architecture instead of a weights path."""
        return {**{k: v for k, v in node.items() if k != "path"}, "config": dict(self.architecture)}

    @torch.no_grad()
    def load_tower_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a whole SigLIP tower's weights (e.g. the vision tower of a LLaVA checkpoint).

        Keys are ``SiglipVisionModel`` keys, optionally under ``vision_model.``. Weights of the
        parts this module removed (later layers, ``post_layernorm``, ``head``) are skipped; any
        other unknown key, or a missing one, raises ValueError.
        """
        own = self.model.state_dict()
        kept: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key.removeprefix("vision_model.")
            if name in own:
                kept[name] = value
            elif not self._removed(name):
                raise ValueError(f"state_dict key {key!r} is not a parameter of this SigLIP tower")
        missing = sorted(set(own) - set(kept))
        if missing:
            raise ValueError(f"state_dict lacks {len(missing)} SigLIP tower weights, e.g. {missing[:3]}")
        self.model.load_state_dict(kept)

    def _removed(self, name: str) -> bool:
        """Whether ``name`` belongs to a part that ``_keep_selected_layers`` removed."""
        if name.startswith("head.") or (name.startswith("post_layernorm.") and self.select_layer is not None):
            return True
        layer = re.match(r"encoder\.layers\.(\d+)\.", name)
        return layer is not None and int(layer.group(1)) >= len(self.model.encoder.layers)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, select_layer={self.select_layer}"


#: the ``SiglipVisionConfig`` fields that define the architecture.
SIGLIP_ARCHITECTURE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps",
)


def _keep_selected_layers(model: nn.Module, select_layer: int | None) -> None:
    """Cut a ``SiglipVisionModel`` so that ``last_hidden_state`` is the selected output."""
    model.use_head = False  # the attention-pooling head is never used for tokens
    model.config.vision_use_head = False
    if hasattr(model, "head"):
        del model.head
    if select_layer is None:
        return
    num_layers = len(model.encoder.layers)
    if not -(num_layers + 1) <= select_layer <= num_layers:
        raise ValueError(
            f"select_layer must index the {num_layers + 1} hidden states (embeddings + {num_layers} "
            f"layers), i.e. lie in [{-(num_layers + 1)}, {num_layers}], or be None; got {select_layer}"
        )
    keep = select_layer % (num_layers + 1)
    model.encoder.layers = model.encoder.layers[:keep]
    model.config.num_hidden_layers = keep
    model.post_layernorm = nn.Identity()


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def _sequence_tokens(features: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    return features[:, num_prefix_tokens:]


def _nchw_tokens(features: torch.Tensor) -> torch.Tensor:
    return features.flatten(2).transpose(1, 2)


def _nhwc_tokens(features: torch.Tensor) -> torch.Tensor:
    return features.flatten(1, 2)


def _token_layout(
    model: nn.Module, features: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, int], int]:
    """From a dry-run ``forward_features`` output: (features -> tokens, grid, out_dim)."""
    if features.ndim == 3:  # [B, prefix + N, C]: ViT-like
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        length = features.shape[1] - prefix
        grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ())
        if len(grid) != 2:
            side = math.isqrt(length)
            grid = (side, side)
        if grid[0] * grid[1] != length:
            raise ValueError(
                f"cannot infer the patch grid of {type(model).__name__}: {length} tokens after "
                f"{prefix} prefix tokens, grid guess {grid}"
            )
        return partial(_sequence_tokens, num_prefix_tokens=prefix), grid, features.shape[2]
    if features.ndim == 4 and str(getattr(model, "output_fmt", "NCHW")) == "NHWC":
        return _nhwc_tokens, tuple(features.shape[1:3]), features.shape[3]
    if features.ndim == 4:
        return _nchw_tokens, tuple(features.shape[2:4]), features.shape[1]
    raise ValueError(
        f"forward_features of {type(model).__name__} returned shape {tuple(features.shape)}; "
        "expected [B, N, C] or a [B, C, h, w] / [B, h, w, C] feature map"
    )


def _load_timm_weights(path: str, classifier: str | Sequence[str] | None) -> dict[str, torch.Tensor]:
    """State dict from a ``.safetensors`` file (``module.`` prefixes stripped), classifier dropped.

    Only safetensors is read: a torch/pickle file could run code when loaded, and a checkpoint's
    recipe must never make vlablocks unpickle anything.
    """
    if not Path(path).is_file():
        raise ValueError(f"weights_path must be an existing local file; got {path!r}")
    if Path(path).suffix != ".safetensors":
        raise ValueError(
            f"weights_path must be a .safetensors file (vlablocks reads no pickled weights); got {path!r}: convert it "
            "once with safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors')"
        )
    state = {k.removeprefix("module."): v for k, v in load_file(path).items()}
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for name in names:
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    return state


class TimmVision(VisionBackbone):
    """Any timm backbone: ``forward_features`` as patch tokens.

    ``timm.create_model(model_name, num_classes=0, img_size=image_size)`` (``img_size`` only for
    models whose pretrained config has a fixed input size, i.e. ViT-like ones). ViT-like outputs
    ``[B, prefix + N, C]`` drop the ``model.num_prefix_tokens`` class/register tokens; conv
    feature maps ``[B, C, h, w]`` (or timm's NHWC maps) are flattened row-major to
    ``[B, h * w, C]``. ``grid`` and ``out_dim`` come from a dry run of a copy on the meta device;
    ``patch_size`` is ``image_size // gw`` (the effective stride for conv nets). Pixels are
    normalised with the model's ``pretrained_cfg`` mean / std.

    ``weights_path`` (a local ``.safetensors`` file or a torch state dict, loaded with
    ``weights_only=True``; EMA weights are preferred when the file holds both) goes through
    timm's own pretrained loading, so the model's checkpoint filter applies (e.g. resampling a
    ViT's position embedding to ``image_size``); classifier weights are dropped, and every other
    key must match (ValueError otherwise). Parameters that only timm's pooling head uses
    (``fc_norm``, an attention pool) get no gradient: freeze them when training with DDP.

    Args:
        model_name: a timm architecture name, optionally with a pretrained tag
            (``"vit_base_patch16_224.augreg_in21k"``); hub names are rejected.
        image_size: input size in pixels (square).
        weights_path: local ``.safetensors`` weights file; ``None`` keeps timm's random initialisation.

    Shapes: ``images [B, 3, S, S]`` -> ``tokens [B, gh * gw, out_dim]``.
    """

    def __init__(
        self,
        model_name: str,
        image_size: int,
        weights_path: str | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        import timm
        from timm.models import get_pretrained_cfg

        if model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
            raise ValueError(
                f"model_name must be a timm architecture name (TimmVision never downloads; pass the "
                f"weights as weights_path); got {model_name!r}"
            )
        if not timm.is_model(model_name):
            raise ValueError(
                f"model_name {model_name!r} is not a timm model; list candidates with "
                f"timm.list_models('*{model_name.split('.')[0].split('_')[0]}*')"
            )
        pretrained_cfg = get_pretrained_cfg(model_name)
        fixed_size = bool(getattr(pretrained_cfg, "fixed_input_size", False))
        kwargs = {"num_classes": 0, "img_size": image_size if fixed_size else None}

        with torch.device("meta"):
            probe = timm.create_model(model_name, pretrained=False, **kwargs).eval()
            features = probe.forward_features(torch.empty(1, 3, image_size, image_size))
        to_tokens, grid, out_dim = _token_layout(probe, features)
        cfg = probe.pretrained_cfg

        with device_context(device):
            if weights_path is None:
                model = timm.create_model(model_name, pretrained=False, **kwargs)
            else:
                state = _load_timm_weights(weights_path, cfg.get("classifier"))
                overlay = {"state_dict": state, "num_classes": 0, "file": None, "source": ""}
                try:
                    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
                except RuntimeError as error:
                    raise ValueError(
                        f"weights_path {weights_path!r} does not fit timm model {model_name!r}: {error}"
                    ) from error
        if dtype is not None:
            model.to(dtype)

        super().__init__(out_dim, image_size, image_size // grid[1], grid, cfg["mean"], cfg["std"], device, dtype)
        self.model_name = model_name
        self.model = model
        self._to_tokens = to_tokens

    def forward_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._to_tokens(self.model.forward_features(pixels))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """timm's own checkpointing (``set_grad_checkpointing``) of the backbone's blocks."""
        super().set_gradient_checkpointing(enabled)
        self.model.set_grad_checkpointing(enabled)

    def export_recipe(self, node: Mapping[str, Any], directory: Path) -> dict[str, Any]:
        """The recipe node to save with a checkpoint: no weights path (the weights are saved)."""
        return {k: v for k, v in node.items() if k != "weights_path"}

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, {super().extra_repr()}"


# --------------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------------


class LinearProjector(nn.Linear):
    """One linear layer from the vision width to the LLM width (pi0 / PaliGemma).

    Args:
        in_dim: vision width.
        out_dim: LLM width.
        bias: whether the layer has a bias.

    Shapes: ``[B, N, in_dim] -> [B, N, out_dim]``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, bias: bool = True, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(in_dim, out_dim, bias=bias, device=device, dtype=dtype)


class Mlp2xGeluProjector(Mlp):
    """LLaVA's ``mlp2x_gelu``: ``Linear(in_dim, out_dim)``, exact GELU, ``Linear(out_dim, out_dim)``.

    The toolkit :class:`~vlablocks.blocks.mlp.Mlp` (parameters ``fc1``, ``fc2``); LLaVA
    checkpoints load through :func:`llava_projector_state_dict`.

    Shapes: ``[B, N, in_dim] -> [B, N, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_dim, out_dim, out_dim, nn.GELU, device=device, dtype=dtype)


def pixel_shuffle(tokens: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """SmolVLM's pixel shuffle: merge each ``r x r`` block of a square token grid into one token.

    Token ``(i, j)`` of the ``s x s`` grid goes to token ``(i // r, j // r)``, channel block
    ``(i % r) * r + (j % r)`` (so SmolVLM connector weights apply unchanged).

    Shapes: ``[B, s * s, D] -> [B, (s / r)^2, D * r * r]``.
    """
    batch, length, dim = tokens.shape
    side = math.isqrt(length)
    if side * side != length or side % scale_factor:
        raise ValueError(
            f"pixel shuffle needs a square token grid whose side is a multiple of scale_factor={scale_factor}; "
            f"got {length} tokens"
        )
    return rearrange(tokens, "b (h r1 w r2) d -> b (h w) (r1 r2 d)", r1=scale_factor, r2=scale_factor, w=side // scale_factor)


class PixelShuffleProjector(nn.Module):
    """SmolVLM's connector: :func:`pixel_shuffle` (``r^2`` fewer tokens), then ``Linear(D r^2 -> out_dim)`` without bias.

    Args:
        in_dim: vision width ``D``.
        out_dim: LLM width.
        scale_factor: ``r``, the side of the merged token blocks (SmolVLM: 4, 1024 -> 64 tokens).

    Shapes: ``[B, s * s, in_dim] -> [B, (s / r)^2, out_dim]``.
    """

    def __init__(
        self, in_dim: int, out_dim: int, scale_factor: int = 4, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if scale_factor < 1:
            raise ValueError(f"scale_factor must be >= 1; got {scale_factor}")
        self.scale_factor = scale_factor
        self.proj = nn.Linear(in_dim * scale_factor**2, out_dim, bias=False, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(tokens, self.scale_factor))


#: LLaVA ``nn.Sequential`` index -> projector parameter prefix (index 1 is the GELU).
_LLAVA_PROJECTOR_LAYERS = {"0": "fc1", "2": "fc2"}


def llava_projector_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename LLaVA projector keys for :class:`Mlp2xGeluProjector` or :class:`LinearProjector`.

    ``{prefix}0.weight -> fc1.weight``, ``{prefix}2.bias -> fc2.bias`` (mlp2x_gelu) and
    ``{prefix}weight -> weight`` (linear). With the default ``prefix=""`` the keys are the
    projector's own (``0.weight``, ...) and every key must be one; with
    ``prefix="model.mm_projector."`` the projector is picked out of a whole LLaVA checkpoint and
    other keys are ignored. A key under ``prefix`` that fits neither projector (e.g.
    ``mlp3x_gelu``'s ``4.weight``) raises. Load the result with ``projector.load_state_dict``.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        layer, _, param = rest.rpartition(".")
        if param not in ("weight", "bias") or (layer and layer not in _LLAVA_PROJECTOR_LAYERS):
            raise ValueError(
                f"state_dict key {key!r} is not a mlp2x_gelu ({prefix}{{0,2}}.{{weight,bias}}) or linear "
                f"({prefix}{{weight,bias}}) projector parameter"
            )
        renamed[f"{_LLAVA_PROJECTOR_LAYERS[layer]}.{param}" if layer else param] = value
    if not renamed:
        raise ValueError(f"state_dict has no key starting with prefix {prefix!r}")
    return renamed
