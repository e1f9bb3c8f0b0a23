"""DeepFusionStack: parity with transformers decoders, the three modes, layer maps, checkpointing."""

import pytest
import torch
from transformers import GemmaConfig, GemmaModel, LlamaConfig, LlamaForCausalLM, LlamaModel, MistralConfig, MistralModel

from helpers import SPACE, joint_mask, random_prefix, tiny_stack
from vlablocks.blocks.attention import HeadSpace, KeyValueCrossAttention
from vlablocks.blocks.attention_layout import attention_dtype
from vlablocks.blocks.fusion import DeepFusionStack, ExpertSpec, every_kth_layer, every_layer, first_n_layers
from vlablocks.blocks.masks import as_additive_mask, block_causal_mask, positions_from_pad, suffix_mask_and_positions
from vlablocks.blocks.transformers_import import base_spec_from_config, load_base_from_transformers

DECODER_SHAPES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=50)


def make_transformers_decoder(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaModel(LlamaConfig(**DECODER_SHAPES, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                      attn_implementation="eager"))
    if family == "llama_causal_lm":  # state dict keys under "model."
        return LlamaForCausalLM(LlamaConfig(**DECODER_SHAPES, attention_bias=True, attn_implementation="eager"))
    if family == "mistral":
        return MistralModel(MistralConfig(**DECODER_SHAPES, sliding_window=None, attn_implementation="eager"))
    model = GemmaModel(GemmaConfig(**DECODER_SHAPES, attn_implementation="eager"))
    with torch.no_grad():  # Gemma norms are zero-init (1 + w): randomise so the offset matters
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(std=0.5)
    return model


@pytest.mark.parametrize("family", ["llama", "llama_causal_lm", "mistral", "gemma"])
@pytest.mark.parametrize("attention", ["causal", "prefix_lm"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_prefix_only_equals_transformers_decoder(family, attention, backend):
    model = make_transformers_decoder(family).eval()
    spec, depth = base_spec_from_config(model.config)
    stack = DeepFusionStack([spec], depth, attention_backend=backend).eval()
    rest = load_base_from_transformers(stack, model.state_dict())
    assert "embed_tokens.weight" in rest  # the embedding is handed back, not silently dropped

    embeds, pad, _ = random_prefix(width=64)
    ar = torch.ones_like(pad, dtype=torch.long) if attention == "causal" else torch.zeros_like(pad, dtype=torch.long)
    mask, positions = block_causal_mask(pad, ar), positions_from_pad(pad)
    decoder = model.model if family == "llama_causal_lm" else model
    with torch.no_grad():
        expected = decoder(inputs_embeds=embeds, attention_mask=as_additive_mask(mask, torch.float32)[:, None],
                           position_ids=positions).last_hidden_state
        out = stack([embeds], mask, positions, return_cache=True)
    assert (out.hidden_states[0] - expected).abs().max() <= 1e-5
    assert out.cache is not None and all(k.shape == (2, 2, 7, 16) for k in out.cache.keys)


def _suffix(batch=2, length=5, width=32, seed=2):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, width, generator=gen)
    pad = torch.ones(batch, length, dtype=torch.bool)
    ar = torch.tensor([1, 1] + [0] * (length - 2))  # pi0: state block, then one action block
    return tokens, pad, ar


STACK_VARIANTS = {
    "equal_width_and_depth": dict(expert_width=64, expert_layers=None),
    "narrow_every_2nd": dict(expert_width=32, expert_layers=every_kth_layer(4, 2)),
    "narrow_first_3": dict(expert_width=24, expert_layers=first_n_layers(4, 3)),
    "adarms_expert": dict(expert_width=32, expert_layers=None, adarms=True),
}


@pytest.mark.parametrize("variant", sorted(STACK_VARIANTS))
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_joint_equals_cached_prefix_then_suffix(variant, backend):
    kwargs = STACK_VARIANTS[variant]
    stack = tiny_stack(attention_backend=backend, **kwargs).eval()
    width = stack.experts[1].width
    embeds, pad, ar = random_prefix()
    suffix, suffix_pad, suffix_ar = _suffix(width=width)
    cond = torch.randn(2, width) if kwargs.get("adarms") else None
    mask, positions = joint_mask(pad, ar, suffix_pad, suffix_ar)
    P = embeds.shape[1]
    with torch.no_grad():
        joint = stack([embeds, suffix], mask, positions, conds=[None, cond])
        prefix = stack([embeds, None], mask[:, :P, :P], positions[:, :P], return_cache=True)
        suffix_mask, suffix_positions = suffix_mask_and_positions(pad, ar, suffix_pad, suffix_ar)
        cached = stack([None, suffix], suffix_mask, suffix_positions, cache=prefix.cache, conds=[None, cond])
        changed = stack([embeds, suffix + 1.0], mask, positions, conds=[None, cond])
    assert (cached.hidden_states[1] - joint.hidden_states[1]).abs().max() <= 1e-5
    # real prefix tokens (padding rows attend uniformly to whatever keys exist: finite, meaningless)
    assert (prefix.hidden_states[0][pad] - joint.hidden_states[0][pad]).abs().max() <= 1e-5
    # the prefix never attends to the suffix: a different suffix leaves the prefix output unchanged
    assert torch.equal(changed.hidden_states[0][pad], joint.hidden_states[0][pad])
    assert not torch.equal(changed.hidden_states[1], joint.hidden_states[1])
    # only the layers the expert attends at are cached
    expected_layers = set(kwargs["expert_layers"] or every_layer(4))
    assert {i for i, k in enumerate(prefix.cache.keys) if k is not None} == expected_layers


@pytest.mark.parametrize("variant", ["equal_width_and_depth", "narrow_every_2nd", "narrow_first_3", "cross_attention"])
def test_cache_only_prefix_pass_gives_the_same_cache_and_skips_unread_work(variant):
    if variant == "cross_attention":
        torch.manual_seed(0)
        specs = [ExpertSpec("vlm", 64, 128, SPACE), ExpertSpec("action", 48, 96, SPACE)]
        stack = DeepFusionStack(specs, 4, cross_attention_layers=(1, 3)).eval()
    else:
        stack = tiny_stack(**STACK_VARIANTS[variant]).eval()
    embeds, pad, ar = random_prefix()
    mask, positions = block_causal_mask(pad, ar), positions_from_pad(pad)
    last = stack.cached_layers[-1]
    called = []
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: called.append(name))
             for name, module in stack.named_modules() if name.startswith("layers.") and not list(module.children())]
    with torch.no_grad():
        full = stack([embeds, None], mask, positions, return_cache=True)
        called.clear()
        lean = stack([embeds, None], mask, positions, return_cache=True, cache_only=True)
    for hook in hooks:
        hook.remove()
    for i in range(stack.num_layers):
        if full.cache.keys[i] is None:
            assert lean.cache.keys[i] is None and lean.cache.values[i] is None
        else:
            assert torch.equal(lean.cache.keys[i], full.cache.keys[i]) and torch.equal(lean.cache.values[i], full.cache.values[i])
    assert lean.hidden_states == (None, None)
    ran_layers = {int(name.split(".")[1]) for name in called}
    assert ran_layers == set(range(last + 1)), (last, sorted(ran_layers))
    last_layer = {name.split(".", 2)[2] for name in called if name.startswith(f"layers.{last}.")}
    # keys and values only: no query, no o_proj, no post-attention norm, no MLP
    assert last_layer == {"input_norms.0", "attention.experts.0.k_proj", "attention.experts.0.v_proj"}
    with pytest.raises(ValueError, match="cache_only goes with return_cache=True"):
        stack([embeds, None], mask, positions, cache_only=True)


def test_cache_is_bitwise_unchanged_by_denoising_steps():
    stack = tiny_stack().eval()
    embeds, pad, ar = random_prefix()
    suffix, suffix_pad, suffix_ar = _suffix()
    with torch.no_grad():
        cache = stack([embeds, None], block_causal_mask(pad, ar), positions_from_pad(pad), return_cache=True).cache
        snapshot = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values) if k is not None]
        suffix_mask, suffix_positions = suffix_mask_and_positions(pad, ar, suffix_pad, suffix_ar)
        x = suffix
        for _ in range(10):
            x = x - 0.1 * stack([None, x], suffix_mask, suffix_positions, cache=cache).hidden_states[1]
    kept = [(k, v) for k, v in zip(cache.keys, cache.values) if k is not None]
    assert len(kept) == len(snapshot) == 2
    for (k, v), (k0, v0) in zip(kept, snapshot):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    with pytest.raises(Exception):  # frozen dataclass
        cache.keys = ()


def test_gradient_checkpointing_gives_identical_loss_and_gradients():
    results = []
    for flag in (False, True):
        stack = tiny_stack(seed=3, gradient_checkpointing=flag)
        embeds, pad, ar = random_prefix()
        suffix, suffix_pad, suffix_ar = _suffix()
        mask, positions = joint_mask(pad, ar, suffix_pad, suffix_ar)
        out = stack([embeds, suffix.requires_grad_()], mask, positions)
        loss = out.hidden_states[0].pow(2).mean() + out.hidden_states[1].sin().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in stack.named_parameters()}, suffix.grad))
    (loss_a, grads_a, input_a), (loss_b, grads_b, input_b) = results
    assert (loss_a - loss_b).abs() <= 1e-6
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max() <= 1e-6, name
    assert (input_a - input_b).abs().max() <= 1e-6


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_random_masks_never_give_nan_forward_or_backward(backend):
    stack = tiny_stack(attention_backend=backend, adarms=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        embeds = torch.randn(3, 6, 64, generator=gen)
        suffix = torch.randn(3, 4, 32, generator=gen)
        pad = torch.rand(3, 10, generator=gen) < 0.5
        pad[0] = False  # a sample with nothing but padding
        ar = (torch.rand(3, 10, generator=gen) < 0.5).long()
        out = stack([embeds, suffix], block_causal_mask(pad, ar), positions_from_pad(pad), conds=[None, torch.randn(3, 32)])
        loss = sum(h.sum() for h in out.hidden_states)
        loss.backward()
        assert all(torch.isfinite(h).all() for h in out.hidden_states)
        assert all(torch.isfinite(p.grad).all() for p in stack.parameters() if p.grad is not None)
        stack.zero_grad()


def test_layer_hidden_states_on_request():
    stack = tiny_stack().eval()
    embeds, pad, ar = random_prefix()
    out = stack([embeds, None], block_causal_mask(pad, ar), positions_from_pad(pad), output_layer_hidden_states=True)
    assert len(out.layer_hidden_states) == 4
    assert all(layer[0].shape == embeds.shape and layer[1] is None for layer in out.layer_hidden_states)
    torch.testing.assert_close(stack.final_norms[0](out.layer_hidden_states[-1][0]), out.hidden_states[0])


def test_head_space_mismatch_names_both_head_spaces():
    other = HeadSpace(num_heads=8, num_kv_heads=2, head_dim=8, rope_theta=500.0)
    experts = [ExpertSpec("vlm", 64, 128, SPACE), ExpertSpec("action", 32, 64, other)]
    with pytest.raises(ValueError) as err:
        DeepFusionStack(experts, 2)
    message = str(err.value)
    assert "expert 1 ('action')" in message and "base expert 0 ('vlm')" in message
    assert str(other) in message and str(SPACE) in message


def test_layer_map_and_input_errors():
    base = ExpertSpec("vlm", 64, 128, SPACE)
    with pytest.raises(ValueError, match=r"layer map of expert 1 \('action'\) names layers \[4\], but the base has 4 layers \(valid 0..3\)"):
        DeepFusionStack([base, ExpertSpec("action", 32, 64, SPACE, layers=(0, 4))], 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        DeepFusionStack([base, ExpertSpec("action", 32, 64, SPACE, layers=(2, 1))], 4)
    with pytest.raises(ValueError, match="must have every layer"):
        DeepFusionStack([ExpertSpec("vlm", 64, 128, SPACE, layers=(0,))], 4)
    with pytest.raises(ValueError, match=r"needs 1 <= n <= num_layers \(4\); got 5"):
        first_n_layers(4, 5)

    stack = tiny_stack(adarms=True)
    embeds, pad, ar = random_prefix()
    mask, positions = block_causal_mask(pad, ar), positions_from_pad(pad)
    with pytest.raises(ValueError, match=r"expert 0 \('vlm'\) must be \[B, L, 64\]; got \[2, 7, 32\]"):
        stack([embeds[..., :32], None], mask, positions)
    suffix, suffix_pad, suffix_ar = _suffix()
    joint, joint_positions = joint_mask(pad, ar, suffix_pad, suffix_ar)
    with pytest.raises(ValueError, match=r"expert 1 \('action'\) takes a \[B, 32\] cond; got None"):
        stack([embeds, suffix], joint, joint_positions)
    with pytest.raises(ValueError, match="prefix-only mode"):
        stack([embeds, suffix], joint, joint_positions, conds=[None, torch.randn(2, 32)], return_cache=True)


def test_llama_7b_shaped_stack_builds_on_meta_with_the_reference_parameter_count():
    config = LlamaConfig()  # transformers' defaults are LLaMA-7B: 4096 wide, 32 layers, 11008 MLP
    with torch.device("meta"):
        reference = LlamaModel(config)
    decoder_params = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("embed_tokens"))
    base, depth = base_spec_from_config(config)
    expert = ExpertSpec("action", 2048, 5504, base.head_space, layers=every_kth_layer(depth, 4))
    stack = DeepFusionStack([base, expert], depth, device="meta")
    base_params = sum(p.numel() for _, p in stack.expert_named_parameters(0))
    assert base_params == decoder_params  # about 6.48e9: LLaMA-7B's 6.74e9 less its embedding and LM head
    assert all(p.device.type == "meta" for p in stack.parameters())


def test_expert_named_parameters_partition_the_stack():
    stack = tiny_stack()
    names = [dict(stack.expert_named_parameters(e)) for e in range(2)]
    everything = dict(stack.named_parameters())
    assert names[0].keys().isdisjoint(names[1].keys())
    assert names[0].keys() | names[1].keys() == everything.keys()
    assert all(everything[n] is p for n, p in names[1].items())
    # the expert has layers 0 and 2 only: 2 x (2 norms, q/k/v/o, gate/up/down) + its final norm
    assert len(names[1]) == 2 * 9 + 1 and not any(n.startswith(("layers.1.", "layers.3.")) for n in names[1])


def test_shared_weight_expert_is_the_base_run_over_the_whole_sequence():
    base = ExpertSpec("vlm", 64, 128, SPACE)
    shared = ExpertSpec("action", 64, 128, SPACE, share_base_weights=True)
    torch.manual_seed(0)
    stack = DeepFusionStack([base, shared], 3).eval()
    plain = DeepFusionStack([base], 3).eval()
    plain.load_state_dict({k: v for k, v in stack.state_dict().items() if not k.startswith("final_norms.1")})
    with torch.no_grad():
        stack.final_norms[1].weight.copy_(stack.final_norms[0].weight)
    own = dict(stack.expert_named_parameters(1))
    assert list(own) == ["final_norms.1.weight"]  # only its final norm is its own
    assert sum(p.numel() for p in stack.parameters()) == sum(p.numel() for p in plain.parameters()) + 64

    embeds, pad, ar = random_prefix()
    suffix, suffix_pad, suffix_ar = _suffix(width=64)
    mask, positions = joint_mask(pad, ar, suffix_pad, suffix_ar)
    with torch.no_grad():
        joint = stack([embeds, suffix], mask, positions)
        reference = plain([torch.cat([embeds, suffix], 1)], mask, positions).hidden_states[0]
        cache = stack([embeds, None], mask[:, :7, :7], positions[:, :7], return_cache=True).cache
        suffix_mask, suffix_positions = suffix_mask_and_positions(pad, ar, suffix_pad, suffix_ar)
        cached = stack([None, suffix], suffix_mask, suffix_positions, cache=cache)
    torch.testing.assert_close(joint.hidden_states[1], reference[:, 7:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.hidden_states[1], joint.hidden_states[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"shares the base's weights.*differing fields .*'width': \(32, 64\)"):
        DeepFusionStack([base, ExpertSpec("action", 32, 128, SPACE, share_base_weights=True)], 3)


def test_key_value_cross_attention_follows_smolvla():
    from vlablocks.blocks.attention import KeyValueCrossAttention
    from vlablocks.blocks.rope import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    cross = KeyValueCrossAttention(24, SPACE, backend="eager")
    x = torch.randn(2, 3, 24)
    key, value = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.rand(2, 3, 5) < 0.7
    mask[..., 0] = True
    cos, sin = rope_cos_sin(torch.arange(3).expand(2, -1), 16, SPACE.rope_theta)
    out = cross(x, cos, sin, key, value, mask)
    # reference: rotate the queries only; re-project the flattened [B, P, Hkv * D] keys/values
    q = apply_rope(cross.q_proj(x).view(2, 3, 4, 16).transpose(1, 2), cos, sin)
    k = cross.k_proj(key.transpose(1, 2).reshape(2, 5, 32)).view(2, 5, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
    v = cross.v_proj(value.transpose(1, 2).reshape(2, 5, 32)).view(2, 5, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2)) / 4.0 + torch.where(mask, 0.0, float("-inf"))[:, None]
    expected = cross.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 64))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # projecting once and attending the projected keys/values is the same computation
    assert torch.equal(cross.attend(x, cos, sin, *cross.project_key_value(key, value), mask), out)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cross_attention_layers_cached_equals_joint_and_positions_restart(backend):
    torch.manual_seed(0)
    base = ExpertSpec("vlm", 64, 128, SPACE)
    expert = ExpertSpec("action", 48, 96, SPACE)
    stack = DeepFusionStack([base, expert], 4, attention_backend=backend, cross_attention_layers=(1, 3)).eval()
    assert [type(layer).__name__ for layer in stack.layers] == ["DeepFusionBlock", "CrossAttentionFusionBlock"] * 2
    embeds, pad, ar = random_prefix()
    suffix, suffix_pad, _ = _suffix(width=48)
    suffix_ar = torch.ones(5, dtype=torch.long)  # SmolVLA: causal action tokens
    mask, positions = joint_mask(pad, ar, suffix_pad, suffix_ar)
    with torch.no_grad():
        joint = stack([embeds, suffix], mask, positions)
        cache = stack([embeds, None], mask[:, :7, :7], positions[:, :7], return_cache=True).cache
        suffix_mask, suffix_positions = suffix_mask_and_positions(pad, ar, suffix_pad, suffix_ar)
        cached = stack([None, suffix], suffix_mask, suffix_positions, cache=cache)
    torch.testing.assert_close(cached.hidden_states[1], joint.hidden_states[1], atol=1e-5, rtol=1e-5)
    # the cross layers' expert queries restart at position 0: only the self-attention layers see
    # the absolute suffix positions, so a stack of cross layers only is shift-invariant
    only_cross = DeepFusionStack([base, expert], 2, attention_backend=backend, cross_attention_layers=(0, 1)).eval()
    with torch.no_grad():
        cache = only_cross([embeds, None], mask[:, :7, :7], positions[:, :7], return_cache=True).cache
        a = only_cross([None, suffix], suffix_mask, suffix_positions, cache=cache).hidden_states[1]
        b = only_cross([None, suffix], suffix_mask, suffix_positions + 11, cache=cache).hidden_states[1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    names = dict(stack.expert_named_parameters(1))
    assert "layers.1.cross_attention.0.k_proj.weight" in names and names["layers.1.cross_attention.0.k_proj.weight"].shape == (32, 32)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("cross_attention_layers", [(), (1, 3)])
def test_precomputed_layout_and_cross_key_values_give_bitwise_the_plain_call(backend, cross_attention_layers):
    torch.manual_seed(0)
    base, expert = ExpertSpec("vlm", 64, 128, SPACE), ExpertSpec("action", 48, 96, SPACE, layers=(0, 1, 3))
    stack = DeepFusionStack([base, expert], 4, attention_backend=backend,
                            cross_attention_layers=cross_attention_layers).eval()
    embeds, pad, ar = random_prefix()
    suffix, suffix_pad, suffix_ar = _suffix(width=48)
    mask, positions = joint_mask(pad, ar, suffix_pad, suffix_ar)
    suffix_mask, suffix_positions = suffix_mask_and_positions(pad, ar, suffix_pad, suffix_ar)
    with torch.no_grad():
        cache = stack([embeds, None], mask[:, :7, :7], positions[:, :7], return_cache=True).cache
        plain = stack([None, suffix], suffix_mask, suffix_positions, cache=cache).hidden_states[1]
        projected = stack.project_cross_key_values(cache)
        layout = stack.layout(suffix_mask, suffix_positions, (0, 5), past_len=7, mask_dtype=torch.float32)
        fast = stack([None, suffix], cache=projected, layout=layout).hidden_states[1]
        joint_layout = stack.layout(mask, positions, (7, 5))
        joint = stack([embeds, suffix], layout=joint_layout).hidden_states[1]
    assert torch.equal(fast, plain)
    torch.testing.assert_close(joint, plain, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(projected.keys, cache.keys) if a is not None)
    crossed = [i for i, kv in enumerate(projected.cross_key_values) if kv is not None]
    assert crossed == list(cross_attention_layers)
    assert all(kv[0][0].shape == (2, SPACE.num_kv_heads, 7, SPACE.head_dim) for kv in projected.cross_key_values if kv)
    # one layout per token layout: the layers with the same experts share one mask/table slice
    assert layout.layers[0] is layout.layers[1] and layout.layers[2] is None
    assert layout.layers[0][0].dtype == torch.float32 and not layout.layers[0][0].dtype == torch.bool


def test_layout_errors():
    stack = tiny_stack(base_width=64, base_layers=2, expert_width=32, expert_layers=(0, 1))
    suffix, suffix_pad, suffix_ar = _suffix()
    embeds, pad, ar = random_prefix()
    suffix_mask, suffix_positions = suffix_mask_and_positions(pad, ar, suffix_pad, suffix_ar)
    with torch.no_grad():
        cache = stack([embeds, None], block_causal_mask(pad, ar), positions_from_pad(pad), return_cache=True).cache
    layout = stack.layout(suffix_mask, suffix_positions, (0, 5), past_len=7)
    with pytest.raises(ValueError, match="either a layout or attention_mask"):
        stack([None, suffix], suffix_mask, suffix_positions, cache=cache, layout=layout)
    with pytest.raises(ValueError, match="needs attention_mask and position_ids, or a layout"):
        stack([None, suffix], cache=cache)
    with pytest.raises(ValueError, match=r"built for stream lengths \(0, 5\) after 7 cached tokens; this call has \(0, 4\)"):
        stack([None, suffix[:, :4]], cache=cache, layout=layout)
    with pytest.raises(ValueError, match=r"one length per expert \(2\); got 1"):
        stack.layout(suffix_mask, suffix_positions, (5,))


def test_attention_dtype_follows_the_weights_and_autocast():
    assert attention_dtype(torch.float32, "cpu") == torch.float32
    assert attention_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert attention_dtype(torch.float32, "meta") == torch.float32  # no autocast on meta
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_dtype(torch.float32, "cpu") == torch.bfloat16


def test_first_n_layers_accepts_one_to_all_layers_only():
    assert first_n_layers(4, 1) == (0,) and first_n_layers(4, 4) == (0, 1, 2, 3)
    for n in (0, 5):
        with pytest.raises(ValueError, match=rf"first_n_layers needs 1 <= n <= num_layers \(4\); got {n}"):
            first_n_layers(4, n)


def test_key_value_cross_attention_has_no_biases_unless_asked_and_switches_backend():
    plain = KeyValueCrossAttention(24, SPACE)
    assert all(getattr(plain, name).bias is None for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    biased = KeyValueCrossAttention(24, SPACE, bias=True)
    assert all(getattr(biased, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    plain.set_backend("eager")
    assert plain.backend == "eager"


def test_imported_config_defaults_and_refusals():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32)
    spec, depth = base_spec_from_config(config)
    assert depth == 2 and spec.head_space.head_dim == 32  # an explicit head_dim wins over hidden / heads (16)
    del config.hidden_act  # older configs: SiLU
    spec, _ = base_spec_from_config(config)
    assert isinstance(spec.act_layer(), torch.nn.SiLU)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=r"only default RoPE is supported; config has rope_type 'linear'"):
        base_spec_from_config(config)


def test_spec_and_stack_bounds():
    ExpertSpec("tiny", 1, 1, SPACE)  # width and MLP of one unit are valid (if useless)
    for field, value in (("width", 0), ("mlp_dim", 0)):
        with pytest.raises(ValueError, match=rf"ExpertSpec 'x': {field} must be an int >= 1; got 0"):
            ExpertSpec("x", **{"width": 8, "mlp_dim": 8, field: value}, head_space=SPACE)
    for eps in (0.0, -1e-6, float("nan"), True):
        with pytest.raises(ValueError, match=r"the norm epsilon must be a finite number > 0"):
            ExpertSpec("x", 8, 8, SPACE, norm_eps=eps)
    base, expert = ExpertSpec("vlm", 64, 128, SPACE), ExpertSpec("action", 32, 64, SPACE)
    DeepFusionStack([base, expert], 4, cross_attention_layers=(0, 3))
    for layers in ((4,), (-1,)):
        with pytest.raises(ValueError, match=rf"cross_attention_layers \[{layers[0]}\] are out of range for 4 layers \(valid 0..3\)"):
            DeepFusionStack([base, expert], 4, cross_attention_layers=layers)


def test_an_adarms_stack_is_built_on_the_given_device_and_dtype():
    base = ExpertSpec("vlm", 64, 128, SPACE)
    expert = ExpertSpec("action", 32, 64, SPACE, adarms_cond_dim=16)
    stack = DeepFusionStack([base, expert], 2, device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in stack.parameters()} == {"meta"} and {p.dtype for p in stack.parameters()} == {torch.bfloat16}
