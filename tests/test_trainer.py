"""The trainer: exact resume, DDP parity, freezing / groups, the gradient guard, pickle-free
checkpoints, gradient checkpointing, and the config checks."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import DDP_CONFIG, RECIPE, TinyDataset, capture_gradients, make_trainer, stop_in_step
from safetensors.torch import load_file

from vlablocks.policy.checks import random_batch
from vlablocks.recipes.builder import build
from vlablocks.policy.batch import collate
from vlablocks.train.checkpoint import latest_checkpoint, load_ema_policy
from vlablocks.train.config import TrainConfig, lr_factor
from vlablocks.train.groups import parameter_groups
from vlablocks.train.sampler import ShardedEpochSampler
from vlablocks.train.trainer import Trainer
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import from_pretrained

TESTS = Path(__file__).resolve().parent
DOCS = TESTS.parent / "docs" / "accelerate"
FAST = dict(batch_size=2, log_every=1, save_every=None)


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """Tests compare bits: keep accelerate on the CPU even where a GPU exists."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


def metrics(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def weights(vla: VLA) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vla.state_dict().items()}


# ------------------------------------------------------------------------------------ resume


def test_resume_continues_bitwise(tmp_path):
    config = TrainConfig(steps=6, warmup_steps=2, grad_accumulation=2, ema_decay=0.9, **{**FAST, "save_every": 3})
    full = make_trainer(tmp_path / "full", config)
    full.train()

    interrupted = make_trainer(tmp_path / "split", config)
    stop_in_step(interrupted, 4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert checkpoint is not None and checkpoint.name == "step_0000003"

    resumed = make_trainer(tmp_path / "split", config)
    resumed.resume(checkpoint)
    resumed.train()

    expected, got = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in got] == [str(s) for s in range(1, 7)]
    for key in ("loss", "vel_cosine", "grad_total_norm", "grad_max_abs", "lr_other"):
        assert [r[key] for r in got] == [r[key] for r in expected], key  # bitwise: repr'd floats
    for name, tensor in weights(full.vla).items():
        assert torch.equal(resumed.vla.state_dict()[name], tensor), name
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "full/checkpoints/step_0000006" / name)
        b = load_file(tmp_path / "split/checkpoints/step_0000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------------ DDP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_cpu_processes(out_dir: Path, mode: str) -> None:
    """``accelerate launch`` with docs/accelerate/ddp_cpu.yaml: 2 processes, gloo, 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DOCS / "ddp_cpu.yaml"),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               str(TESTS / "ddp_worker.py"), str(out_dir), mode]
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]


def test_ddp_gradients_match_single_process(tmp_path):
    """2 CPU processes vs 1 process accumulating 2 micro-batches: the same global batch and noise."""
    launch_two_cpu_processes(tmp_path / "ddp", "grads")
    single = make_trainer(tmp_path / "single", dataclasses.replace(DDP_CONFIG, grad_accumulation=2))
    capture_gradients(single, tmp_path / "single" / "grads")
    single.train()
    for step in range(DDP_CONFIG.steps):
        reference = load_file(tmp_path / f"single/grads_step{step}.safetensors")
        for rank in (0, 1):
            ddp = load_file(tmp_path / f"ddp/grads_rank{rank}_step{step}.safetensors")
            assert ddp.keys() == reference.keys()
            for name, grad in reference.items():
                torch.testing.assert_close(ddp[name], grad, atol=1e-5, rtol=0, msg=f"step {step}, rank {rank}: {name}")
    ddp_rows, single_rows = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    for a, b in zip(ddp_rows, single_rows):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-6)
        assert float(a["samples_per_s"]) > 0


def assert_ddp_stop_and_resume_is_bitwise(tmp_path: Path, stop_mode: str, stopped_at: str) -> None:
    """A 2-process run stopped by ``stop_mode`` and resumed equals the uninterrupted one, bit for bit."""
    launch_two_cpu_processes(tmp_path / "full", "full")
    launch_two_cpu_processes(tmp_path / "split", stop_mode)
    assert latest_checkpoint(tmp_path / "split").name == stopped_at
    launch_two_cpu_processes(tmp_path / "split", "resume")
    for key in ("step", "loss", "grad_total_norm", "lr_other"):
        assert [r[key] for r in metrics(tmp_path / "split")] == [r[key] for r in metrics(tmp_path / "full")], key
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints/step_0000005" / name) for run in ("full", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_ddp_resume_continues_bitwise(tmp_path):
    assert_ddp_stop_and_resume_is_bitwise(tmp_path, "part", "step_0000003")


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    assert_ddp_stop_and_resume_is_bitwise(tmp_path, "sigterm", "step_0000002")


# ------------------------------------------------------------------------------------ groups


def test_freezing_groups_and_top_k_unfreeze(tmp_path):
    config = TrainConfig(steps=2, lr=1e-2, warmup_steps=2, schedule="constant", freeze_vision=True,
                         freeze_backbone=True, backbone_unfreeze_layers=2, backbone_lr_scale=0.1,
                         expert_lr_scale=0.5, weight_decay=0.1, **FAST)
    trainer = make_trainer(tmp_path, config)
    vla, stack = trainer.vla, trainer.vla.backbone
    before = weights(vla)
    trainer.train()

    prefix = {p: n for n, p in vla.named_parameters()}
    stack_prefix = prefix[next(stack.parameters())].split("layers.")[0]
    top = {stack_prefix + n for n, _ in stack.expert_named_parameters(0)
           if n.startswith(("layers.2.", "layers.3.", "final_norms.0."))}
    base = {stack_prefix + n for n, _ in stack.expert_named_parameters(0)}
    frozen = {n for n, _ in vla.named_parameters()
              if n.startswith(("vision.", "projector.", "geometry.", "text.")) or (n in base and n not in top)}
    trainable = {n for n, p in vla.named_parameters() if p.requires_grad}
    assert trainable == set(prefix.values()) - frozen
    for name in frozen:
        assert torch.equal(vla.state_dict()[name], before[name]), name
    changed = {n for n, p in vla.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed & top, "the unfrozen top layers train"
    assert changed & base <= top

    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == ["backbone", "experts", "other"]
    factor = lr_factor(config, config.steps)
    assert factor == 1.0 and lr_factor(config, 0) == 0.5
    for name, scale in (("backbone", 0.1), ("experts", 0.5), ("other", 1.0)):
        assert groups[name]["lr"] == pytest.approx(1e-2 * scale * factor)
    assert {prefix[p] for p in groups["backbone"]["params"]} == top
    rows = metrics(tmp_path)
    assert [float(r["lr_backbone"]) for r in rows] == pytest.approx([1e-3 * 0.5, 1e-3])


def test_parameter_groups_cover_every_parameter_once():
    vla = build("tiny_pi0")
    groups = parameter_groups(vla, TrainConfig())
    names = [n for g in groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in vla.named_parameters())
    assert [g.name for g in groups] == ["vision", "backbone", "experts", "other"]
    with pytest.raises(ValueError, match="backbone_unfreeze_layers=3 exceeds the base expert's 2 layers"):
        parameter_groups(vla, TrainConfig(freeze_backbone=True, backbone_unfreeze_layers=3))


# ------------------------------------------------------------------------------------ guard


def test_gradient_guard_skips_a_nan_step(tmp_path, monkeypatch):
    config = TrainConfig(steps=3, ema_decay=0.5, **{**FAST, "save_every": 1})
    trainer = make_trainer(tmp_path, config)
    loss, calls = trainer.vla.head.loss, []

    def nan_at_step_2(*args, **kwargs):
        calls.append(1)
        out = loss(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if len(calls) == 2 else out

    monkeypatch.setattr(trainer.vla.head, "loss", nan_at_step_2)
    applied, optimizer_step = [], trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (applied.append(trainer.step + 1), optimizer_step(*a, **k))[1]
    final = trainer.train()
    assert final["guard_hits"] == 1 and trainer.guard_hits == 1
    assert applied == [1, 3]  # the NaN step updated nothing
    assert [int(r["guard_hits"]) for r in metrics(tmp_path)] == [0, 1, 1]
    # no periodic checkpoint inside a run of skipped steps (the last good one stays `latest`)
    assert not (tmp_path / "checkpoints/step_0000002").exists()
    steps = [tmp_path / f"checkpoints/step_{n:07d}" for n in (1, 3)]
    for name in ("model.safetensors", "ema.safetensors", "trainer_state.safetensors"):
        one, three = (load_file(s / name) for s in steps)
        keys = [k for k in one if not k.startswith("rng.")]
        assert not all(torch.equal(one[k], three[k]) for k in keys), f"{name} unchanged by the next step"
    state = json.loads((steps[1] / "trainer_state.json").read_text())
    assert state["guard_hits"] == 1 and state["scheduler"]["last_epoch"] == 3


def test_guard_max_grad_norm_counts_large_gradients(tmp_path):
    trainer = make_trainer(tmp_path, TrainConfig(steps=2, guard_max_grad_norm=1e-6, **FAST))
    before = weights(trainer.vla)
    assert trainer.train()["guard_hits"] == 2
    assert all(torch.equal(trainer.vla.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("clip", [1e-3, None])
def test_clipping_scales_the_gradients_the_optimizer_steps_with(tmp_path, clip):
    """With ``clip_grad_norm`` the optimizer steps with gradients of exactly that total norm (the
    logged norm is the one before clipping); without it, with the raw gradients. AdamW's update
    barely depends on the gradients' scale, so the weights alone would not show a missing clip."""
    trainer = make_trainer(tmp_path, TrainConfig(steps=2, clip_grad_norm=clip, **FAST))
    seen, optimizer_step = [], trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = step
    trainer.train()
    raw = [float(row["grad_total_norm"]) for row in metrics(tmp_path)]
    assert len(seen) == len(raw) == 2 and min(raw) > 100 * 1e-3  # far above the clip: clipping has work to do
    if clip is None:
        assert seen == pytest.approx(raw, rel=1e-4)
    else:
        assert seen == pytest.approx([clip, clip], rel=1e-3)


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_pickle_free_and_reload(tmp_path, monkeypatch):
    config = TrainConfig(steps=2, ema_decay=0.5, **FAST)
    trainer = make_trainer(tmp_path, config)
    trainer.train()
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoints/step_0000002"
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".yaml", ""}
    assert [p.name for p in files if p.suffix == ""] == ["latest"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")], "temporary left behind"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(target, name, no_pickle)
    policy = from_pretrained(checkpoint)
    batch = random_batch(trainer.vla, 2, seed=5)
    live, loaded = (m.eval().predict_action(batch, generator=torch.Generator().manual_seed(1))
                    for m in (trainer.vla, policy))
    assert torch.equal(live, loaded)
    ema = load_ema_policy(checkpoint)
    with trainer.ema_weights():
        assert torch.equal(ema.predict_action(batch, generator=torch.Generator().manual_seed(1)),
                           trainer.vla.predict_action(batch, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(trainer.vla.predict_action(batch, generator=torch.Generator().manual_seed(1)), live)
    make_trainer(tmp_path / "again", config).resume(checkpoint)


# ------------------------------------------------------------------------------------ checkpointing, precision


def test_gradient_checkpointing_gives_the_same_loss(tmp_path, monkeypatch):
    import vlablocks.blocks.fusion as fusion

    calls = []
    original = fusion.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fusion, "checkpoint", counting)
    rows = []
    for flag in (False, True):
        trainer = make_trainer(tmp_path / str(flag), TrainConfig(steps=1, gradient_checkpointing=flag, **FAST))
        assert trainer.vla.backbone.gradient_checkpointing is flag
        trainer.train()
        rows.append(metrics(tmp_path / str(flag))[0])
        assert bool(calls) is flag
    assert rows[0]["loss"] == rows[1]["loss"]
    assert float(rows[0]["grad_total_norm"]) == pytest.approx(float(rows[1]["grad_total_norm"]), rel=1e-6)


def test_bf16_trains_with_fp32_losses(tmp_path):
    trainer = make_trainer(tmp_path, TrainConfig(steps=1, mixed_precision="bf16", **FAST))
    seen = []
    forward = trainer.model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(out.loss.dtype)
        return out

    trainer.model.forward = spy
    final = trainer.train()
    assert seen == [torch.float32] and torch.isfinite(torch.tensor(final["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.vla.parameters())


# ------------------------------------------------------------------------------------ pieces


def test_normalization_is_set_from_dataset_stats_once(tmp_path):
    torch.manual_seed(0)
    vla = build(RECIPE)
    dataset = TinyDataset(vla)
    assert not vla.has_normalization_stats()
    Trainer(vla, dataset, TrainConfig(steps=1, **FAST), tmp_path)
    assert torch.equal(vla.normalizer["action"].mean, dataset.stats["action"]["mean"])
    assert torch.equal(vla.normalizer["state"].std, dataset.stats["observation.state"]["std"])
    vla.normalizer["action"].set_stats(mean=torch.full((4,), 7.0), std=torch.ones(4))
    Trainer(vla, dataset, TrainConfig(steps=1, **FAST), tmp_path)  # the policy's own stats win
    assert (vla.normalizer["action"].mean == 7.0).all()


def test_sampler_shards_partition_each_epoch():
    shards = [ShardedEpochSampler(10, 2, 2, rank, seed=3) for rank in (0, 1)]
    whole = ShardedEpochSampler(10, 2, 1, 0, seed=3)
    for epoch in (0, 1):
        for s in (*shards, whole):
            s.set_epoch(epoch)
        per_rank = [list(s) for s in shards]
        assert [b for pair in zip(*per_rank) for b in pair] == list(whole)[:4]
    shards[1].set_epoch(1, start=1)
    assert list(shards[1]) == per_rank[1][1:]
    with pytest.raises(ValueError, match="3 samples, fewer than one global micro-batch"):
        ShardedEpochSampler(3, 2, 2, 0, seed=0)


def test_collate_stacks_tensors_and_keeps_strings():
    samples = [{"task": "a", "state": torch.zeros(3), "depth": None},
               {"task": "b", "state": torch.ones(3), "depth": None}]
    batch = collate(samples)
    assert batch["task"] == ["a", "b"] and batch["state"].shape == (2, 3) and batch["depth"] is None
    with pytest.raises(ValueError, match=r"'state': samples have shapes \[\(2,\), \(3,\)\]"):
        collate([{"state": torch.zeros(3)}, {"state": torch.zeros(2)}])


def test_lr_schedule():
    config = TrainConfig(steps=10, warmup_steps=2)
    assert [lr_factor(config, s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(config, 6) == pytest.approx(0.5)
    assert lr_factor(dataclasses.replace(config, schedule="constant"), 9) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, r"TrainConfig.steps must be an integer >= 1; got 0"),
        ({"lr": -1.0}, r"TrainConfig.lr must be > 0; got -1.0"),
        ({"expert_lr_scale": 0.0}, r"expert_lr_scale must be > 0 \(to keep parameters fixed, freeze them\); got 0.0"),
        ({"schedule": "linear"}, r"TrainConfig.schedule must be 'cosine' or 'constant'; got 'linear'"),
        ({"mixed_precision": "fp16"}, r"mixed_precision must be 'no' or 'bf16'; got 'fp16'"),
        ({"backbone_unfreeze_layers": 2}, r"backbone_unfreeze_layers=2 needs freeze_backbone=True"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\) or None; got 1.0"),
        ({"warmup_steps": 20, "steps": 10}, r"warmup_steps \(20\) must be <= steps \(10\)"),
        ({"betas": (0.9, 1.5)}, r"betas must be two numbers in \[0, 1\); got \(0.9, 1.5\)"),
        ({"save_every": 0}, r"save_every must be an integer >= 1 or None; got 0"),
        ({"guard_max_grad_norm": 0.0}, r"guard_max_grad_norm must be > 0 or None; got 0.0"),
    ],
)
def test_config_errors_show_the_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp_cpu.yaml": "MULTI_GPU", "ddp_gpu.yaml": "MULTI_GPU", "fsdp_gpu.yaml": "FSDP"}
    assert sorted(p.name for p in DOCS.glob("*.yaml")) == sorted(expected)
    for name, kind in expected.items():
        config = load_config_from_file(str(DOCS / name))
        assert config.distributed_type == kind and config.num_machines == 1, name
    assert load_config_from_file(str(DOCS / "fsdp_gpu.yaml")).fsdp_config["fsdp_version"] == 2
