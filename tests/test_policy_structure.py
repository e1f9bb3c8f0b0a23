"""The VLA declares its own structure (``backbone``, ``denoiser``, ``encode``, ``param_groups``) and
the trainer, the CLI and the benchmarks consume it; scales written ``sqrt_width`` are derived."""

from __future__ import annotations

import itertools
import math

import pytest
import numpy as np
import torch

from vlablocks.blocks.fusion import DeepFusionStack
from vlablocks.policy.checks import random_batch
from vlablocks.policy.config import discretize_state_prompts
from vlablocks.policy.normalize import FeatureNormalizer
from vlablocks.recipes import build
from vlablocks.recipes.loader import RecipeError
from vlablocks.train.groups import parameter_groups
from vlablocks.train.config import TrainConfig

TINY = ("tiny_pi0", "tiny_pi05", "tiny_smolvla", "tiny_gr00t", "tiny_llava3d_deepfusion",
        "tiny_llava3d_deepfusion_shared", "tiny_llava3d_dit_layerwise", "tiny_llava3d_hybrid", "tutorial_state_expert")


def reference_groups(vla, config: TrainConfig) -> list[tuple[str, float, list[str]]]:
    """The trainer's groups as the code before ``param_groups`` computed them, from the stack directly."""
    stack = vla.backbone
    k = config.backbone_unfreeze_layers
    names = {id(p): n for n, p in vla.named_parameters()}
    vision = [p for m in (vla.vision, vla.projector, vla.geometry) if m is not None for p in m.parameters()]
    base = [p for _, p in stack.expert_named_parameters(0)] + list(vla.text.parameters())
    top = tuple(f"layers.{i}." for i in range(stack.num_layers - k, stack.num_layers)) + ("final_norms.0.",)
    unfrozen = {id(p) for n, p in stack.expert_named_parameters(0) if k and n.startswith(top)}
    experts = [p for e in range(1, len(stack.experts)) for _, p in stack.expert_named_parameters(e)]
    members = [("vision", vision, config.freeze_vision, 1.0), ("backbone", base, config.freeze_backbone,
               config.backbone_lr_scale), ("experts", experts, False, config.expert_lr_scale),
               ("other", list(vla.parameters()), False, 1.0)]
    claimed: set[int] = set()
    groups = []
    for name, params, frozen, scale in members:
        fresh = [p for p in dict.fromkeys(params) if id(p) not in claimed]
        claimed.update(id(p) for p in fresh)
        trainable = [names[id(p)] for p in fresh if not frozen or id(p) in unfrozen]
        if trainable:
            groups.append((name, config.lr * scale, trainable))
    return groups


@pytest.mark.parametrize("name", TINY)
def test_param_groups_partition_the_parameters(name):
    vla = build(name, load_weights=False, device="meta")
    groups = vla.param_groups()
    listed = [n for params in groups.values() for n in params]
    assert sorted(listed) == sorted(n for n, _ in vla.named_parameters()) and len(listed) == len(set(listed))
    layers = [g for g in groups if g.startswith("backbone.layers.")]
    assert layers == [f"backbone.layers.{i}" for i in range(vla.backbone.num_layers)]
    path = next(n for n, m in vla.named_modules() if m is vla.backbone) + "."  # head.denoiser(.fusion).stack.
    assert all(n.startswith(path) for g in (*layers, "backbone.final_norm") for n in groups[g])
    assert {g.removeprefix("experts.") for g in groups if g.startswith("experts.")} == \
        {spec.name for spec in vla.backbone.experts[1:]}
    assert set(groups) - set(layers) <= {"vision", "projector", "geometry", "backbone.final_norm", "text", "state_proj",
                                         "suffix", "head"} | {g for g in groups if g.startswith("experts.")}


@pytest.mark.parametrize("name", TINY)
def test_trainer_groups_are_those_of_the_old_rule(name):
    vla = build(name, load_weights=False, device="meta")
    for freeze_vision, freeze_backbone, k in itertools.product([False, True], [False, True], [0, 1, 2]):
        if k and not freeze_backbone:
            continue
        config = TrainConfig(freeze_vision=freeze_vision, freeze_backbone=freeze_backbone, backbone_unfreeze_layers=k,
                             backbone_lr_scale=0.1, expert_lr_scale=0.5)
        ours = [(g.name, g.lr, list(g.params)) for g in parameter_groups(vla, config)]
        assert ours == reference_groups(vla, config), (freeze_vision, freeze_backbone, k)


def test_backbone_and_denoiser_are_the_head_parts():
    vla = build("tiny_pi0")
    assert isinstance(vla.backbone, DeepFusionStack) and vla.backbone is vla.head.denoiser.stack
    assert vla.denoiser is vla.head.denoiser


@pytest.mark.parametrize(("name", "suffix_state"), [("tiny_pi0", True), ("tiny_pi05", False), ("tiny_smolvla", False)])
def test_encode_normalises_the_state_once(name, suffix_state, monkeypatch):
    vla = build(name).eval()
    vla.normalizer["state"].set_stats(mean=torch.full((5,), 0.5), std=torch.full((5,), 2.0),
                                      q01=-torch.ones(5), q99=torch.ones(5))
    batch = random_batch(vla, batch_size=2)
    calls = []
    normalize = FeatureNormalizer.normalize

    def counting(self, x):
        calls.append(self)
        return normalize(self, x)

    monkeypatch.setattr(FeatureNormalizer, "normalize", counting)
    prefix, state = vla.encode(batch)
    assert calls == [vla.normalizer["state"]]
    assert prefix.embeds.shape[:2] == prefix.pad.shape == prefix.ar.shape
    if suffix_state:
        torch.testing.assert_close(state, vla.normalizer["state"].normalize(batch["state"]), rtol=0, atol=0)
    else:
        assert state is None
    calls.clear()
    vla(batch)
    assert calls.count(vla.normalizer["state"]) == 1 and calls.count(vla.normalizer["action"]) == 1


def openpi_prompt(task: str, state: torch.Tensor, bins: int) -> str:
    """The prompt as openpi and LeRobot build it, one sample with numpy."""
    digits = np.digitize(state.numpy(), bins=np.linspace(-1, 1, bins + 1)[:-1]) - 1
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(str(int(d)) for d in digits)};\nAction: "


def test_discretised_prompts_equal_openpis():
    """Bins as ``np.digitize(state, linspace(-1, 1, bins + 1)[:-1]) - 1``: below -1 is bin -1, from
    1 up is the last bin, and a value on an edge opens the bin above it."""
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor([[-1.0, 1.0, 0.0, 1e-9, -1e-9, 0.5], [-1.5, 7.0, -1.0 + 2 / 256, 1 - 2 / 256, -1e-30, 0.999]])
    state = torch.cat([torch.rand(3, 6, generator=gen) * 2.4 - 1.2, edges])
    tasks = ["pick_up the\nblock ", "a", "b", "c", "d"]
    for bins in (2, 7, 256):
        assert discretize_state_prompts(tasks, state, bins) == [openpi_prompt(t, s, bins) for t, s in zip(tasks, state)]
    assert discretize_state_prompts(tasks[:1], torch.tensor([[-5.0, 5.0, -1.0]]), 4) == [
        "Task: pick up the block, State: -1 3 0;\nAction: "]


@pytest.mark.parametrize(("name", "width", "hand_typed"), [("pi0", 2048, 45.254833995939045),
                                                           ("smolvla", 960, 30.983866769659336)])
def test_sqrt_width_is_derived_and_equals_the_old_hand_typed_values(name, width, hand_typed):
    vla = build(name, load_weights=False, device="meta")
    assert vla.text.width == width and vla.text._scale_repr == math.sqrt(width) == hand_typed
    if name == "smolvla":
        assert vla.config.image_embed_scale == hand_typed
    for tiny in ("tiny_pi0", "tiny_pi05", "tiny_smolvla"):
        assert build(tiny, load_weights=False, device="meta").text._scale_repr == 8.0  # sqrt(64), from the parent


def test_a_scale_that_is_neither_a_number_nor_sqrt_width_is_refused():
    with pytest.raises(RecipeError, match=r"text\.embed_scale.*expected a number or 'sqrt_width'; got 'sqrt'"):
        build("tiny_pi0", overrides=["text.embed_scale=sqrt"], load_weights=False, device="meta")
    vla = build("tiny_pi0", overrides=["text.embed_scale=2.5"], load_weights=False, device="meta")
    assert vla.text._scale_repr == 2.5


def test_forward_takes_noise_and_gives_per_element_losses():
    """``VLA.forward(noise=, reduction="none")``: the same noise and times give the same losses,
    and their mean over the data's dims and valid steps is the training loss."""
    torch.manual_seed(0)
    vla = build("tiny_pi0").eval()
    batch = random_batch(vla, batch_size=2)
    horizon, action_dim, width = vla.config.horizon, vla.config.action_dim, batch["actions"].shape[-1]
    noise, t = torch.randn(2, horizon, action_dim), torch.tensor([0.3, 0.8])
    per_element = vla(batch, t=t, noise=noise, reduction="none").loss
    assert per_element.shape == (1, 2, horizon, action_dim)
    assert torch.equal(per_element, vla(batch, t=t, noise=noise, reduction="none").loss)
    assert "action_mask" not in batch  # every step valid; dims past the data's are padding
    valid = per_element[..., :width]
    torch.testing.assert_close(vla(batch, t=t, noise=noise).loss, valid.mean(), rtol=1e-6, atol=0)
