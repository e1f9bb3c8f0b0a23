"""``policy.precision: bfloat16``: LeRobot's pi0 / pi0.5 precision policy as a recipe option.

Each tiny policy is built twice with the same weights, in float32 and in bfloat16 (the fusion
stack's attention / MLP weights and the token embedding bf16; vision, projector, every norm,
the state and suffix projections fp32), its norms and AdaRMS modulations randomised so that no
branch is closed at initialisation.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm
from vlablocks.policy.checks import random_batch
from vlablocks.policy.precision import apply_precision, parameter_dtypes
from vlablocks.policy.vla import WEIGHTS_FILE
from vlablocks.recipes import RecipeError, build, from_pretrained, load_recipe

NAMES = ["tiny_pi0", "tiny_pi05", "tiny_smolvla"]
#: groups of VLA.param_groups() kept in float32 as a whole (LeRobot: vision tower, projector and
#: the model-level projections outside PaliGemmaWithExpertModel).
FLOAT32_GROUPS = ("vision", "projector", "geometry", "state_proj", "suffix")
#: fp32-vs-bf16 action tolerance: bf16 keeps 8 significant bits (relative step 2**-8 = 0.4 %);
#: through 2-4 layers and 10 Euler steps the actions (of size ~2-3) stay within 0.05 (measured
#: max abs errors: pi0 0.005, pi0.5 0.002, SmolVLA 0.0003).
ACTION_ATOL = 0.05


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    """``(name, float32 policy, bfloat16 policy, batch, noise)`` with the same weights."""
    name = request.param
    torch.manual_seed(0)
    reference = build(load_recipe(name))
    with torch.no_grad():  # open the zero-initialised Gemma norms and AdaRMS gates
        for module in reference.modules():
            if isinstance(module, (RMSNorm, AdaRMSNorm)):
                for param in module.parameters():
                    param.normal_(std=0.1)
    model = build(load_recipe(name, ["policy.precision=bfloat16"]))
    model.load_state_dict(reference.state_dict())
    batch = random_batch(model, batch_size=2)
    noise = torch.randn(2, model.config.horizon, model.config.action_dim, generator=torch.Generator().manual_seed(1))
    return name, reference, model, batch, noise


def test_every_parameter_has_the_declared_dtype(pair):
    _, reference, model, _, _ = pair
    norm_params = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, AdaRMSNorm)) for p in m.parameters()}
    seen = 0
    for group, params in model.param_groups().items():
        for name, param in params.items():
            keep = group in FLOAT32_GROUPS or id(param) in norm_params
            assert param.dtype == (torch.float32 if keep else torch.bfloat16), (group, name, param.dtype)
            seen += 1
    assert seen == len(list(model.parameters()))
    assert parameter_dtypes(model) == {n: p.dtype for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in reference.parameters())
    assert all(b.dtype != torch.bfloat16 for b in model.buffers())  # statistics untouched
    assert norm_params and any(p.dtype == torch.bfloat16 for p in model.text.parameters())


def test_pi05_keeps_its_adarms_modulation_in_float32():
    model = build(load_recipe("tiny_pi05", ["policy.precision=bfloat16"]))
    modulations = [m.modulation for m in model.modules() if isinstance(m, AdaRMSNorm)]
    assert modulations and all(p.dtype == torch.float32 for m in modulations for p in m.parameters())


def test_forward_and_backward_give_every_trainable_parameter_a_grad_of_its_dtype(pair):
    _, reference, model, batch, _ = pair
    grads = {}
    for policy in (reference, model):
        policy.train()
        policy.zero_grad()
        out = policy(batch, generator=torch.Generator().manual_seed(0))
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        out.loss.backward()
        grads[policy is model] = {n for n, p in policy.named_parameters() if p.grad is not None}
    # the same parameters get a grad as in float32 (the base's last layer and final norm feed
    # nothing the suffix reads), and each grad is finite and of its parameter's dtype
    assert grads[True] == grads[False] and grads[True]
    for name, param in model.named_parameters():
        if name in grads[True]:
            assert param.grad.dtype == param.dtype, name
            assert torch.isfinite(param.grad).all(), name
    model.zero_grad()


def test_predict_action_is_float32_and_close_to_the_float32_policy(pair):
    _, reference, model, batch, noise = pair
    reference.eval()
    model.eval()
    actions = model.predict_action(batch, noise=noise)
    expected = reference.predict_action(batch, noise=noise)
    assert actions.dtype == torch.float32
    torch.testing.assert_close(actions, expected, atol=ACTION_ATOL, rtol=0)
    assert not torch.equal(actions, expected)  # bf16 really ran


def test_save_and_load_keep_the_dtypes_and_the_actions(pair, tmp_path):
    _, _, model, batch, noise = pair
    model.eval()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as weights:
        stored = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert {"BF16", "F32"} <= stored
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.config.precision == "bfloat16"
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    assert torch.equal(loaded.predict_action(batch, noise=noise), model.predict_action(batch, noise=noise))


def test_the_option_round_trips_through_the_recipe(tmp_path):
    model = build(load_recipe("tiny_pi0", ["policy.precision=bfloat16"]))
    assert model.config.precision == "bfloat16"
    assert model.export_recipe(tmp_path)["policy"]["precision"] == "bfloat16"
    assert build(load_recipe("tiny_pi0")).config.precision == "float32"
    meta = build(load_recipe("tiny_pi0", ["policy.precision=bfloat16"]), device="meta")
    assert {n: p.dtype for n, p in meta.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}


def test_float32_leaves_the_policy_as_built():
    model = build(load_recipe("tiny_smolvla"))
    before = {n: p.dtype for n, p in model.named_parameters()}
    apply_precision(model, "float32")
    assert {n: p.dtype for n, p in model.named_parameters()} == before


def test_bad_values_and_unsupported_heads_are_refused():
    with pytest.raises(RecipeError, match=r"policy.precision: expected one of \['float32', 'bfloat16'\]; got 'half'"):
        build(load_recipe("tiny_pi0", ["policy.precision=half"]))
    with pytest.raises(ValueError, match="needs a deep_fusion denoiser.*LayerwiseDiTDenoiser"):
        build(load_recipe("tiny_llava3d_dit_layerwise", ["policy.precision=bfloat16"]))
