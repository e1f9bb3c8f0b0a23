"""Recipes: every bundled recipe builds, tiny ones run, full-size parameter counts match the references."""

import math

import pytest
import torch
from transformers import GemmaConfig, GemmaModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from vlablocks.policy.checks import smoke_check
from vlablocks.recipes.builder import build
from vlablocks.recipes.loader import bundled_recipes

ALL = sorted(bundled_recipes())
TINY = [name for name in ALL if name.startswith("tiny_")]
MID = [name for name in ALL if name.startswith("mid_")]  # benchmark sizes between tiny and full
MT10 = [name for name in ALL if name.startswith("mt10_")]  # the docs/results.md comparison (CPU-trainable)
TUTORIAL = [name for name in ALL if name.startswith("tutorial_")]  # docs/tutorial.md
FULL = [name for name in ALL if not name.startswith(("tiny_", "mid_", "mt10_", "tutorial_"))]


def count(params) -> int:
    return sum(p.numel() for p in params)


def meta_count(model_cls, config, skip=()) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def test_every_full_recipe_has_a_tiny_sibling():
    assert FULL and all(f"tiny_{name}" in TINY for name in FULL)
    assert MID and all(name.removeprefix("mid_") in FULL for name in MID)


@pytest.mark.parametrize("name", FULL)
def test_full_size_recipe_builds_on_meta(name):
    vla = build(name, device="meta")
    assert all(p.device.type == "meta" for p in vla.parameters())


@pytest.mark.parametrize("name", TINY + MID + MT10 + TUTORIAL)
def test_tiny_recipe_runs_forward_backward_and_predict(name):
    torch.manual_seed(0)
    vla = build(name)
    with torch.no_grad():  # AdaRMS is zero-initialised (adaLN-Zero: every gated branch starts
        for n, p in vla.named_parameters():  # closed); open it to check the wiring behind it
            if "modulation" in n:
                p.normal_(std=0.02)
    report = smoke_check(vla, batch_size=2)
    assert math.isfinite(report.loss) and report.loss > 0
    assert report.action_shape == (2, vla.config.horizon, vla.config.action_dim)
    # every trainable parameter of the action path gets a gradient; only weights of the streams
    # the action expert reads (the base, a state expert) may get none, above its last layer
    stack = vla.backbone
    read = [0] + ([vla.head.denoiser.state_expert] if getattr(vla.head.denoiser, "state_expert", None) else [])
    allowed = {f"head.denoiser.stack.{n}" for e in read for n, _ in stack.expert_named_parameters(e)}
    assert set(report.parameters_without_grad) <= allowed, set(report.parameters_without_grad) - allowed


def expert_count(vla, index: int) -> int:
    return count(p for _, p in vla.backbone.expert_named_parameters(index))


def test_llava3d_parameter_counts_match_llama_7b():
    vla = build("llava3d_deepfusion", device="meta")
    llama = LlamaConfig(rms_norm_eps=1e-5)  # transformers' LlamaConfig defaults are LLaMA-7B
    decoder_and_embedding = meta_count(LlamaModel, llama)
    ours = expert_count(vla, 0) + count(vla.text.parameters())
    assert ours == decoder_and_embedding
    full_causal_lm = meta_count(LlamaForCausalLM, llama)  # 6.74e9 with the LM head we do not need
    assert abs(ours - full_causal_lm) / full_causal_lm < 0.02
    assert 6.6e9 < ours < 6.75e9


def gemma(width, mlp, vocab=257152):
    return GemmaConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=18, num_attention_heads=8,
                       num_key_value_heads=1, head_dim=256, vocab_size=vocab)


def test_pi0_parameter_counts_match_gemma_2b_and_300m():
    for name in ("pi0", "pi05"):
        vla = build(name, device="meta")
        assert expert_count(vla, 0) + count(vla.text.parameters()) == meta_count(GemmaModel, gemma(2048, 16384))
        expert = expert_count(vla, 1)
        reference = meta_count(GemmaModel, gemma(1024, 4096), skip=("embed_tokens",))
        if name == "pi0":
            assert expert == reference  # ~311M: gemma_300m's layers and final norm
        else:  # adaRMS: each norm is a Dense(1024 -> 3 * 1024) instead of a scale vector
            norms = 18 * 2 + 1
            assert expert == reference + norms * (1024 * 3 * 1024 + 3 * 1024 - 1024)


def test_smolvla_uses_the_first_half_of_smolvlm2_and_a_075x_expert():
    vla = build("smolvla", device="meta")
    smol = LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=16, num_attention_heads=15,
                       num_key_value_heads=5, head_dim=64, vocab_size=49280, tie_word_embeddings=True)
    assert expert_count(vla, 0) + count(vla.text.parameters()) == meta_count(LlamaModel, smol)
    stack = vla.backbone
    assert stack.experts[1].width == 720 and stack.cross_attention_layers == tuple(range(1, 16, 2))
