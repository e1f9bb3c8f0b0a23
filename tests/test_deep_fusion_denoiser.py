"""DeepFusionDenoiser + FlowMatchingHead: the expert trains over a frozen base through the prefix cache."""

import re
from dataclasses import replace

import pytest
import torch

from helpers import joint_mask, tiny_stack
from vlablocks.blocks.fusion import every_kth_layer
from vlablocks.policy.checks import random_batch
from vlablocks.recipes.builder import build
from vlablocks.encoders.suffix import AdaRMSTimeFusion, ConcatMlpTimeFusion, SuffixEncoder
from vlablocks.heads import DeepFusionDenoiser, FlowMatchingHead, Prefix

H, A, S = 4, 3, 5


def make_head(adarms: bool = False, seed: int = 0) -> FlowMatchingHead:
    stack = tiny_stack(base_width=64, base_layers=4, expert_width=32, expert_layers=every_kth_layer(4, 2),
                       adarms=adarms, seed=seed)
    fusion = AdaRMSTimeFusion(32) if adarms else ConcatMlpTimeFusion(32)
    suffix = SuffixEncoder(A, 32, H, fusion, state_dim=None if adarms else S)
    return FlowMatchingHead(DeepFusionDenoiser(stack, suffix), horizon=H, action_dim=A)


def make_batch(batch: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 6, 64, generator=gen)
    pad = torch.ones(batch, 6, dtype=torch.bool)
    pad[::2, -1] = False
    prefix = Prefix(embeds, pad, torch.zeros(batch, 6, dtype=torch.long))
    state = torch.randn(batch, S, generator=gen)
    actions = torch.tanh(embeds[:, :H, :A] + state[:, None, :A])
    return prefix, state, actions


def test_narrow_shallow_expert_trains_over_a_frozen_base():
    torch.manual_seed(0)
    head = make_head()
    stack = head.denoiser.stack
    frozen = {name for name, _ in stack.expert_named_parameters(0)}
    assert len(frozen) == 4 * 9 + 1  # 4 layers x (2 norms, q/k/v/o, gate/up/down) + final norm
    for name, param in stack.named_parameters():
        param.requires_grad_(name not in frozen)
    frozen_before = {n: p.detach().clone() for n, p in stack.named_parameters() if n in frozen}
    prefix, state, actions = make_batch()
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(50):
        loss = head.loss(prefix, actions, state, generator=gen).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for name, param in head.named_parameters():
                if param.requires_grad:
                    assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
                else:
                    assert param.grad is None, f"frozen {name} got a gradient"
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    for name, param in stack.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen_before[name]), name


@pytest.mark.parametrize("adarms", [False, True])
def test_cached_velocity_equals_the_joint_pass(adarms):
    head = make_head(adarms=adarms).eval()
    denoiser = head.denoiser
    prefix, state, actions = make_batch(batch=3)
    state = None if adarms else state
    x_t, t = torch.randn_like(actions), torch.rand(3)
    with torch.no_grad():
        cached = denoiser.velocity(denoiser.prepare(prefix), x_t, t, state)
        suffix = denoiser.suffix_encoder(x_t, t, state)
        suffix_pad, suffix_ar = denoiser.suffix_encoder.layout(3)
        mask, positions = joint_mask(prefix.pad, prefix.ar, suffix_pad, suffix_ar)
        joint = denoiser.stack([prefix.embeds, suffix.tokens], mask, positions, conds=[None, suffix.cond])
        expected = denoiser.suffix_encoder.decode(joint.hidden_states[1])
        assert torch.equal(denoiser.joint_velocity(prefix, x_t, t, state), expected)  # the recompute reference
    assert (cached - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("adarms", [False, True])
def test_cached_and_recomputed_action_chunks_agree(adarms):
    """10 Euler steps with the prefix cache == recomputing the prefix at every step (<= 1e-5), same noise."""
    from vlablocks.heads.flow_matching import integrate

    head = make_head(adarms=adarms).eval()
    denoiser = head.denoiser
    prefix, state, actions = make_batch(batch=3)
    state = None if adarms else state
    noise = torch.randn(actions.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cached = head.sample(prefix, state, noise=noise, num_steps=10)
        recomputed = integrate(lambda x, tt: denoiser.joint_velocity(prefix, x, tt, state), noise, 10)
    assert (cached - recomputed).abs().max() <= 1e-5


def test_sampling_leaves_the_prefix_cache_bitwise_unchanged():
    head = make_head().eval()
    denoiser = head.denoiser
    prefix, state, _ = make_batch(batch=2)
    contexts, calls = [], []
    prepare, velocity = denoiser.prepare, denoiser.velocity

    def recording_prepare(p):
        context = prepare(p)
        contexts.append((context, [k.clone() for k in context.cache.keys if k is not None],
                         [v.clone() for v in context.cache.values if v is not None]))
        return context

    def recording_velocity(context, x_t, t, s):
        calls.append(float(t[0]))
        return velocity(context, x_t, t, s)

    denoiser.prepare, denoiser.velocity = recording_prepare, recording_velocity
    with torch.no_grad():
        chunk = head.sample(prefix, state, num_steps=10)
    assert chunk.shape == (2, H, A) and torch.isfinite(chunk).all()
    assert len(contexts) == 1 and len(calls) == 10
    context, keys, values = contexts[0]
    assert all(torch.equal(a, b) for a, b in zip([k for k in context.cache.keys if k is not None], keys))
    assert all(torch.equal(a, b) for a, b in zip([v for v in context.cache.values if v is not None], values))


def test_denoiser_checks_the_expert_it_drives():
    stack = tiny_stack()
    with pytest.raises(ValueError, match=r"suffix_encoder.width \(16\) must equal the width of expert 1 \('action': 32\)"):
        DeepFusionDenoiser(stack, SuffixEncoder(A, 16, H, ConcatMlpTimeFusion(16)))
    with pytest.raises(ValueError, match="AdaRMS condition of width 32 but expert 1 .* adarms_cond_dim=None"):
        DeepFusionDenoiser(stack, SuffixEncoder(A, 32, H, AdaRMSTimeFusion(32)))
    with pytest.raises(ValueError, match=r"expert must index a non-base expert \(1..1\); got 0"):
        DeepFusionDenoiser(stack, SuffixEncoder(A, 32, H, ConcatMlpTimeFusion(32)), expert=0)


def test_bf16_autocast_matches_fp32_closely():
    head = make_head(adarms=True)
    prefix, _, actions = make_batch()
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            out = head.loss(prefix, actions, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None])
        results.append((out.loss.detach(), grads))
        head.zero_grad()
    (loss32, grad32), (loss16, grad16) = results
    assert loss16.dtype == torch.float32 and torch.isfinite(grad16).all()
    assert (loss16 - loss32).abs() <= 0.02 * loss32
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


# ------------------------------------------------------------------------------------ a state expert


def three_expert_head(state_layers=None, seed: int = 0) -> FlowMatchingHead:
    """VLM 64 x 4, a state expert 32 wide (``state_layers``) and the action expert 32 wide at layers 0, 2."""
    from helpers import SPACE
    from vlablocks.blocks.fusion import DeepFusionStack, ExpertSpec

    torch.manual_seed(seed)
    stack = DeepFusionStack([
        ExpertSpec("vlm", 64, 128, SPACE),
        ExpertSpec("state", 32, 64, SPACE, layers=state_layers),
        ExpertSpec("action", 32, 64, SPACE, layers=every_kth_layer(4, 2)),
    ], 4)
    suffix = SuffixEncoder(A, 32, H, ConcatMlpTimeFusion(32), state_dim=S)
    return FlowMatchingHead(DeepFusionDenoiser(stack, suffix, expert=2, state_expert=1), horizon=H, action_dim=A)


def test_a_state_expert_with_the_action_experts_weights_is_the_two_expert_model():
    """Routing the state token to a third expert changes nothing when that expert IS the action
    expert's twin: the joint attention over both streams is the one-stream computation."""
    import re

    two, three = make_head(seed=3), three_expert_head(state_layers=every_kth_layer(4, 2), seed=4)
    state_dict = {}
    for key, value in two.state_dict().items():
        match = re.search(r"(input_norms|attention\.experts|post_attention_norms|mlps|final_norms)\.1\.", key)
        if match:  # the action expert's weights go to both non-base experts of the 3-expert stack
            for expert in ("1", "2"):
                state_dict[key[:match.end() - 2] + expert + key[match.end() - 1:]] = value
        else:
            state_dict[key] = value
    three.load_state_dict(state_dict)
    prefix, state, _ = make_batch()
    x_t = torch.randn(8, H, A, generator=torch.Generator().manual_seed(5))
    t = torch.rand(8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = two.denoiser.velocity(two.denoiser.prepare(prefix), x_t, t, state)
        got = three.denoiser.velocity(three.denoiser.prepare(prefix), x_t, t, state)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_state_expert_caches_exactly_and_gets_gradients():
    head = three_expert_head()  # the state expert at every layer, the action expert at 0 and 2
    denoiser = head.denoiser
    prefix, state, actions = make_batch()
    x_t = torch.randn(8, H, A, generator=torch.Generator().manual_seed(5))
    t = torch.rand(8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cached = denoiser.velocity(denoiser.prepare(prefix), x_t, t, state)
        joint = denoiser.joint_velocity(prefix, x_t, t, state)
    torch.testing.assert_close(cached, joint, atol=1e-5, rtol=0)
    head.loss(prefix, actions, state, generator=torch.Generator().manual_seed(1)).loss.backward()
    stack = denoiser.stack
    # The action expert reads the state token's keys/values at layers 0 and 2 (its layer map):
    # everything of the state expert below layer 2, and its layer-2 input norm and k/v, get a
    # gradient; its layer-2 query, output and MLP, layer 3 and its final norm feed nothing read.
    for name, param in stack.expert_named_parameters(1):
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        reached = layer is not None and (layer < 2 or layer == 2 and any(k in name for k in ("input_norms", "k_proj", "v_proj")))
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert has_grad == reached, f"state expert {name}: gradient {has_grad}, expected {reached}"
    # the state changes the velocity only through the state expert's stream
    with torch.no_grad():
        other = denoiser.velocity(denoiser.prepare(prefix), x_t, t, state + 1.0)
    assert not torch.allclose(other, cached)


def test_state_expert_errors():
    from helpers import SPACE
    from vlablocks.blocks.fusion import DeepFusionStack, ExpertSpec

    stack = DeepFusionStack([ExpertSpec("vlm", 64, 128, SPACE), ExpertSpec("state", 16, 32, SPACE),
                             ExpertSpec("action", 32, 64, SPACE)], 2)
    suffix = SuffixEncoder(A, 32, H, ConcatMlpTimeFusion(32), state_dim=S)
    with pytest.raises(ValueError, match=r"state_expert must index an expert after the base and before the action expert \(1\.\.1\); got 2"):
        DeepFusionDenoiser(stack, suffix, expert=2, state_expert=2)
    with pytest.raises(ValueError, match=r"the state expert 'state' must have the action expert's width 32 .*; got 16"):
        DeepFusionDenoiser(stack, suffix, expert=2, state_expert=1)
    no_state = SuffixEncoder(A, 32, H, ConcatMlpTimeFusion(32), state_dim=None)
    with pytest.raises(ValueError, match=r"state_expert needs a state token in the suffix"):
        DeepFusionDenoiser(stack, no_state, expert=2, state_expert=1)


# ---------------------------------------------------------------- work done once per observation


def _suffix_inputs(vla, x_t, t, state):
    """Per-expert streams and conds of the suffix tokens (recipes without a state expert)."""
    denoiser = vla.denoiser
    assert denoiser.state_expert is None
    suffix = denoiser.suffix_encoder(x_t, t, state)
    streams = [None] * len(denoiser.stack.experts)
    conds = [None] * len(denoiser.stack.experts)
    streams[denoiser.expert], conds[denoiser.expert] = suffix.tokens, suffix.cond
    return streams, conds


def _observation(name: str, batch: int = 2):
    torch.manual_seed(0)
    vla = build(name).eval()
    with torch.no_grad():
        prefix, state = vla.encode(random_batch(vla, batch))
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(batch, vla.config.horizon, vla.config.action_dim, generator=gen)
    return vla, prefix, state, x_t, torch.rand(batch, generator=gen)


def test_cross_attention_keys_values_are_projected_once_per_prepare_and_never_per_step():
    vla, prefix, state, x_t, t = _observation("tiny_smolvla")
    projections = [proj for layer in vla.denoiser.stack.layers for cross in getattr(layer, "cross_attention", ())
                   for proj in (cross.k_proj, cross.v_proj)]
    assert projections, "tiny_smolvla has cross-attention layers"
    calls = []
    for proj in projections:
        proj.register_forward_hook(lambda module, args, out: calls.append(module))
    with torch.no_grad():
        context = vla.denoiser.prepare(prefix)
        assert len(calls) == len(projections) and all(kv is not None for kv in context.cache.cross_key_values
                                                     if kv is not None)
        for _ in range(3):
            vla.denoiser.velocity(context, x_t, t, state)
        assert len(calls) == len(projections)
        calls.clear()
        vla.denoiser.joint_velocity(prefix, x_t, t, state)  # the joint pass has no cache: it projects itself
        assert len(calls) == len(projections)
        calls.clear()
        vla.head.sample(prefix, state, num_steps=10)  # one prepare, ten velocity calls
    assert len(calls) == len(projections)


@pytest.mark.parametrize("name", ["tiny_smolvla", "tiny_pi05", "tiny_pi0"])
def test_precomputed_context_gives_bitwise_the_per_step_computation(name):
    """velocity over the context (projected cross keys/values, additive masks and RoPE tables
    built in prepare) equals the stack run per step from the raw cache, bool mask and positions."""
    vla, prefix, state, x_t, t = _observation(name)
    denoiser = vla.denoiser
    with torch.no_grad():
        context = denoiser.prepare(prefix)
        streams, conds = _suffix_inputs(vla, x_t, t, state)
        raw_cache = replace(context.cache, cross_key_values=None)
        per_step = denoiser.stack(streams, context.suffix_mask, context.suffix_positions, cache=raw_cache, conds=conds)
        precomputed = denoiser.expert_hidden(context, x_t, t, state)
    assert torch.equal(precomputed, per_step.hidden_states[denoiser.expert])
    masks = [layer[0] for layer in context.layout.layers if layer is not None]
    assert masks and all(mask.dtype == torch.float32 for mask in masks)  # made additive once
    assert context.layout.past_len == prefix.embeds.shape[1]


def test_prepare_under_autocast_builds_finite_masks_in_the_query_dtype():
    vla, prefix, state, x_t, t = _observation("tiny_smolvla")
    denoiser = vla.denoiser
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        context = denoiser.prepare(prefix)
        streams, conds = _suffix_inputs(vla, x_t, t, state)
        raw_cache = replace(context.cache, cross_key_values=None)
        per_step = denoiser.stack(streams, context.suffix_mask, context.suffix_positions, cache=raw_cache, conds=conds)
        precomputed = denoiser.expert_hidden(context, x_t, t, state)
    masks = [layer[0] for layer in context.layout.layers if layer is not None]
    assert all(mask.dtype == torch.bfloat16 and torch.isfinite(mask).all() for mask in masks)
    assert torch.equal(precomputed, per_step.hidden_states[denoiser.expert])


def _unread_by_the_cache_pass(stack) -> set[str]:
    """The base parameters a cache-only prefix pass never reads: past the last cached layer's
    keys/values, and the base's final norm."""
    last, unread = stack.cached_layers[-1], set()
    for name, _ in stack.expert_named_parameters(0):
        layer = int(name.split(".")[1]) if name.startswith("layers.") else len(stack.layers)
        if layer > last or (layer == last and not re.search(r"input_norms|k_proj|v_proj", name)):
            unread.add(f"head.denoiser.stack.{name}")
    return unread


def test_every_trainable_parameter_of_tiny_smolvla_gets_a_gradient_through_the_context():
    torch.manual_seed(0)
    vla = build("tiny_smolvla").train()
    vla(random_batch(vla, 2)).loss.backward()
    trainable = {name: p for name, p in vla.named_parameters() if p.requires_grad}
    missing = {name for name, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()}
    assert missing == _unread_by_the_cache_pass(vla.denoiser.stack), "some parameters get no (finite) gradient"
    cross = [name for name in trainable if ".cross_attention." in name and ("k_proj" in name or "v_proj" in name)]
    assert cross and all(trainable[name].grad.abs().sum() > 0 for name in cross)


def test_prepare_keeps_the_prefix_output_only_when_asked():
    # the default prefix pass stops at the last cached keys/values (no base output to keep)
    denoiser = make_head().eval().denoiser
    prefix, _, _ = make_batch(batch=2)
    with torch.no_grad():
        assert denoiser.prepare(prefix).prefix_hidden is None
        hidden = denoiser.prepare(prefix, prefix_output=True).prefix_hidden
    assert hidden is not None and hidden.shape[:2] == prefix.embeds.shape[:2]
