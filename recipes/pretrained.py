"""Load pretrained weights named by a recipe's ``pretrained:`` section (local directories only).

Layouts:

- ``transformers``: a LLaMA / Mistral / Gemma decoder saved by transformers (``LlamaModel`` or
  ``LlamaForCausalLM`` keys, ``model.safetensors`` or sharded ``*.safetensors``).
- ``llava``: a LLaVA-style checkpoint: the LLM under ``model.`` (``model.layers.*``,
  ``model.embed_tokens``, ``model.norm``), the projector under ``model.mm_projector.*`` and,
  if present, a SigLIP/CLIP tower under ``model.vision_tower.vision_tower.*``.

The decoder layers go to the fusion stack's base expert, ``embed_tokens`` to the text
embedding, the projector and tower to the policy's projector and vision encoder. Only
safetensors files are read: nothing is unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from vlablocks.blocks.transformers_import import load_base_from_transformers
from vlablocks.encoders.vision import llava_projector_state_dict

from vlablocks.checkpoint import read_safetensors
from vlablocks.vla import VLA

logger = logging.getLogger(__name__)

LLAVA_PROJECTOR = "model.mm_projector."
LLAVA_VISION_TOWER = "model.vision_tower.vision_tower."


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, or of every ``*.safetensors`` file in a directory."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights at {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors


def load_pretrained(vla: VLA, llm: str, layout: Literal["transformers", "llava"] = "transformers") -> None:
    """Copy a local checkpoint into ``vla`` (see the module docstring for the layouts).

    Args:
        vla: the policy (derived by the builder).
        llm: directory (or file) of the checkpoint.
        layout: ``transformers`` or ``llava``.
    """
    tensors = read_weights(llm)
    stack = vla.head.denoiser.stack
    if layout == "llava":
        projector = {k[len(LLAVA_PROJECTOR) :]: v for k, v in tensors.items() if k.startswith(LLAVA_PROJECTOR)}
        tower = {k[len(LLAVA_VISION_TOWER) :]: v for k, v in tensors.items() if k.startswith(LLAVA_VISION_TOWER)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith((LLAVA_PROJECTOR, LLAVA_VISION_TOWER))}
        if projector:
            vla.projector.load_state_dict(llava_projector_state_dict(projector))
            logger.info("loaded the mm_projector from %s", llm)
        if tower:
            if vla.vision is None or not hasattr(vla.vision, "load_tower_state_dict"):
                raise ValueError(f"{llm} has a vision tower but the policy's vision encoder cannot take it")
            vla.vision.load_tower_state_dict(tower)
            logger.info("loaded the vision tower from %s", llm)
    rest = load_base_from_transformers(stack, tensors)
    embedding = rest.get("embed_tokens.weight")
    if embedding is not None:
        vla.text.load_embedding(embedding)
    logger.info("loaded %d base layers%s from %s", stack.num_layers, " and the token embedding" if embedding is not None else "", llm)
