"""Inference-time optimisation (:mod:`vlablocks.policy.inference`): fused projections,
grouped-matmul attention and the sigmoid-form GELU give the same actions up to float rounding,
int8 dynamic quantisation stays within a stated error, an optimised policy refuses to be saved,
and native bf16 is read off the CPU's flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlablocks.blocks.attention import (GROUPED_MAX_QUERIES, ExpertProjections, HeadSpace, auto_attention,
                                       eager_attention, grouped_matmul_attention)
from vlablocks.blocks.mlp import GatedMlp, GeluTanh, SigmoidGeluTanh
from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm
from vlablocks.blocks.quantized import Int8DynamicLinear
from vlablocks.policy.checks import random_batch
from vlablocks.policy.inference import InferenceOptions, cpu_native_bf16, optimize_for_inference
from vlablocks.recipes import build, load_recipe

NAMES = ["tiny_pi0", "tiny_pi05", "tiny_smolvla"]
#: fused / grouped-matmul / sigmoid-GELU against the policy as built: the same arithmetic in another
#: order (measured max abs action error 6e-8 to 2.4e-7 on the three tiny policies, actions of size ~2-3).
FUSED_ATOL = 1e-5
#: int8 dynamic quantisation (per-channel weights, per-call activations): measured max abs action
#: error 1.5e-4 (SmolVLA) to 0.025 (pi0) on the tiny policies; docs/benchmarks.md has the mid size.
INT8_ATOL = 0.1


def _policy(name: str):
    torch.manual_seed(0)
    vla = build(load_recipe(name)).eval()
    with torch.no_grad():  # open the zero-initialised Gemma norms and AdaRMS gates
        for module in vla.modules():
            if isinstance(module, (RMSNorm, AdaRMSNorm)):
                for param in module.parameters():
                    param.normal_(std=0.1)
    return vla


def _pair(name: str, options: InferenceOptions):
    reference = _policy(name)
    optimised = _policy(name)
    optimize_for_inference(optimised, options)
    batch = random_batch(reference, batch_size=2)
    noise = torch.randn(2, reference.config.horizon, reference.config.action_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return reference.predict_action(batch, noise=noise), optimised.predict_action(batch, noise=noise), optimised


@pytest.mark.parametrize("name", NAMES)
def test_fused_policy_gives_the_same_actions(name):
    expected, actual, vla = _pair(name, InferenceOptions(fuse=True))
    assert not torch.equal(expected, torch.zeros_like(expected))
    torch.testing.assert_close(actual, expected, atol=FUSED_ATOL, rtol=0)
    fused = [m for m in vla.modules() if isinstance(m, (ExpertProjections, GatedMlp))]
    assert fused and all(m.fused for m in fused)
    assert all(layer.attention.backend == "auto" for layer in vla.backbone.layers)
    assert not any(isinstance(m, nn.GELU) and m.approximate == "tanh"
                   for m in vla.backbone.modules())  # every tanh GELU of the stack is in sigmoid form


@pytest.mark.parametrize("name", NAMES)
def test_int8_policy_stays_within_its_error_and_quantises_the_heavy_linears(name):
    expected, actual, vla = _pair(name, InferenceOptions(fuse=True, quantize="int8"))
    error = (actual - expected).abs().max().item()
    assert 0 < error < INT8_ATOL, error  # quantised (not the float path), and close
    quantised = Int8DynamicLinear
    assert not any(type(m) is nn.Linear for m in vla.backbone.modules())
    assert any(isinstance(m, quantised) for m in vla.vision.modules())
    assert all(type(m) is nn.Linear for m in vla.head.denoiser.suffix_encoder.modules() if isinstance(m, nn.Linear))


def test_fused_projections_equal_the_separate_ones():
    torch.manual_seed(0)
    proj = ExpertProjections(16, HeadSpace(4, 2, 8), bias=True)
    mlp = GatedMlp(16, 32, GeluTanh, bias=True)
    x = torch.randn(2, 5, 16)
    expected = (proj.q_proj(x), proj.k_proj(x), proj.v_proj(x)), mlp(x)
    proj.fuse()
    mlp.fuse()
    assert {n for n, _ in proj.named_parameters()} == {"qkv_proj.weight", "qkv_proj.bias", "o_proj.weight", "o_proj.bias"}
    assert {n for n, _ in mlp.named_parameters()} >= {"gate_up_proj.weight", "down_proj.weight"}
    for got, want in zip(proj.qkv(x), expected[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(proj.kv(x)[1], expected[0][2], atol=1e-6, rtol=0)
    torch.testing.assert_close(mlp(x), expected[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (4, 2), (3, 3)])
def test_grouped_matmul_attention_equals_eager_for_every_mask_cell(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 5, 8, generator=g)
    k, v = torch.randn(2, kv_heads, 9, 8, generator=g), torch.randn(2, kv_heads, 9, 8, generator=g)
    mask = torch.rand(2, 5, 9, generator=g) > 0.4
    mask[:, :, 0] = True  # every row attends somewhere
    got = grouped_matmul_attention(q, k, v, mask, 8**-0.5)
    torch.testing.assert_close(got, eager_attention(q, k, v, mask, 8**-0.5), atol=1e-6, rtol=0)
    # a masked key changes nothing: perturb each masked-out key/value and compare
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3] += 5.0
    v2[:, :, 3] += 5.0
    rows = ~mask[:, :, 3]  # [B, Lq]: the query rows that do not see key 3
    changed = grouped_matmul_attention(q, k2, v2, mask, 8**-0.5)
    same = rows[:, None, :, None].expand_as(got)
    torch.testing.assert_close(changed[same], got[same], atol=1e-6, rtol=0)


def test_auto_attention_takes_grouped_matmuls_for_short_queries_and_sdpa_for_long_ones(monkeypatch):
    calls = []
    monkeypatch.setattr("vlablocks.blocks.attention.grouped_matmul_attention", lambda *a: calls.append("grouped") or a[0])
    monkeypatch.setattr("vlablocks.blocks.attention.sdpa_attention", lambda *a: calls.append("sdpa") or a[0])
    for length in (1, GROUPED_MAX_QUERIES, GROUPED_MAX_QUERIES + 1):
        q = torch.randn(1, 4, length, 8)
        auto_attention(q, torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.ones(1, length, 9, dtype=torch.bool), 0.3)
    assert calls == ["grouped", "grouped", "sdpa"]


def test_sigmoid_gelu_is_the_tanh_gelu():
    x = torch.linspace(-12, 12, 10001)
    torch.testing.assert_close(SigmoidGeluTanh()(x.clone()), nn.GELU(approximate="tanh")(x), atol=2e-6, rtol=0)


def test_optimised_policy_refuses_to_be_saved_or_optimised_twice(tmp_path):
    vla = optimize_for_inference(_policy("tiny_pi0"), InferenceOptions(fuse=True))
    with pytest.raises(ValueError, match=r"optimised for inference \(fused\).*save the policy as loaded"):
        vla.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="optimised for inference already"):
        optimize_for_inference(vla, InferenceOptions())


def test_options_errors_and_names():
    with pytest.raises(ValueError, match=r"quantize must be one of \['none', 'int8'\]; got 'int4'"):
        InferenceOptions(quantize="int4")
    with pytest.raises(ValueError, match=r"compile must be one of \['off', 'step'\]; got 'chunk'"):
        InferenceOptions(compile="chunk")
    assert InferenceOptions(fuse=True, quantize="int8", compile="step").name == "fused+int8+compiled"
    assert InferenceOptions(fuse=False).name == "plain"


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse avx2 fma\n")
    intel = tmp_path / "intel"
    intel.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_native_bf16(amd) is False
    assert cpu_native_bf16(intel) is True
    assert cpu_native_bf16(tmp_path / "missing") is False
    named = tmp_path / "named"  # only the flags line counts, and everything after its first colon
    named.write_text("model name\t: Some CPU: amx_bf16 in its name\nflags\t\t: fpu avx2 : avx512_bf16\n")
    assert cpu_native_bf16(named) is True
    named.write_text("model name\t: Some CPU: amx_bf16 in its name\nflags\t\t: fpu avx2\n")
    assert cpu_native_bf16(named) is False


@pytest.mark.parametrize("name", ["tiny_pi0", "tiny_smolvla"])
def test_fused_int8_step_and_prefix_trace_as_one_graph(name):
    """The int8 linears are one op each in the graph (torch.ao's dynamic linear would break it at every layer)."""
    vla = optimize_for_inference(_policy(name), InferenceOptions(fuse=True, quantize="int8"))
    batch = random_batch(vla, batch_size=1)
    with torch.no_grad():
        prefix, state = vla.encode(batch)
        context = vla.denoiser.prepare(prefix)
        x_t = torch.randn(1, vla.config.horizon, vla.config.action_dim)
        torch._dynamo.reset()
        for fn, args in ((vla.denoiser.velocity, (context, x_t, torch.ones(1), state)), (vla.denoiser.prepare, (prefix,))):
            explained = torch._dynamo.explain(fn)(*args)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
            int8_calls = [node for graph in explained.graphs for node in graph.graph.nodes
                          if "vlablocks.int8_linear" in str(node.target)]
            assert len(int8_calls) >= 4 * vla.backbone.num_layers - 3, len(int8_calls)  # q/k/v, o, gate/up, down per layer


@pytest.mark.parametrize("name", ["tiny_llava3d_dit_layerwise", "tiny_llava3d_hybrid", "tiny_gr00t",
                                  "tiny_llava3d_deepfusion_shared", "tiny_llava3d_deepfusion"])
def test_every_other_tiny_recipe_runs_fused_and_int8(name):
    """DiT, hybrid, GR00T and the parameter-shared expert: the optimised policy stays within the int8 error
    (measured 0.003-0.017)."""
    expected, actual, _ = _pair(name, InferenceOptions(fuse=True, quantize="int8"))
    assert 0 < (actual - expected).abs().max().item() < INT8_ATOL
