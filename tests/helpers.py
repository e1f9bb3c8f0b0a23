"""Tiny seeded models shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlablocks.blocks.attention import HeadSpace
from vlablocks.blocks.fusion import DeepFusionStack, ExpertSpec, every_kth_layer
from vlablocks.blocks.masks import block_causal_mask, positions_from_pad
from vlablocks.data import DatasetWriter

SPACE = HeadSpace(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500.0)


def tiny_stack(
    base_width: int = 64,
    base_layers: int = 4,
    expert_width: int = 32,
    expert_layers: tuple[int, ...] | None = every_kth_layer(4, 2),
    adarms: bool = False,
    seed: int = 0,
    **stack_kwargs,
) -> DeepFusionStack:
    """Base 64 x 4 layers, expert 32 wide at layers 0 and 2, head space 4 x 16 with 2 kv heads."""
    torch.manual_seed(seed)
    experts = [
        ExpertSpec("vlm", base_width, 2 * base_width, SPACE),
        ExpertSpec("action", expert_width, 2 * expert_width, SPACE, layers=expert_layers,
                   adarms_cond_dim=expert_width if adarms else None),
    ]
    stack = DeepFusionStack(experts, base_layers, **stack_kwargs)
    with torch.no_grad():  # make the (zero-init) Gemma/AdaRMS style parameters non-trivial
        for name, param in stack.named_parameters():
            if "modulation" in name:
                param.normal_(std=0.1)
    return stack


def random_prefix(batch: int = 2, length: int = 7, width: int = 64, seed: int = 1):
    """Prefix embeddings with the last two tokens of sample 1 padded; bidirectional (ar 0)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, width, generator=gen)
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[-1, -2:] = False
    ar = torch.zeros(batch, length, dtype=torch.long)
    return embeds, pad, ar


def joint_mask(prefix_pad, prefix_ar, suffix_pad, suffix_ar):
    pad = torch.cat([prefix_pad, suffix_pad], 1)
    ar = torch.cat([prefix_ar, suffix_ar.expand(prefix_pad.shape[0], -1)], 1)
    return block_causal_mask(pad, ar), positions_from_pad(pad)


SENTENCES = ["pick up the red block", "open the drawer", "push the button down", "close the window"]
TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "patch_size": 8, "image_size": 32}


def save_tiny_tokenizer(path) -> str:
    """A WordLevel tokenizer trained in memory, wrapped in PreTrainedTokenizerFast, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    raw.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    wrapped.save_pretrained(path)
    return str(path)


def save_tiny_siglip(path, seed: int = 0):
    """A tiny random SiglipVisionModel saved with save_pretrained; returns (path, model)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).eval()
    model.save_pretrained(path)
    return str(path), model


def toy_episode(length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One episode of ``write_toy_dataset``'s layout: a 32 px camera, 4-dim state and actions."""
    return {
        "observation.state": rng.normal(size=(length, 4)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(length, 4)).astype(np.float32),
        "observation.images.corner": rng.integers(0, 256, size=(length, 32, 32, 3), dtype=np.uint8),
        "observation.intrinsics.corner": np.tile(np.array([[32.0, 0, 16], [0, 32, 16], [0, 0, 1]], np.float32), (length, 1, 1)),
    }


def write_toy_dataset(root: Path, lengths: tuple[int, ...] = (6, 5), seed: int = 0, **kwargs) -> Path:
    """A tiny LeRobot-layout dataset that fits ``tiny_pi0`` with ``policy.state_dim=4 action_dim=4``:
    one 32 px camera, 4-dim state and actions, one task."""
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(root, fps=10, cameras=["corner"], state_dim=4, action_dim=4, **kwargs)
    for length in lengths:
        writer.add_episode(toy_episode(length, rng), "push the button")
    return writer.finalize()
