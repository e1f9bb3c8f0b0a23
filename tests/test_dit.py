"""DiT blocks and DiT denoisers: per-sample time, padded conditioning, layerwise wiring, one backbone pass."""

import pytest
import torch

from helpers import SPACE, tiny_stack
from vlablocks.blocks.dit import AdaLayerNorm, DiT, DiTBlock
from vlablocks.blocks.fusion import DeepFusionStack, ExpertSpec
from vlablocks.encoders.suffix import ConcatMlpTimeFusion, SuffixEncoder
from vlablocks.heads import FlowMatchingHead, Prefix
from vlablocks.heads.dit import HybridDenoiser, LastLayerDiTDenoiser, LayerwiseDiTDenoiser

H, A, S, W = 4, 3, 5, 32


def backbone(layers=4):
    torch.manual_seed(0)
    return DeepFusionStack([ExpertSpec("vlm", 64, 128, SPACE)], layers)


def suffix(width=W):
    return SuffixEncoder(A, width, H, ConcatMlpTimeFusion(width), state_dim=S, learned_positions=True)


def denoisers():
    return {
        "layerwise": LayerwiseDiTDenoiser(backbone(), suffix(), num_heads=2, head_dim=16, num_layers=2),
        "last_layer": LastLayerDiTDenoiser(backbone(), suffix(), num_layers=3, num_heads=2, head_dim=16,
                                           num_future_tokens=3, feature_layer=-1),
        "hybrid": HybridDenoiser(tiny_stack(), suffix(), num_layers=2, num_heads=2, head_dim=16),
    }


def prefix(batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pad = torch.ones(batch, 6, dtype=torch.bool)
    pad[1, -2:] = False
    return Prefix(torch.randn(batch, 6, 64, generator=gen), pad, torch.zeros(batch, 6, dtype=torch.long))


def test_ada_layer_norm_is_scale_first_and_per_sample():
    norm = AdaLayerNorm(8, 4)
    x, temb = torch.randn(2, 3, 8), torch.randn(2, 4)
    scale, shift = norm.linear(torch.nn.functional.silu(temb)).chunk(2, dim=-1)
    expected = torch.nn.functional.layer_norm(x, (8,), eps=1e-5) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(norm(x, temb), expected)


@pytest.mark.parametrize("name", ["layerwise", "last_layer", "hybrid"])
def test_perturbing_one_samples_time_changes_only_that_sample(name):
    denoiser = denoisers()[name].eval()
    obs = prefix()
    x_t, state = torch.randn(3, H, A), torch.randn(3, S)
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        context = denoiser.prepare(obs)
        v = denoiser.velocity(context, x_t, t, state)
        v2 = denoiser.velocity(context, x_t, t + torch.tensor([0.0, 0.3, 0.0]), state)
    assert torch.equal(v[[0, 2]], v2[[0, 2]])
    assert not torch.allclose(v[1], v2[1])


@pytest.mark.parametrize("name", ["layerwise", "last_layer", "hybrid"])
def test_padded_conditioning_tokens_have_exactly_no_effect(name):
    denoiser = denoisers()[name].eval()
    obs = prefix()
    changed = obs.embeds.clone()
    changed[1, -2:] += 50.0 * torch.randn(2, 64)  # sample 1's padded prefix tokens
    x_t, t, state = torch.randn(3, H, A), torch.rand(3), torch.randn(3, S)
    with torch.no_grad():
        v = denoiser.velocity(denoiser.prepare(obs), x_t, t, state)
        v2 = denoiser.velocity(denoiser.prepare(Prefix(changed, obs.pad, obs.ar)), x_t, t, state)
    assert torch.equal(v, v2)


def test_layerwise_gradients_reach_exactly_the_wired_backbone_layers():
    denoiser = LayerwiseDiTDenoiser(backbone(layers=4), suffix(), num_heads=2, head_dim=16, num_layers=2)
    outputs = {}

    def keep(i):
        def hook(module, args, result):
            result[0][0].retain_grad()
            outputs[i] = result[0][0]
        return hook

    for i, layer in enumerate(denoiser.stack.layers):
        layer.register_forward_hook(keep(i))
    obs = prefix()
    v = denoiser.velocity(denoiser.prepare(obs), torch.randn(3, H, A), torch.rand(3), torch.randn(3, S))
    v.square().sum().backward()
    assert sorted(outputs) == [0, 1]  # layers 2 and 3 never run: zero gradient by construction
    for i in (0, 1):
        assert outputs[i].grad is not None and outputs[i].grad[obs.pad].abs().sum() > 0
    for i in (2, 3):
        layer_params = list(denoiser.stack.layers[i].parameters())
        assert all(p.grad is None for p in layer_params)
    # block i reads layer i: its features are the projection of layer i's output
    assert denoiser.feature_layers == (0, 1) and denoiser.dit.cross_attention_blocks == (0, 2)
    assert [denoiser.block_layers[b] for b in denoiser.dit.cross_attention_blocks] == [0, 1]


@pytest.mark.parametrize("name", ["layerwise", "last_layer", "hybrid"])
def test_every_parameter_trains_and_the_backbone_runs_once_per_observation(name):
    denoiser = denoisers()[name]
    with torch.no_grad():  # open AdaRMS / zero-init paths if any
        for n, p in denoiser.named_parameters():
            if "modulation" in n:
                p.normal_(std=0.02)
    head = FlowMatchingHead(denoiser, horizon=H, action_dim=A)
    obs = prefix()
    calls = []  # backbone passes over the prefix (the base stream present)
    denoiser.stack.register_forward_hook(lambda module, args, out: calls.append(1) if args[0][0] is not None else None)
    head.loss(obs, torch.randn(3, H, A), torch.randn(3, S)).loss.backward()
    assert len(calls) == 1
    for n, p in denoiser.named_parameters():
        if name == "layerwise" and (n.startswith("stack.final_norms") or n.startswith(("stack.layers.2.", "stack.layers.3."))):
            continue  # this head reads backbone layers 0 and 1 only; deeper layers never run
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    calls.clear()
    with torch.no_grad():
        head.sample(obs, torch.randn(3, S), num_steps=7)
    assert len(calls) == 1


def test_dit_errors_and_structure():
    dit = DiT(4, 32, 2, 16, temb_dim=32, cross_attention_dim=24, interleave_self_attention=True)
    assert dit.cross_attention_blocks == (0, 2)
    assert isinstance(dit.blocks[1], DiTBlock) and not dit.blocks[1].is_cross_attention
    with pytest.raises(ValueError, match=r"context must be one tensor or one per block \(4\); got 2"):
        dit(torch.randn(1, 3, 32), torch.randn(1, 32), [torch.randn(1, 2, 24)] * 2)
    with pytest.raises(ValueError, match="a DiT head reads the backbone's base stream only"):
        LayerwiseDiTDenoiser(tiny_stack(), suffix(), num_heads=2, head_dim=16)
    with pytest.raises(ValueError, match=r"num_layers must be in 1..4 \(one DiT block per backbone layer\); got 5"):
        LayerwiseDiTDenoiser(backbone(), suffix(), num_heads=2, head_dim=16, num_layers=5)
    with pytest.raises(ValueError, match=r"the state / time tokens \(1 of them\) could not reach the actions"):
        LayerwiseDiTDenoiser(backbone(), suffix(), num_heads=2, head_dim=16, interleave_self_attention=False)
    with pytest.raises(ValueError, match=r"feature layers \[7\] are out of range for a backbone of 4 layers"):
        LastLayerDiTDenoiser(backbone(), suffix(), num_layers=2, num_heads=2, head_dim=16, feature_layer=7)


DIT_RECIPES = ["tiny_llava3d_dit_layerwise", "tiny_gr00t", "tiny_llava3d_hybrid"]


@pytest.mark.parametrize("name", DIT_RECIPES)
def test_dit_recipes_train_every_parameter_and_run_the_backbone_once(name):
    from vlablocks.policy.checks import random_batch, smoke_check
    from vlablocks.recipes.builder import build

    torch.manual_seed(0)
    vla = build(name)
    report = smoke_check(vla)
    assert report.parameters_without_grad == ()  # the class of bug that leaves a state encoder untrained
    calls = []
    vla.backbone.register_forward_hook(
        lambda module, args, out: calls.append(1) if args[0][0] is not None else None)
    vla.predict_action(random_batch(vla, 2), num_steps=10)
    assert len(calls) == 1


def test_dit_gradient_checkpointing_gives_identical_gradients():
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        dit = DiT(3, 32, 2, 16, temb_dim=32, cross_attention_dim=24, interleave_self_attention=True,
                  gradient_checkpointing=flag)
        gen = torch.Generator().manual_seed(1)
        x, temb, context = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 32, generator=gen), torch.randn(2, 7, 24, generator=gen)
        dit(x, temb, context).square().mean().backward()
        results.append({n: p.grad for n, p in dit.named_parameters()})
    for name in results[0]:
        assert (results[0][name] - results[1][name]).abs().max() <= 1e-6, name


def test_dit_heads_default_to_a_4x_feed_forward_no_future_tokens_and_pass_checkpointing_on():
    for denoiser in denoisers().values():
        block = denoiser.dit.blocks[0]
        assert block.ff.net[2].in_features == 4 * W  # diffusers' FeedForward: GELU proj, dropout, out linear
        assert not denoiser.dit.gradient_checkpointing
    assert denoisers()["layerwise"].future_tokens is None
    assert LastLayerDiTDenoiser(backbone(), suffix(), num_layers=2, num_heads=2, head_dim=16).future_tokens is None
    for made in (LayerwiseDiTDenoiser(backbone(), suffix(), num_heads=2, head_dim=16, num_layers=2, gradient_checkpointing=True),
                 HybridDenoiser(tiny_stack(), suffix(), num_layers=2, num_heads=2, head_dim=16, gradient_checkpointing=True)):
        assert made.dit.gradient_checkpointing
