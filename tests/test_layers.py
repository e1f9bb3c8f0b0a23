"""Norms, gated MLP, RoPE and MultiExpertAttention against transformers' LLaMA / Gemma modules."""

import pytest
import torch
from torch import nn
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from vlablocks.blocks.attention import ATTENTION_BACKENDS, HeadSpace, MultiExpertAttention, get_attention_backend
from vlablocks.blocks.masks import as_additive_mask, block_causal_mask, positions_from_pad
from vlablocks.blocks.dit import DiT, DiTBlock
from vlablocks.blocks.mlp import GatedMlp, GeluTanh, Mlp
from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm, rms_normalize
from vlablocks.blocks.quantized import Int8DynamicLinear, quantize_linears
from vlablocks.blocks.rope import apply_rope, rope_cos_sin

torch.manual_seed(0)


def llama_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=32, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    base.update(kw)
    return LlamaConfig(**base)


def test_rmsnorm_matches_llama_and_gemma():
    x = torch.randn(2, 5, 64)
    ours, ref = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)

    ours, ref = RMSNorm(64, eps=1e-6, unit_offset=True), GemmaRMSNorm(64, eps=1e-6)
    assert torch.equal(ours.weight, torch.zeros(64))  # Gemma's zero-init weight
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    assert ours(x.bfloat16()).dtype == torch.bfloat16


def test_adarms_is_plain_rms_with_closed_gate_at_init_and_follows_the_formula():
    norm = AdaRMSNorm(8, cond_dim=6)
    x, cond = torch.randn(3, 4, 8), torch.randn(3, 6)
    y, gate = norm(x, cond)
    torch.testing.assert_close(y, rms_normalize(x, 1e-6))
    assert gate.shape == (3, 1, 8) and torch.equal(gate, torch.zeros_like(gate))
    with torch.no_grad():
        norm.modulation.weight.normal_()
        norm.modulation.bias.normal_()
    y, gate = norm(x, cond)
    mod = cond @ norm.modulation.weight.T + norm.modulation.bias
    scale, shift, expected_gate = mod[:, None, :8], mod[:, None, 8:16], mod[:, None, 16:]
    n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, n * (1 + scale) + shift)
    torch.testing.assert_close(gate, expected_gate)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_gated_mlp_matches_transformers(family):
    if family == "llama":
        ref, ours = LlamaMLP(llama_config()), GatedMlp(64, 96, nn.SiLU)
    else:
        cfg = GemmaConfig(hidden_size=64, intermediate_size=96, hidden_act="gelu_pytorch_tanh")
        ref, ours = GemmaMLP(cfg), GatedMlp(64, 96, GeluTanh)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_rope_matches_transformers_llama():
    cfg = llama_config()
    rotary = LlamaRotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 2, 3, 3, 4], [5, 9, 100, 7, 2, 0]])
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos_ref, sin_ref = rotary(q, positions)
    cos, sin = rope_cos_sin(positions, 16, 500.0)
    torch.testing.assert_close(cos, cos_ref, atol=0, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=0, rtol=0)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref, atol=0, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", sorted(ATTENTION_BACKENDS))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_single_expert_equals_llama_attention(backend, kv_heads):
    cfg = llama_config(num_key_value_heads=kv_heads, attention_bias=True)
    cfg._attn_implementation = "eager"
    ref = LlamaAttention(cfg, layer_idx=0)
    ours = MultiExpertAttention([64], HeadSpace(4, kv_heads, 16, 500.0), bias=True, backend=backend)
    ours.experts[0].load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 64)
    pad = torch.ones(2, 9, dtype=torch.bool)
    ar = torch.tensor([0, 0, 0, 0, 1, 1, 0, 1, 1])
    mask = block_causal_mask(pad, ar)
    cos, sin = rope_cos_sin(positions_from_pad(pad), 16, 500.0)
    expected, _ = ref(x, (cos, sin), attention_mask=as_additive_mask(mask, torch.float32)[:, None])
    (out,), (key, value) = ours([x], cos, sin, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert key.shape == value.shape == (2, kv_heads, 9, 16)


def test_two_experts_with_copied_weights_equal_one_expert_on_the_concatenation():
    space = HeadSpace(4, 2, 8)
    one = MultiExpertAttention([32], space)
    two = MultiExpertAttention([32, 32], space)
    two.experts[0].load_state_dict(one.experts[0].state_dict())
    two.experts[1].load_state_dict(one.experts[0].state_dict())
    x0, x1 = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    pad = torch.ones(2, 8, dtype=torch.bool)
    mask = block_causal_mask(pad, torch.tensor([0] * 5 + [1, 0, 0]))
    cos, sin = rope_cos_sin(positions_from_pad(pad), 8, space.rope_theta)
    (joint,), kv_one = one([torch.cat([x0, x1], 1)], cos, sin, mask)
    (y0, y1), kv_two = two([x0, x1], cos, sin, mask)
    torch.testing.assert_close(torch.cat([y0, y1], 1), joint)
    torch.testing.assert_close(kv_two[0], kv_one[0])


def test_experts_of_different_widths_and_absent_experts():
    attn = MultiExpertAttention([32, 12, 20], HeadSpace(2, 1, 8))
    x0, x2 = torch.randn(1, 4, 32), torch.randn(1, 3, 20)
    mask = torch.ones(1, 7, 7, dtype=torch.bool)
    cos, sin = rope_cos_sin(torch.arange(7)[None], 8, 10000.0)
    (y0, y1, y2), (key, _) = attn([x0, None, x2], cos, sin, mask)
    assert y0.shape == x0.shape and y1 is None and y2.shape == x2.shape and key.shape == (1, 1, 7, 8)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, Lq, P \+ Lq\]"):
        attn([x0, None, x2], cos, sin, mask[:, :, :6])
    with pytest.raises(ValueError, match="at least one present expert"):
        attn([None, None, None], cos, sin, mask)


def test_backends_agree_and_padded_queries_stay_finite():
    attn = MultiExpertAttention([32, 16], HeadSpace(4, 2, 8))
    gen = torch.Generator().manual_seed(3)
    for trial in range(30):
        x0, x1 = torch.randn(3, 6, 32, generator=gen), torch.randn(3, 4, 16, generator=gen)
        pad = torch.rand(3, 10, generator=gen) < 0.6
        pad[0, :] = False  # one sample entirely padded: every query row fully masked
        ar = (torch.rand(3, 10, generator=gen) < 0.5).long()
        mask = block_causal_mask(pad, ar)
        cos, sin = rope_cos_sin(positions_from_pad(pad), 8, 10000.0)
        results = {}
        for backend in ATTENTION_BACKENDS:
            attn.set_backend(backend)
            for kind, m in (("bool", mask), ("additive", as_additive_mask(mask, torch.float32))):
                outs, _ = attn([x0, x1], cos, sin, m)
                for y in outs:
                    assert torch.isfinite(y).all(), (trial, backend, kind)
                results[backend, kind] = outs
        reference = results["eager", "bool"]
        for key, value in results.items():
            torch.testing.assert_close(value[0], reference[0], atol=1e-5, rtol=1e-5, msg=str(key))
            torch.testing.assert_close(value[1], reference[1], atol=1e-5, rtol=1e-5, msg=str(key))


def test_head_space_and_backend_errors():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        HeadSpace(6, 4, 8)
    with pytest.raises(ValueError, match="head_dim must be even"):
        HeadSpace(2, 2, 7)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flashy'; valid: \['auto', 'eager', 'grouped_matmul', 'sdpa'\]"):
        get_attention_backend("flashy")


def test_blocks_are_built_on_the_given_device_and_dtype():
    made = [DiT(2, 16, 2, 8, temb_dim=16, cross_attention_dim=12, device="meta", dtype=torch.bfloat16),
            Mlp(16, 32, device="meta", dtype=torch.bfloat16), AdaRMSNorm(16, 8, device="meta", dtype=torch.bfloat16)]
    for module in made:
        tensors = list(module.parameters()) + list(module.buffers())
        assert {t.device.type for t in tensors} == {"meta"} and {t.dtype for t in tensors} == {torch.bfloat16}, module


def test_dit_layout_matches_diffusers_affine_free_norms_and_dropout():
    # the parameter set must be the reference's (GR00T checkpoints load into it): LayerNorms without affine weights
    # (the AdaLayerNorm / final modulation supplies scale and shift), eps 1e-5 / 1e-6, dropout on attention and MLP
    block = DiTBlock(16, 2, 8, temb_dim=16, dropout=0.25)
    assert block.norm1.norm.weight is None and block.norm2.weight is None
    assert block.norm1.norm.eps == block.norm2.eps == 1e-5
    assert [m.p for m in block.attn.modules() if isinstance(m, nn.Dropout)] == [0.25]
    assert [m.p for m in block.ff.modules() if isinstance(m, nn.Dropout)] == [0.25]
    dit = DiT(1, 16, 2, 8, temb_dim=16, cross_attention_dim=12)
    assert dit.norm_out.weight is None and dit.norm_out.eps == 1e-6


def test_quantize_linears_asks_about_each_linear_by_its_qualified_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    asked = []
    count = quantize_linears(model, keep=lambda name, linear: asked.append(name) or name == "1.2")
    assert sorted(asked) == ["0", "1.0", "1.2"] and count == 2
    assert isinstance(model[0], Int8DynamicLinear) and isinstance(model[1][0], Int8DynamicLinear)
    assert type(model[1][2]) is nn.Linear
