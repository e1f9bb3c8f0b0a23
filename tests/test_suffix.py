"""SuffixEncoder: token layouts and masks of pi0, pi0.5, SmolVLA and the seed design; time fusion formulas."""

import pytest
import torch
import torch.nn.functional as F

from vlablocks.blocks.masks import block_causal_mask
from vlablocks.encoders.projectors import PixelShuffleProjector
from vlablocks.encoders.suffix import AdaRMSTimeFusion, ConcatMlpTimeFusion, SuffixEncoder, TimeTokenFusion
from vlablocks.encoders.time import DiffusersTimestepEmbedder, sinusoidal_embedding
from vlablocks.encoders.vision import ConvNet, PatchViT

W, H, A, S = 16, 3, 4, 5


def encoder(fusion_cls, state_dim=S, causal=False, learned_positions=False):
    torch.manual_seed(0)
    return SuffixEncoder(A, W, H, fusion_cls(W), state_dim=state_dim, causal=causal, learned_positions=learned_positions)


def test_layouts_of_the_reference_designs():
    cases = {
        "pi0": (encoder(ConcatMlpTimeFusion), [1, 1, 0, 0]),
        "pi05": (encoder(AdaRMSTimeFusion, state_dim=None), [1, 0, 0]),
        "smolvla": (encoder(ConcatMlpTimeFusion, state_dim=None, causal=True), [1, 1, 1]),
        "seed": (encoder(TimeTokenFusion), [1, 1, 0, 0, 0]),
    }
    for name, (enc, ar) in cases.items():
        pad, got = enc.layout(2)
        assert got.tolist() == [ar, ar], name
        assert pad.all() and pad.shape == (2, len(ar)), name
        out = enc(torch.randn(2, H, A), torch.rand(2), torch.randn(2, S) if enc.state_proj is not None else None)
        assert out.tokens.shape == (2, len(ar), W), name
        assert (out.cond is not None) == (name == "pi05"), name


def test_pi0_suffix_reproduces_the_reference_worked_example():
    enc = SuffixEncoder(A, W, horizon=2, time_fusion=ConcatMlpTimeFusion(W), state_dim=S)
    suffix_pad, suffix_ar = enc.layout(1)
    pad = torch.cat([torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool), suffix_pad], 1)
    ar = torch.cat([torch.zeros(1, 5, dtype=torch.long), suffix_ar], 1)
    mask = block_causal_mask(pad, ar)[0]
    assert mask[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 5]
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert not mask[:5, 5:].any()


def test_concat_mlp_fusion_is_pi0s_formula():
    enc = encoder(ConcatMlpTimeFusion)
    x_t, t, state = torch.randn(2, H, A), torch.rand(2), torch.randn(2, S)
    tokens = enc(x_t, t, state).tokens
    action_emb = enc.action_in_proj(x_t)
    time_emb = sinusoidal_embedding(t, W)[:, None].expand(-1, H, -1)
    mlp = enc.time_fusion.mlp
    expected = mlp.fc2(F.silu(mlp.fc1(torch.cat([action_emb, time_emb], -1))))
    torch.testing.assert_close(tokens[:, 1:], expected)
    torch.testing.assert_close(tokens[:, 0], enc.state_proj(state))


def test_adarms_condition_and_time_token_formulas():
    t = torch.tensor([0.0, 0.3, 1.0])
    enc = encoder(AdaRMSTimeFusion, state_dim=None)
    out = enc(torch.randn(3, H, A), t)
    mlp = enc.time_fusion.embedder.mlp
    torch.testing.assert_close(out.cond, F.silu(mlp.fc2(F.silu(mlp.fc1(sinusoidal_embedding(t, W))))))

    enc = encoder(TimeTokenFusion)
    x_t = torch.randn(3, H, A)
    out = enc(x_t, t, torch.randn(3, S))
    torch.testing.assert_close(out.tokens[:, -1], enc.time_fusion.embedder(t))
    torch.testing.assert_close(out.tokens[:, 1:-1], enc.action_in_proj(x_t))


def test_decode_reads_exactly_the_action_tokens():
    for fusion, state_dim in ((TimeTokenFusion, S), (ConcatMlpTimeFusion, None)):
        enc = encoder(fusion, state_dim=state_dim)
        hidden = torch.zeros(2, enc.length, W)
        hidden[:, enc.action_start : enc.action_start + H] = torch.randn(2, H, W)
        v = enc.decode(hidden)
        assert v.shape == (2, H, A)
        other = hidden.clone()
        other[:, : enc.action_start] += 5.0
        other[:, enc.action_start + H :] += 5.0
        torch.testing.assert_close(enc.decode(other), v)


def test_learned_positions_are_added_per_token():
    enc = encoder(ConcatMlpTimeFusion, learned_positions=True)
    x_t, t, state = torch.randn(2, H, A), torch.rand(2), torch.randn(2, S)
    with_pos = enc(x_t, t, state).tokens
    with torch.no_grad():
        delta = enc.positions.clone()
        enc.positions.zero_()
    torch.testing.assert_close(with_pos - enc(x_t, t, state).tokens, delta.expand(2, -1, -1))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="would hide the flow time from every action token"):
        encoder(TimeTokenFusion, causal=True)
    enc = encoder(ConcatMlpTimeFusion)
    with pytest.raises(ValueError, match="state_dim set\\) but state is None"):
        enc(torch.randn(2, H, A), torch.rand(2))
    with pytest.raises(ValueError, match=r"x_t must be \[B, 3, 4\]; got \[2, 3, 5\]"):
        enc(torch.randn(2, H, 5), torch.rand(2), torch.randn(2, S))
    with pytest.raises(ValueError, match=r"t must be \[B\] = \[2\]; got \[2, 1\]"):
        enc(torch.randn(2, H, A), torch.rand(2, 1), torch.randn(2, S))
    with pytest.raises(ValueError, match="state was given but this SuffixEncoder has no state token"):
        encoder(ConcatMlpTimeFusion, state_dim=None)(torch.randn(2, H, A), torch.rand(2), torch.randn(2, S))


def test_encoders_are_built_and_run_on_the_given_device_and_dtype():
    # the meta device stands in for an accelerator: a buffer or table left on the CPU would not combine with it
    fusion = ConcatMlpTimeFusion(16, device="meta", dtype=torch.bfloat16)
    made = [SuffixEncoder(4, 16, 3, fusion, state_dim=5, device="meta", dtype=torch.bfloat16),
            PatchViT(32, 16, 16, 1, 2, device="meta", dtype=torch.bfloat16),
            ConvNet(32, (8, 16), 2, 16, 4, device="meta", dtype=torch.bfloat16),
            PixelShuffleProjector(8, 12, 2, device="meta", dtype=torch.bfloat16),
            DiffusersTimestepEmbedder(16, device="meta", dtype=torch.bfloat16)]
    for module in made:  # every parameter and floating buffer (pixel statistics, tables); masks stay bool
        tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
        assert {t.device.type for t in tensors} == {"meta"} and {t.dtype for t in tensors} == {torch.bfloat16}, module
    assert made[0].ar.device.type == "meta"
    embedding = sinusoidal_embedding(torch.rand(3, device="meta"), 16)
    assert embedding.device.type == "meta" and embedding.shape == (3, 16)
