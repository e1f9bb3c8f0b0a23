"""A transformers SigLIP vision tower as a :class:`~vlablocks.encoders.vision.VisionBackbone` (local checkpoints only)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlablocks.blocks.device import device_context

from vlablocks.encoders.vision import SIGLIP_MEAN, SIGLIP_STD, Device, VisionBackbone

logger = logging.getLogger(__name__)


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
