"""Any timm backbone as a :class:`~vlablocks.encoders.vision.VisionBackbone` (local ``.safetensors`` weights only)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vlablocks.blocks.device import device_context

from vlablocks.encoders.vision import Device, VisionBackbone

logger = logging.getLogger(__name__)

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
