"""Converted -> changed -> exported to LeRobot's layout -> loaded by LeRobot predicts vlablocks' actions.

``tests/lerobot_roundtrip.py`` converts each tiny LeRobot fixture, perturbs every weight and the
statistics, and exports; ``tests/data/lerobot_policies/roundtrip.py`` loaded those exports with
LeRobot 0.6.1's own ``from_pretrained`` and processors (in LeRobot's environment) and recorded
the files' sha256, whether every weight it holds equals the file, its statistics and the actions
it predicted (``<name>/roundtrip.json``). This suite exports again, checks it wrote the very files
LeRobot read, and compares the actions.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from lerobot_roundtrip import FIXTURES, NAMES, convert_fixture, exported_fixture
from vlablocks.convert.lerobot import ConversionError
from vlablocks.convert.lerobot_export import export_lerobot
from vlablocks.recipes.builder import build, from_pretrained


@pytest.mark.parametrize("name", NAMES)
def test_lerobot_predicts_the_exported_policys_actions(name, tmp_path):
    recorded = json.loads((FIXTURES / name / "roundtrip.json").read_text())
    vla, exported = exported_fixture(name, tmp_path)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(exported.iterdir())}
    assert files == recorded["files_sha256"]  # the very files LeRobot loaded
    assert recorded["weights_equal_export"] and recorded["n_weights"] == len(load_file(exported / "model.safetensors"))
    for key, values in recorded["normalizer_stats"].items():
        feature, stat = key.rsplit(".", 1)
        normalizer = vla.normalizer["state" if feature == "observation.state" else "action"]
        assert getattr(normalizer, stat)[: normalizer.width].tolist() == values, key
    ref = load_file(FIXTURES / name / "reference.safetensors")
    info = json.loads((FIXTURES / name / "reference.json").read_text())
    batch = {"images": ref["raw.image"][:, None], "task": list(info["tasks_raw"]), "state": ref["raw.state"]}
    actions = vla.predict_action(batch, noise=ref["sample_noise"])
    theirs = torch.tensor(recorded["actions"])
    assert actions.shape == theirs.shape == (2, 4, 3)
    assert (actions - theirs).abs().max().item() <= 1e-5
    before = ref["predict_action_chunk_unnormalized"]  # the unperturbed policy's: the export carries the changes
    assert (actions - before).abs().max().item() > 1e-2


def test_export_needs_a_converted_policy_and_a_new_directory(tmp_path):
    with pytest.raises(ConversionError, match="not a policy converted from LeRobot"):
        export_lerobot(build("tiny_pi0"), tmp_path / "plain", tmp_path / "out")
    converted = convert_fixture("pi0", tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        export_lerobot(from_pretrained(converted), converted, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    changed = build(converted / "recipe.yaml", ["backbone.experts.1.mlp_dim=96"], base_dir=converted)
    with pytest.raises(ConversionError, match=r"down_proj.weight: expected .*mlps.1.down_proj.weight of shape \[32, 64\] "
                                              r"in the policy; got \[32, 96\]"):
        export_lerobot(changed, converted, tmp_path / "out")
