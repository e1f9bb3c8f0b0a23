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

from helpers import write_toy_dataset
from lerobot_roundtrip import FIXTURES, NAMES, OVERRIDES, TOKENIZER, convert_fixture, exported_fixture
from vlablocks.cli import main
from vlablocks.data import LeRobotDataset
from vlablocks.convert.lerobot import ConversionError
from vlablocks.convert.lerobot_export import export_lerobot, lerobot_state_dict
from vlablocks.recipes.builder import build, from_pretrained
from vlablocks.train.export import merged_policy


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


def test_convert_fine_tune_with_lora_and_export_from_the_command_line(tmp_path, capsys):
    """``vlablocks convert lerobot`` -> ``vlablocks train DIR train.finetune=lora`` on a robot with
    4-dim actions -> ``vlablocks export RUN OUT --lerobot``: LeRobot's files hold the merged
    weights, the run's statistics and the new action width."""
    converted = tmp_path / "pi0"
    assert main(["convert", "lerobot", str(FIXTURES / "pi0"), str(converted), *OVERRIDES["pi0"],
                 "--tokenizer", str(TOKENIZER)]) == 0
    assert "converted to" in capsys.readouterr().out
    data = write_toy_dataset(tmp_path / "data", lengths=(6, 6))
    run = tmp_path / "run"
    assert main(["train", str(converted), "--data", str(data), "--out", str(run), "--steps", "2", "train.batch_size=2",
                 "train.finetune=lora", "train.lora.rank=2", "train.lr=1e-2"]) == 0
    capsys.readouterr()
    out = tmp_path / "lerobot"
    assert main(["export", str(run), str(out), "--lerobot"]) == 0
    assert f"from {converted}" in capsys.readouterr().out  # found through the run's init directory
    merged, _ = merged_policy(run)
    written = load_file(out / "model.safetensors")
    expected = lerobot_state_dict(merged, converted)
    assert sorted(written) == sorted(expected) and all(torch.equal(written[k], expected[k]) for k in written)
    base = load_file(FIXTURES / "pi0" / "model.safetensors")
    key = "model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[key], base[key])  # the merged adapters changed the expert
    config = json.loads((out / "config.json").read_text())
    assert config["output_features"]["action"]["shape"] == [4] and config["input_features"]["observation.state"]["shape"] == [4]
    stats = load_file(next(out.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors")))
    assert torch.equal(stats["action.mean"], merged.normalizer["action"].mean[:4])
    dataset_mean = torch.as_tensor(LeRobotDataset(data, horizon=4).stats["action"]["mean"], dtype=torch.float32)
    assert torch.equal(stats["action.mean"], dataset_mean)  # a run from a checkpoint normalises with its data's statistics
    assert main(["export", str(run), str(out), "--lerobot"]) == 1  # never over what is there
    assert "is not an empty directory" in capsys.readouterr().err

