"""Load pretrained weights named by a recipe's ``pretrained:`` section (local directories only).

Layouts:

- ``transformers``: a LLaMA / Mistral / Gemma decoder saved by transformers (``LlamaModel`` or
  ``LlamaForCausalLM`` keys, ``model.safetensors`` or sharded ``*.safetensors``).
- ``llava``: a LLaVA-style checkpoint: the LLM under ``model.`` (``model.layers.*``,
  ``model.embed_tokens``, ``model.norm``), the projector under ``model.mm_projector.*`` and,
  if present, a SigLIP/CLIP tower under ``model.vision_tower.vision_tower.*``.
- ``paligemma``: a ``PaliGemmaForConditionalGeneration`` checkpoint (pi0's VLM): the Gemma
  decoder under ``language_model.model.``, the SigLIP tower under ``vision_tower.`` (or
  ``vision_tower.vision_model.``) and the linear projector under
  ``multi_modal_projector.linear.``, as saved files name them; transformers 5's module names
  (``model.language_model.`` ...) are read as well. ``lm_head`` (tied to the embedding) is not
  used.

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
from vlablocks.encoders.projectors import llava_projector_state_dict

from vlablocks.io.manifest import read_safetensors
from vlablocks.policy.vla import VLA

logger = logging.getLogger(__name__)

LLAVA_PROJECTOR = "model.mm_projector."
LLAVA_VISION_TOWER = "model.vision_tower.vision_tower."
#: PaliGemma parts -> their key prefixes, longest first: the module names of transformers 5
#: (``model.*``), the names its ``save_pretrained`` writes, and those of the published checkpoints.
PALIGEMMA_PREFIXES = {
    "language": ("model.language_model.", "language_model.model."),
    "tower": ("model.vision_tower.", "vision_tower.vision_model.", "vision_tower."),
    "projector": ("model.multi_modal_projector.linear.", "multi_modal_projector.linear."),
}
PALIGEMMA_UNUSED = ("lm_head.", "language_model.lm_head.")
#: where a checkpoint that ties its output layer to the token embedding may keep only the former
#: (released pi0 checkpoints: ``paligemma.lm_head.weight`` once the policy prefix is removed).
TIED_EMBEDDING_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


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


def _split_paligemma(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], ...]:
    """``(language, tower, projector)`` tensors of a PaliGemma checkpoint, prefixes removed."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PALIGEMMA_PREFIXES}
    unknown = []
    for key, value in tensors.items():
        part = next(((name, prefix) for name, prefixes in PALIGEMMA_PREFIXES.items() for prefix in prefixes
                     if key.startswith(prefix)), None)
        if part is not None:
            parts[part[0]][key[len(part[1]):]] = value
        elif not key.startswith(PALIGEMMA_UNUSED):
            unknown.append(key)
    if unknown or not parts["language"]:
        expected = sorted(p for prefixes in PALIGEMMA_PREFIXES.values() for p in prefixes)
        raise ValueError(f"{source} is not a PaliGemma checkpoint: expected keys under {expected}; "
                         f"got e.g. {(unknown or sorted(tensors))[:3]}")
    return parts["language"], parts["tower"], parts["projector"]


def load_pretrained(vla: VLA, llm: str, layout: Literal["transformers", "llava", "paligemma"] = "transformers") -> None:
    """Copy a local checkpoint into ``vla`` (see the module docstring for the layouts).

    Args:
        vla: the policy (derived by the builder).
        llm: directory (or file) of the checkpoint.
        layout: ``transformers``, ``llava`` or ``paligemma``.
    """
    tensors = read_weights(llm)
    tied = next((tensors[k] for k in TIED_EMBEDDING_KEYS if k in tensors), None)
    stack = vla.backbone
    tower: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    if layout == "paligemma":
        tensors, tower, projector = _split_paligemma(tensors, llm)
    elif layout == "llava":
        projector = {k[len(LLAVA_PROJECTOR) :]: v for k, v in tensors.items() if k.startswith(LLAVA_PROJECTOR)}
        projector = llava_projector_state_dict(projector) if projector else {}
        tower = {k[len(LLAVA_VISION_TOWER) :]: v for k, v in tensors.items() if k.startswith(LLAVA_VISION_TOWER)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith((LLAVA_PROJECTOR, LLAVA_VISION_TOWER))}
    if projector:
        vla.projector.load_state_dict(projector)
        logger.info("loaded the projector from %s", llm)
    if tower:
        if vla.vision is None or not hasattr(vla.vision, "load_tower_state_dict"):
            raise ValueError(f"{llm} has a vision tower but the policy's vision encoder cannot take it (use type: siglip)")
        vla.vision.load_tower_state_dict(tower)
        logger.info("loaded the vision tower from %s", llm)
    rest = load_base_from_transformers(stack, tensors)
    embedding = rest.get("embed_tokens.weight", tied)
    if embedding is None:
        raise ValueError(f"{llm} has no token embedding (embed_tokens.weight, nor a tied {' / '.join(TIED_EMBEDDING_KEYS)}): "
                         "the policy's language conditioning would stay random")
    vla.text.load_embedding(embedding)
    source = "embed_tokens" if "embed_tokens.weight" in rest else "the tied lm_head"
    logger.info("loaded %d base layers and the token embedding (%s) from %s", stack.num_layers, source, llm)
