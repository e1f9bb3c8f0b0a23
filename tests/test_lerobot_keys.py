"""Every key of LeRobot's full-size pi0 and pi0.5 (listed by tests/data/lerobot_policies/generate.py
from LeRobot 0.6.1's own classes on the meta device) is mapped onto the vlablocks recipe of the same
name, or declared unused, and the shapes agree; every vlablocks parameter is filled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlablocks.convert.lerobot_config import pi0_overrides
from vlablocks.convert.lerobot_keys import UNUSED, check_shapes, map_keys, pi0_key
from vlablocks.recipes import build
from vlablocks.recipes.loader import load_recipe

POLICIES = Path(__file__).resolve().parent / "data" / "lerobot_policies"


def lerobot_shapes(name: str) -> dict[str, list[int]]:
    return json.loads((POLICIES / name / "keys_full.json").read_text())["keys"]


def vlablocks_shapes(recipe: str) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in build(recipe, load_weights=False, device="meta").state_dict().items()}


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_full_size_keys_are_mapped_or_declared_unused_with_equal_shapes(name):
    theirs, ours = lerobot_shapes(name), vlablocks_shapes(name)
    assert check_shapes(theirs, ours) == []
    mapped, unused = map_keys(theirs)
    assert sorted(k.removeprefix("model.") for k in unused) == sorted(UNUSED)
    assert len(mapped) + len(unused) == len(theirs) == {"pi0": 778, "pi05": 813}[name]
    assert set(mapped.values()) == {k for k in ours if not k.startswith("normalizer.")}


def test_the_table_fails_loudly():
    theirs, ours = lerobot_shapes("pi0"), vlablocks_shapes("pi0")
    key = "model.paligemma_with_expert.gemma_expert.model.layers.3.self_attn.q_proj.weight"
    assert pi0_key(key) == "head.denoiser.stack.layers.3.attention.experts.1.q_proj.weight"
    assert pi0_key("model.time_mlp_in.bias") == "head.denoiser.suffix_encoder.time_fusion.embedder.mlp.fc1.bias"
    with pytest.raises(KeyError, match=r"LeRobot key 'paligemma_with_expert.gemma_expert.extra.weight' is neither mapped"):
        pi0_key("model.paligemma_with_expert.gemma_expert.extra.weight")
    wrong = {**theirs, key: [1, 2]}
    assert check_shapes(wrong, ours) == [f"{key} [1, 2] -> "
                                         "head.denoiser.stack.layers.3.attention.experts.1.q_proj.weight [2048, 1024]"]
    missing = {k: v for k, v in theirs.items() if "state_proj" not in k}
    assert check_shapes(missing, ours) == [f"head.denoiser.suffix_encoder.state_proj.{kind}: no LeRobot key fills it"
                                           for kind in ("bias", "weight")]


#: LeRobot 0.6.1's defaults for the settings the converter reads (configuration_pi0.py / _pi05.py).
FULL_CONFIG = {"chunk_size": 50, "max_state_dim": 32, "max_action_dim": 32, "num_inference_steps": 10,
               "min_period": 4e-3, "max_period": 4.0}


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_recipe_derived_from_full_size_shapes_fits_every_key(name):
    """The converter's recipe, derived from the full-size policy's shapes and config alone (no
    bundled sizes), builds a policy every LeRobot key fills with its shape."""
    theirs = lerobot_shapes(name)
    config = {**FULL_CONFIG, "type": name, "tokenizer_max_length": {"pi0": 48, "pi05": 200}[name],
              "normalization_mapping": {"STATE": "MEAN_STD" if name == "pi0" else "QUANTILES",
                                        "ACTION": "MEAN_STD" if name == "pi0" else "QUANTILES"}}
    overrides = pi0_overrides(config, theirs)
    assert "vision.config.num_attention_heads=16" in overrides and "backbone.experts.1.width=1024" in overrides
    vla = build(load_recipe(name, overrides), load_weights=False, device="meta")
    ours = {k: list(v.shape) for k, v in vla.state_dict().items()}
    assert check_shapes(theirs, ours) == []
    assert vla.config.norm_convention == "lerobot" and vla.config.resize_images == "pad_center"
    assert vla.config.task_newline == (name == "pi0")
