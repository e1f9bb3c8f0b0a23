"""Fine-tuning a loaded policy: the three modes (full, expert_only, LoRA through peft), what each
trains, LoRA checkpoints (round trip, referenced base, resume, EMA), merge and export, training
from a checkpoint directory, and ``vlablocks show`` of a mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ddp_worker import TinyDataset, stop_in_step
from helpers import write_toy_dataset
from peft import LoraConfig
from safetensors.torch import load_file
from vlablocks.recipes.builder import build, from_pretrained
from vlablocks.recipes.lora import (
    LoraSettings,
    has_lora,
    is_adapter_key,
    merge_lora,
    target_modules,
)

from vlablocks.cli import main
from vlablocks.io.manifest import CheckpointError
from vlablocks.policy.checks import random_batch
from vlablocks.policy.vla import VLA
from vlablocks.train.checkpoint import latest_checkpoint, load_ema_policy
from vlablocks.train.config import TrainConfig
from vlablocks.train.export import export_checkpoint
from vlablocks.train.groups import apply_finetune, make_optimizer, set_normalization
from vlablocks.train.trainer import Trainer

RECIPE = "tiny_pi0"
FAST = dict(batch_size=2, log_every=1, save_every=None, lr=1e-2)
LORA = TrainConfig(finetune="lora", lora=LoraSettings(rank=4, alpha=8), **FAST)


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


def tiny(seed: int = 0) -> VLA:
    torch.manual_seed(seed)
    return build(RECIPE)


def fixed_inputs(vla: VLA) -> tuple[dict, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (2, vla.config.horizon, vla.config.action_dim)
    return random_batch(vla, 2), torch.rand(2, generator=gen), torch.randn(shape, generator=gen)


def outputs(vla: VLA, inputs: tuple[dict, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    batch, t, noise = inputs
    vla.eval()
    with torch.no_grad():
        return vla(batch, t=t, noise=noise).loss, vla.predict_action(batch, noise=noise)


def expert_names(vla: VLA, index: int) -> set[str]:
    prefix = next(n for n, m in vla.named_modules() if m is vla.backbone)
    return {f"{prefix}.{n}" for n, _ in vla.backbone.expert_named_parameters(index)}


# ------------------------------------------------------------------------------------ modes


def test_lora_at_initialisation_is_bitwise_the_base_policy():
    vla = tiny()
    inputs = fixed_inputs(vla)
    loss, actions = outputs(vla, inputs)
    apply_finetune(vla, LORA)
    assert has_lora(vla)
    lora_loss, lora_actions = outputs(vla, inputs)
    assert torch.equal(loss, lora_loss) and torch.equal(actions, lora_actions)


def test_lora_trains_only_the_adapters_and_every_adapter_gets_a_gradient():
    vla = tiny()
    groups = apply_finetune(vla, LORA)
    adapters = {n for n, _ in vla.named_parameters() if is_adapter_key(n)}
    assert [g.name for g in groups] == ["lora"] and set(groups[0].params) == adapters
    assert {n for n, p in vla.named_parameters() if p.requires_grad} == adapters
    batch = random_batch(vla, 2)
    vla(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    # the action loss cannot reach the base's last-layer query, output and MLP (only its K/V feed
    # the action expert): their adapters get no gradient, as the base weights would not either
    last = "head.denoiser.stack.layers.1."
    dead = {n for n in adapters if n.startswith((f"{last}attention.experts.0.q_proj", f"{last}attention.experts.0.o_proj",
                                                 f"{last}mlps.0."))}
    assert len(dead) == 2 * 5
    live = adapters - dead
    assert {n for n, p in vla.named_parameters() if p.grad is not None} == live
    # B starts at zero: at step 0 every B has a gradient and every A's is exactly zero
    for name, p in vla.named_parameters():
        if name in live:
            assert (p.grad.abs().sum() > 0) == (".lora_B." in name), name
    optimizer = make_optimizer(groups, LORA)
    optimizer.step()
    optimizer.zero_grad()
    vla(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in vla.named_parameters() if n in live)


def test_lora_targets_select_experts_and_modules_by_name():
    vla = tiny()
    action = target_modules(vla, LoraSettings(experts=("action",), modules=("q_proj", "down_proj")))
    assert action == [f"head.denoiser.stack.layers.{i}.{m}" for i in range(2)
                      for m in ("attention.experts.1.q_proj", "mlps.1.down_proj")]
    both = target_modules(vla, LoraSettings())
    assert len(both) == 2 * 2 * 7 and set(action) < set(both)
    with pytest.raises(ValueError, match=r"unknown expert\(s\) \['gripper'\]; this policy's fusion stack has \['vlm', 'action'\]"):
        target_modules(vla, LoraSettings(experts=("gripper",)))


def test_expert_only_trains_exactly_the_action_expert_and_the_suffix():
    vla = tiny()
    groups = apply_finetune(vla, TrainConfig(finetune="expert_only"))
    trainable = {n for n, p in vla.named_parameters() if p.requires_grad}
    suffix = {n for n, _ in vla.named_parameters() if n.startswith("head.denoiser.suffix_encoder.")}
    assert trainable == expert_names(vla, 1) | suffix
    assert {n for n in trainable if n.startswith(("vision.", "projector.", "text."))} == set()
    assert not trainable & expert_names(vla, 0)
    assert [g.name for g in groups] == ["experts", "other"]
    # the same code path as freezing vision and backbone by hand
    manual = tiny()
    apply_finetune(manual, TrainConfig(freeze_vision=True, freeze_backbone=True))
    assert {n for n, p in manual.named_parameters() if p.requires_grad} == trainable


def test_show_lists_the_trainable_parameters_of_each_mode(capsys):
    counts = {}
    for mode in ("full", "expert_only", "lora"):
        assert main(["show", RECIPE, "--no-tree", f"train.finetune={mode}"]) == 0
        out = capsys.readouterr().out
        section = out.split(f"# fine-tuning: {mode}")[1].split("# parameters")[0].splitlines()
        line = next(row for row in section if row.startswith("trainable"))
        counts[mode] = int(line.split()[1].replace(",", ""))
        assert "% of" in line
    vla = tiny()
    total = sum(p.numel() for p in vla.parameters())
    expert = sum(p.numel() for n, p in vla.named_parameters() if n in expert_names(vla, 1) or "suffix_encoder" in n)
    assert counts["full"] == total and counts["expert_only"] == expert
    apply_finetune(vla, TrainConfig(finetune="lora"))
    assert counts["lora"] == sum(p.numel() for n, p in vla.named_parameters() if is_adapter_key(n))
    assert main(["show", RECIPE, "--no-tree", "train.finetune=lora", "train.lora.rank=2", "train.lora.experts=[action]"]) == 0
    assert "\nlora " in capsys.readouterr().out


def test_lora_settings_without_lora_mode_and_bad_settings_are_errors():
    with pytest.raises(ValueError, match=r"TrainConfig.lora is set but finetune is 'full'; expected finetune='lora'"):
        TrainConfig(lora=LoraSettings())
    with pytest.raises(ValueError, match=r"LoraSettings.modules must be distinct names from"):
        LoraSettings(modules=("qkv",))
    with pytest.raises(ValueError, match=r"finetune='lora' freezes every base weight .*; expected no freeze_vision=True"):
        TrainConfig(finetune="lora", freeze_vision=True)
    with pytest.raises(ValueError, match=r"expected no expert_lr_scale=0.5"):
        TrainConfig(finetune="lora", expert_lr_scale=0.5)
    assert TrainConfig(finetune="lora").lora == LoraSettings()


# ------------------------------------------------------------------------------------ checkpoints


def lora_trainer(out_dir: Path, config: TrainConfig = LORA, init: Path | None = None) -> Trainer:
    vla = from_pretrained(init) if init is not None else tiny()
    torch.manual_seed(0)
    return Trainer(vla, TinyDataset(vla, 8), config, out_dir, init_dir=init)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A saved tiny_pi0 (``VLA.save_pretrained``) with normalisation statistics."""
    vla = tiny()
    set_normalization(vla, TinyDataset(vla, 8).stats)
    return vla.save_pretrained(tmp_path_factory.mktemp("base") / "tiny_pi0")


def test_lora_checkpoint_round_trip_references_the_base(tmp_path, base_dir):
    trainer = lora_trainer(tmp_path / "run", TrainConfig(steps=2, finetune="lora", **FAST), init=base_dir)
    trainer.train()
    ckpt = latest_checkpoint(tmp_path / "run")
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "base.json", "base_buffers.safetensors",
            "recipe.yaml", "manifest.json"} <= names and "model.safetensors" not in names
    assert LoraConfig.from_pretrained(str(ckpt)).r == 16  # peft reads the adapter config
    assert all(".lora_" in k and ".default." not in k for k in load_file(ckpt / "adapter_model.safetensors"))
    loaded = from_pretrained(ckpt)
    inputs = fixed_inputs(loaded)
    for a, b in zip(outputs(loaded, inputs), outputs(trainer.vla, inputs)):
        assert torch.equal(a, b)
    # the referenced base must stay the one the adapters were trained on
    manifest = base_dir / "manifest.json"
    saved = manifest.read_bytes()
    manifest.write_bytes(saved.replace(b'"format"', b'"format" ', 1))
    try:
        with pytest.raises(CheckpointError, match=r"changed since the run"):
            from_pretrained(ckpt)
    finally:
        manifest.write_bytes(saved)


def test_lora_merge_equals_the_adapted_policy_and_exports_a_plain_checkpoint(tmp_path):
    trainer = lora_trainer(tmp_path / "run", TrainConfig(steps=2, ema_decay=0.5, finetune="lora", **FAST))
    trainer.train()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert "model.safetensors" in {p.name for p in ckpt.iterdir()}  # no init: the base is in the checkpoint
    adapted = load_ema_policy(ckpt)
    inputs = fixed_inputs(adapted)
    expected = outputs(adapted, inputs)
    merged = merge_lora(adapted)
    assert not has_lora(merged) and not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    for a, b in zip(outputs(merged, inputs), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    out = export_checkpoint(tmp_path / "run", tmp_path / "export")
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert "lora" not in (out / "recipe.yaml").read_text()
    for a, b in zip(outputs(from_pretrained(out), inputs), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert export_checkpoint(tmp_path / "run", tmp_path / "export") == out  # its own export is replaced
    with pytest.raises(FileExistsError, match=r"not written by vlablocks export"):
        export_checkpoint(tmp_path / "run", ckpt)


def test_lora_resume_continues_bitwise(tmp_path, base_dir):
    config = TrainConfig(steps=4, warmup_steps=1, grad_accumulation=2, ema_decay=0.9, finetune="lora",
                         **{**FAST, "save_every": 2})
    full = lora_trainer(tmp_path / "full", config, init=base_dir)
    full.train()
    interrupted = lora_trainer(tmp_path / "split", config, init=base_dir)
    stop_in_step(interrupted, 3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert checkpoint is not None and checkpoint.name == "step_0000002"
    resumed = lora_trainer(tmp_path / "split", config, init=base_dir)
    resumed.resume(checkpoint)
    resumed.train()
    for name, tensor in full.vla.state_dict().items():
        assert torch.equal(resumed.vla.state_dict()[name], tensor), name
    for name in ("adapter_model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "full/checkpoints/step_0000004" / name)
        b = load_file(tmp_path / "split/checkpoints/step_0000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    plain = Trainer(tiny(), TinyDataset(tiny(), 8), TrainConfig(steps=4, **FAST), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"written by a LoRA run but train.finetune is 'full'"):
        plain.resume(checkpoint)


# ------------------------------------------------------------------------------------ workflow


def test_train_from_a_checkpoint_directory_with_lora_then_export(tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data", lengths=(6, 6))
    torch.manual_seed(0)
    base_dir = build(RECIPE, ["policy.action_dim=4", "policy.state_dim=4"]).save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    args = ["train", str(base_dir), "--data", str(data), "--out", str(run), "--steps", "1", "train.batch_size=2",
            "train.finetune=lora", "train.lora.rank=2", "train.lora.experts=[action]"]
    assert main(args) == 0
    assert json.loads((run / "data.json").read_text())["init"] == str(base_dir.resolve())
    ckpt = latest_checkpoint(run)
    assert json.loads((ckpt / "base.json").read_text())["directory"] == str(base_dir.resolve())
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 2
    assert main(["export", str(run), str(tmp_path / "plain")]) == 0
    assert "exported to" in capsys.readouterr().out
    plain = from_pretrained(tmp_path / "plain")
    assert not has_lora(plain)
    # a directory that is not a checkpoint, and a LoRA checkpoint as a start, are refused in one line
    (tmp_path / "not_a_ckpt").mkdir()
    assert main(["train", str(tmp_path / "not_a_ckpt"), "--data", str(data), "--out", str(tmp_path / "r2")]) == 1
    assert "is a directory without recipe.yaml" in capsys.readouterr().err
    assert main(["train", str(ckpt), "--data", str(data), "--out", str(tmp_path / "r3")]) == 1
    assert "merge them first: vlablocks export" in capsys.readouterr().err


@pytest.mark.slow  # Meta-World demos and a closed-loop episode: minutes on 2 CPU cores
def test_eval_of_a_lora_run(tmp_path, capsys):
    task = "button-press-topdown-v3"
    data = tmp_path / "mw"
    assert main(["data", "metaworld", "--tasks", task, "--episodes", "1", "--image-size", "32", "--out", str(data)]) == 0
    torch.manual_seed(0)
    base_dir = build(RECIPE, ["policy.action_dim=4", "policy.state_dim=4"]).save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    assert main(["train", str(base_dir), "--data", str(data), "--out", str(run), "--steps", "1", "train.batch_size=2",
                 "train.finetune=lora", "train.ema_decay=0.9"]) == 0
    assert main(["eval", str(run), "--tasks", task, "--episodes", "1", "--execute-steps", "4"]) == 0
    assert task in capsys.readouterr().out
    assert json.loads((run / "eval" / "results.json").read_text())["ema"] is True
