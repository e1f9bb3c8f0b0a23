"""LeRobot 0.6.1's SmolVLA as a vlablocks VLA: the declared key table covers the full-size policy
(every key mapped or declared unused, shapes equal, every vlablocks parameter filled), and the tiny
fixture written by LeRobot's own classes (tests/data/lerobot_policies/smolvla, README there) gives
LeRobot's per-element loss, gradients and sampled actions when loaded through the table.

The reference tensors are LeRobot's; this suite does not need LeRobot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vlablocks.convert.smolvla_keys import (
    UNUSED, SmolVLALayout, check_shapes, map_keys, smolvla_key, smolvla_overrides, smolvla_tokenizer,
)
from lerobot_roundtrip import tiny_vlm_repository
from vlablocks.convert.lerobot import convert_lerobot
from vlablocks.policy.images import resize_with_pad
from vlablocks.policy.vla import VLA
from vlablocks.recipes import build, from_pretrained
from vlablocks.recipes.loader import load_recipe

POLICIES = Path(__file__).resolve().parent / "data" / "lerobot_policies"
FIXTURE = POLICIES / "smolvla"
TOKENIZER = POLICIES / "tokenizer"
#: LeRobot's SmolVLA defaults (configuration_smolvla.py), the config keys_full.json was built with.
FULL_CONFIG = {"chunk_size": 50, "max_state_dim": 32, "max_action_dim": 32, "num_steps": 10, "tokenizer_max_length": 48,
               "resize_imgs_with_padding": [512, 512], "num_vlm_layers": 16}


@dataclass
class Fixture:
    """The tiny policy as vlablocks loads it, and LeRobot's reference."""

    vla: VLA
    config: dict[str, Any]
    reference: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def batch(self) -> dict[str, Any]:
        """The raw inputs (before LeRobot's processors) in vlablocks' batch layout."""
        return {"images": self.tensors["raw.image"][:, None], "task": list(self.reference["tasks_raw"]),
                "state": self.tensors["raw.state"], "actions": self.tensors["raw.action"]}


def load_smolvla_fixture(tmp: Path) -> Fixture:
    """The fixture converted by ``vlablocks.convert.lerobot`` and read back by ``from_pretrained``
    (strict: every parameter from the key table, the normalisers from the processor's file)."""
    out = convert_lerobot(FIXTURE, tmp / "converted", tokenizer=tiny_vlm_repository(tmp / "vlm"))
    config = json.loads((FIXTURE / "config.json").read_text())
    reference = json.loads((FIXTURE / "reference.json").read_text())
    return Fixture(from_pretrained(out).eval(), config, reference, load_file(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> Fixture:
    return load_smolvla_fixture(tmp_path_factory.mktemp("smolvla"))


def max_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return float((ours.detach().float() - theirs.float()).abs().max())


# ------------------------------------------------------------------------------- parity


def test_the_model_sees_what_lerobots_model_saw(fixture):
    """Resize-with-pad (left/top), the task's new line and tokens, eps 1e-8 normalisation."""
    vla, ref = fixture.vla, fixture.tensors
    images = vla.vision.normalize(resize_with_pad(ref["raw.image"], vla.vision.image_size, "top_left"))
    assert max_error(images, ref["model.image"]) <= 1e-6
    ids, mask = vla.text.tokenizer([task + "\n" for task in fixture.reference["tasks_raw"]])
    assert torch.equal(ids, ref["model.lang_tokens"]) and torch.equal(mask, ref["model.lang_masks"].bool())
    assert max_error(vla.normalizer["state"].normalize(ref["raw.state"]), ref["model.state"]) <= 1e-6
    assert max_error(vla.normalizer["action"].normalize(ref["raw.action"]), ref["model.actions"]) <= 1e-6


def test_loss_per_element_equals_lerobots(fixture):
    """``VLAFlowMatching.forward``'s squared errors ``[B, H, max_action_dim]``, padded dims included
    (both sides pad the normalised actions with zeros and keep those elements unreduced)."""
    ref = fixture.tensors
    out = fixture.vla.forward(fixture.batch(), t=ref["time"], noise=ref["noise"], reduction="none")
    assert max_error(out.loss[0], ref["loss_per_element"]) <= 1e-5
    mean = fixture.vla.forward(fixture.batch(), t=ref["time"], noise=ref["noise"])  # over the data's 3 dims
    assert max_error(mean.loss, ref["policy_forward_loss"][0]) <= 1e-5


def test_gradients_equal_lerobots(fixture):
    ref, vla = fixture.tensors, fixture.vla
    vla.zero_grad()
    loss = vla.forward(fixture.batch(), t=ref["time"], noise=ref["noise"], reduction="none").loss[0]
    loss[:, :, :3].sum().backward()
    params = dict(vla.named_parameters())
    errors = {}
    for name in fixture.reference["grad_params"]:
        theirs = ref[f"grad.{name}"]
        errors[name] = max_error(params[smolvla_key(name)].grad, theirs) / float(theirs.abs().max())
    vla.zero_grad()
    assert len(errors) == 9 and max(errors.values()) <= 1e-5, errors


def test_sampled_actions_equal_lerobots(fixture):
    """3 Euler steps over the prefix cache (LeRobot: ``sample_actions`` with ``use_cache``)."""
    ref, vla = fixture.tensors, fixture.vla
    actions = vla.predict_action(fixture.batch(), noise=ref["sample_noise"])
    assert max_error(actions, ref["predict_action_chunk_unnormalized"]) <= 1e-5
    with torch.no_grad():
        prefix, state = vla.encode(fixture.batch())
        normalized = vla.head.sample(prefix, state, noise=ref["sample_noise"])
    assert max_error(normalized, ref["sampled_actions"]) <= 1e-5
    assert max_error(normalized[..., :3], ref["predict_action_chunk"]) <= 1e-5


# ------------------------------------------------------------------------------- key table


def full_shapes() -> dict[str, list[int]]:
    return json.loads((FIXTURE / "keys_full.json").read_text())["keys"]


def test_full_size_keys_are_mapped_or_declared_unused_with_equal_shapes():
    theirs = full_shapes()
    overrides = smolvla_overrides(FULL_CONFIG, theirs)
    assert "backbone.experts.0.head_space={num_heads: 15, num_kv_heads: 5, head_dim: 64, rope_theta: 10000.0}" in overrides
    assert "backbone.cross_attention_layers=[1, 3, 5, 7, 9, 11, 13, 15]" in overrides
    ours = {k: list(v.shape) for k, v in
            build(load_recipe("smolvla", overrides), load_weights=False, device="meta").state_dict().items()}
    assert check_shapes(theirs, ours) == []
    mapped, unused = map_keys(theirs)
    assert sorted(k.removeprefix("model.") for k in unused) == sorted(UNUSED)
    assert len(mapped) + len(unused) == len(theirs) == 500
    assert set(mapped.values()) == {k for k in ours if not k.startswith("normalizer.")}


def test_the_table_fails_loudly():
    expert = "model.vlm_with_expert.lm_expert.layers.{}.self_attn.k_proj.weight"
    assert smolvla_key(expert.format(2)) == "head.denoiser.stack.layers.2.attention.experts.1.k_proj.weight"
    assert smolvla_key(expert.format(3)) == "head.denoiser.stack.layers.3.cross_attention.0.k_proj.weight"
    assert smolvla_key("vlm_with_expert.lm_expert.layers.3.mlp.up_proj.weight") == "head.denoiser.stack.layers.3.mlps.1.up_proj.weight"
    assert smolvla_key("model.action_time_mlp_out.bias") == "head.denoiser.suffix_encoder.time_fusion.mlp.fc2.bias"
    # an expert half as deep as the VLM: expert layer j beside VLM layer 2j
    assert smolvla_key(expert.format(3), SmolVLALayout(expert_stride=2)) == \
        "head.denoiser.stack.layers.6.attention.experts.1.k_proj.weight"
    with pytest.raises(KeyError, match=r"LeRobot key 'vlm_with_expert.lm_expert.embed_tokens.weight' is neither mapped"):
        smolvla_key("model.vlm_with_expert.lm_expert.embed_tokens.weight")
    theirs = full_shapes()
    ours = {k: list(v.shape) for k, v in
            build(load_recipe("smolvla", smolvla_overrides(FULL_CONFIG, theirs)), load_weights=False,
                  device="meta").state_dict().items()}
    missing = {k: v for k, v in theirs.items() if "state_proj" not in k}
    assert check_shapes(missing, ours) == [f"state_proj.{kind}: no LeRobot key fills it" for kind in ("bias", "weight")]


def fixture_vlm_config() -> dict[str, Any]:
    return json.loads((FIXTURE / "reference.json").read_text())["tiny_smolvlm"]


def test_overrides_refuse_what_they_cannot_reproduce():
    config = json.loads((FIXTURE / "config.json").read_text())
    shapes = {k: list(v.shape) for k, v in load_file(FIXTURE / "model.safetensors").items()}
    # SmolVLM2's head width 64 does not fit the tiny VLM: its head counts must be given
    with pytest.raises(ValueError, match=r"the vision tower: width 32 is not a multiple of SmolVLM2's head width 64"):
        smolvla_overrides(config, shapes)
    with pytest.raises(ValueError, match=r"k_proj has 32 rows: not 2 key/value heads of width 64 \(1 query heads\)"):
        smolvla_overrides(config, shapes, num_kv_heads=2, vision_num_heads=2)
    heads = {"num_heads": 4, "num_kv_heads": 2, "vision_num_heads": 2}
    assert smolvla_overrides(config, shapes, **heads) == smolvla_overrides(config, shapes, vlm_config=fixture_vlm_config())
    with pytest.raises(ValueError, match=r"add_image_special_tokens.*expected false"):
        smolvla_overrides({**config, "add_image_special_tokens": True}, shapes)
    with pytest.raises(ValueError, match=r"normalization_mapping.STATE.*got 'MIN_MAX'"):
        smolvla_overrides({**config, "normalization_mapping": {"STATE": "MIN_MAX"}}, shapes)
    with pytest.raises(ValueError, match=r"expert layer 1 \(VLM layer 1\) has k_proj input width 32.*self-attention"):
        smolvla_overrides({**config, "self_attn_every_n_layers": 1}, shapes)
    with pytest.raises(ValueError, match=r"resize_imgs_with_padding=\[64, 64\]"):
        smolvla_overrides({**config, "resize_imgs_with_padding": [64, 64]}, shapes, **heads)
    with pytest.raises(ValueError, match=r"width 64 does not split into 5 heads"):
        smolvla_overrides(config, shapes, num_heads=5, vision_num_heads=2)
    assert smolvla_tokenizer(config) == "../tokenizer"
