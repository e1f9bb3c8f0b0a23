"""The training loop's contracts, value by value (gaps that mutation testing found:
docs/mutation.md): the sharded epoch sampler, the derived seeds, the EMA and its warm-up, the
learning-rate schedule, SIGTERM, export (marker, EMA default), resume (step and format checks, a
LoRA run's base, worker seeds in a later epoch, TensorBoard's purge step), the recipe's train
section, metrics rows and curves, and the run's own training noise."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from ddp_worker import RECIPE, TinyDataset, make_trainer, stop_in_step
from matplotlib.figure import Figure
from safetensors.torch import load_file
from torch import nn

from vlablocks.io.manifest import CheckpointError, write_manifest
from vlablocks.recipes import build, load_recipe
from vlablocks.recipes.builder import from_pretrained
from vlablocks.train.checkpoint import latest_checkpoint
from vlablocks.train.config import LoraSettings, TrainConfig, lr_factor, train_config
from vlablocks.train.ema import EMA, ema_decay_at
from vlablocks.train.export import EXPORT_FILE, merged_policy, plain_recipe, write_export
from vlablocks.train.sampler import EPOCH_STREAM, ShardedEpochSampler, derive_seed
from vlablocks.train.metrics import StepStats, metrics_row, plot_curves
from vlablocks.train.signals import StopSignal
from vlablocks.train.state import read_trainer_state
from vlablocks.train import trainer as trainer_module
from vlablocks.train.trainer import Trainer
from vlablocks.train.workflow import init_directory

# --- ShardedEpochSampler ---------------------------------------------------------------------------


def _epoch(num_samples: int, batch_size: int, replicas: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Every rank's micro-batches of one epoch."""
    ranks = []
    for rank in range(replicas):
        sampler = ShardedEpochSampler(num_samples, batch_size, replicas, rank, seed)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    return ranks


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_sampler_cuts_one_seeded_permutation_into_equal_disjoint_shards(replicas):
    num_samples, batch_size, seed = 23, 2, 7
    ranks = _epoch(num_samples, batch_size, replicas, seed, epoch=4)
    per_rank = num_samples // (batch_size * replicas)
    assert [len(batches) for batches in ranks] == [per_rank] * replicas  # unequal micro-batches and the tail dropped
    assert all(len(batch) == batch_size for batches in ranks for batch in batches)
    # global micro-batch j = c * replicas + rank of the epoch's permutation
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(derive_seed(seed, EPOCH_STREAM, 4))).tolist()
    for rank, batches in enumerate(ranks):
        for c, batch in enumerate(batches):
            j = c * replicas + rank
            assert batch == order[j * batch_size:(j + 1) * batch_size]
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == per_rank * replicas * batch_size


def test_sampler_orders_differ_by_epoch_and_seed_and_repeat_for_the_same_ones():
    first = _epoch(40, 4, 1, seed=3, epoch=0)
    assert _epoch(40, 4, 1, seed=3, epoch=0) == first
    assert _epoch(40, 4, 1, seed=3, epoch=1) != first
    assert _epoch(40, 4, 1, seed=4, epoch=0) != first


def test_sampler_resumes_mid_epoch_where_it_left_off():
    sampler = ShardedEpochSampler(30, 3, 2, 1, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(sampler) == 5
    sampler.set_epoch(2, start=3)
    assert len(sampler) == 2 and list(sampler) == full[3:]


def test_sampler_refuses_a_dataset_smaller_than_one_global_batch():
    ShardedEpochSampler(8, 4, 2, 0, seed=0)  # exactly one global micro-batch is enough
    with pytest.raises(ValueError, match=r"has 7 samples, fewer than one global micro-batch \(batch_size 4 x 2 processes\)"):
        ShardedEpochSampler(7, 4, 2, 0, seed=0)


def test_derived_seeds_are_63_bit_repeatable_and_differ_by_stream_and_key():
    seeds = {derive_seed(0, 1, 0), derive_seed(0, 2, 0), derive_seed(0, 1, 1), derive_seed(1, 1, 0), derive_seed(0, 3, 7)}
    assert len(seeds) == 5 and derive_seed(0, 1, 0) == derive_seed(0, 1, 0)
    assert all(0 <= s < 2**63 for s in seeds) and max(seeds) >= 2**40  # both 32-bit words are used


# --- EMA -------------------------------------------------------------------------------------------


def test_ema_decay_warms_up_from_a_tenth_towards_the_decay():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 8) == pytest.approx(9 / 18)
    assert ema_decay_at(0.5, 8) == 0.5  # capped at the configured decay
    assert ema_decay_at(0.999, 10**6) == 0.999


def test_ema_update_reset_and_applied_weights_value_by_value():
    param = nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = EMA([param], decay=0.9)
    with torch.no_grad():
        param.copy_(torch.tensor([1.0, 0.0]))
    ema.update(step=0)  # decay 0.1: ema = 0.1 * ema + 0.9 * param
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.9, 1.0]))
    ema.update(step=100)  # decay 0.9: ema = 0.9 * ema + 0.1 * param
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.91, 0.9]))
    with ema.applied():
        torch.testing.assert_close(param.detach(), torch.tensor([0.91, 0.9]))
    assert torch.equal(param.detach(), torch.tensor([1.0, 0.0]))  # the live weights come back
    with pytest.raises(RuntimeError, match="inside"), ema.applied():
        raise RuntimeError("inside")
    assert torch.equal(param.detach(), torch.tensor([1.0, 0.0]))  # ... after an exception too
    ema.reset()
    assert torch.equal(ema.shadow[0], param.detach()) and ema.shadow[0] is not param


# --- learning-rate schedule ------------------------------------------------------------------------


def test_lr_factor_warm_up_then_cosine_to_zero_or_constant():
    cosine = TrainConfig(steps=14, warmup_steps=4, schedule="cosine")
    assert [lr_factor(cosine, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cosine, 4) == 1.0  # the cosine starts at its top
    assert lr_factor(cosine, 9) == pytest.approx(0.5)  # half way through the 10 decay steps
    assert lr_factor(cosine, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(cosine, 14) == pytest.approx(0.0) and lr_factor(cosine, 20) == pytest.approx(0.0)  # stays at 0
    constant = TrainConfig(steps=14, warmup_steps=2, schedule="constant")
    assert [lr_factor(constant, s) for s in (0, 1, 2, 13)] == [0.5, 1.0, 1.0, 1.0]
    no_warmup = TrainConfig(steps=1, warmup_steps=0, schedule="cosine")
    assert lr_factor(no_warmup, 0) == 1.0


# --- SIGTERM -------------------------------------------------------------------------------------


def test_first_sigterm_requests_a_stop_and_hands_the_next_one_to_the_previous_handler():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with StopSignal() as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and received == []  # the first one only asks to stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM]  # the second one goes to the handler from before
        with StopSignal() as stop:
            pass
        assert not stop.requested and signal.getsignal(signal.SIGTERM) is not stop._handle  # restored on exit
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- export --------------------------------------------------------------------------------------


def test_plain_recipe_drops_only_the_fine_tuning_settings():
    recipe = {"policy": {"horizon": 4}, "train": {"finetune": "lora", "lora": {"rank": 8}, "lr": 1e-4}}
    assert plain_recipe(recipe) == {"policy": {"horizon": 4}, "train": {"lr": 1e-4}}
    assert recipe["train"]["finetune"] == "lora"  # the argument is not changed
    assert plain_recipe({"policy": {}, "train": {"finetune": "full"}}) == {"policy": {}}  # an emptied section goes
    assert plain_recipe({"policy": {}}) == {"policy": {}}


def test_export_marks_its_directory_with_the_producer_and_the_source(tmp_path):
    vla = build(load_recipe("tiny_pi0"))
    source = tmp_path / "run" / "checkpoints" / "step_4"
    out = write_export(vla, tmp_path / "export", source)
    assert json.loads((out / EXPORT_FILE).read_text()) == {"producer": "vlablocks export", "source": str(source.resolve())}
    write_export(vla, out, None)  # an earlier export may be replaced
    assert json.loads((out / EXPORT_FILE).read_text()) == {"producer": "vlablocks export", "source": None}


def test_a_run_s_policy_is_its_ema_unless_asked_and_resume_refuses_a_later_checkpoint(tmp_path):
    make_trainer(tmp_path / "run", TrainConfig(steps=2, batch_size=2, save_every=None, lr=1e-2, ema_decay=0.5)).train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    ema, live = load_file(checkpoint / "ema.safetensors"), load_file(checkpoint / "model.safetensors")
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    policy, source = merged_policy(tmp_path / "run")  # the default: the EMA weights
    assert source == checkpoint
    assert all(torch.equal(policy.state_dict()[k], ema[k]) for k in ema)
    raw, _ = merged_policy(tmp_path / "run", use_ema=False)
    assert all(torch.equal(raw.state_dict()[k], live[k]) for k in live)
    with pytest.raises(ValueError, match=r"checkpoint step 2 is beyond TrainConfig.steps=1"):
        make_trainer(tmp_path / "again", TrainConfig(steps=1, batch_size=2, save_every=None)).resume(checkpoint)
    state = checkpoint / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "format": "vlablocks.trainer_state/0"}))
    write_manifest(checkpoint)  # a consistent checkpoint of another format
    with pytest.raises(ValueError, match=r"trainer_state.json: format 'vlablocks.trainer_state/0', expected "
                                         r"'vlablocks.trainer_state/1'"):
        read_trainer_state(checkpoint)


def test_resuming_a_lora_run_checks_the_base_it_was_trained_on(tmp_path):
    torch.manual_seed(0)
    base = build(RECIPE).save_pretrained(tmp_path / "base")
    config = TrainConfig(steps=1, batch_size=2, save_every=None, finetune="lora")

    def lora_trainer(out: str) -> Trainer:
        vla = from_pretrained(base)
        return Trainer(vla, TinyDataset(vla, 8), config, tmp_path / out, init_dir=base)

    lora_trainer("run").train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert not (checkpoint / "model.safetensors").exists()  # the adapters refer to the base
    resumed = lora_trainer("again")
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the base changed after the run
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: checksum mismatch"):
        resumed.resume(checkpoint)


def test_the_recipe_s_train_section_is_the_run_s_configuration():
    config = train_config(load_recipe("tiny_pi0", ["train.steps=7", "train.lr=0.25"]), ["train.weight_decay=0.5"])
    assert (config.steps, config.lr, config.weight_decay) == (7, 0.25, 0.5)
    assert train_config(load_recipe("tiny_llava3d_deepfusion")).batch_size == 32  # from the YAML file itself


def test_a_metrics_row_averages_its_window_and_counts_samples_per_second():
    window = [StepStats(loss=1.0, vel_cosine=0.5, grad_total_norm=2.0, grad_max_abs=0.5, lrs={"head": 0.1}, seconds=0.5),
              StepStats(loss=3.0, vel_cosine=0.7, grad_total_norm=4.0, grad_max_abs=0.25, lrs={"head": 0.2}, seconds=1.0)]
    row = metrics_row(window, step=12, guard_hits=1, samples_per_step=6, wall_time_s=9.0)
    assert row == pytest.approx({"step": 12, "loss": 2.0, "vel_cosine": 0.6, "grad_total_norm": 3.0, "grad_max_abs": 0.5,
                                 "guard_hits": 1, "lr_head": 0.2, "samples_per_s": 8.0, "wall_time_s": 9.0})


def test_a_bundled_recipe_name_wins_over_a_directory_of_that_name_unless_written_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build(load_recipe("tiny_pi0")).save_pretrained(tmp_path / "tiny_pi0")
    assert init_directory("tiny_pi0") is None  # the bundled recipe
    assert init_directory("./tiny_pi0") == Path("tiny_pi0")
    assert init_directory(str(tmp_path / "tiny_pi0")) == tmp_path / "tiny_pi0"
    assert init_directory("no_such_directory") is None  # a recipe name or file, checked later


class NoisyTinyDataset(TinyDataset):
    """TinyDataset whose samples carry noise seeded by the DataLoader worker's seed (which comes
    from the loader's generator, one per epoch) and the sample's index: augmentation that repeats
    with the run's seed."""

    def __getitem__(self, index: int) -> dict:
        sample = dict(super().__getitem__(index))
        noise = torch.Generator().manual_seed(torch.utils.data.get_worker_info().seed + index)
        sample["state"] = sample["state"] + 0.1 * torch.randn(sample["state"].shape, generator=noise)
        return sample


def test_a_run_resumed_in_a_later_epoch_gives_its_workers_the_seeds_of_the_original_epoch(tmp_path, monkeypatch):
    purges = []  # TensorBoard drops what the interrupted run logged after the checkpoint
    opened = trainer_module.open_tensorboard
    monkeypatch.setattr(trainer_module, "open_tensorboard", lambda log_dir, purge_step: purges.append(purge_step)
                        or opened(log_dir, purge_step))
    config = TrainConfig(steps=4, batch_size=2, save_every=3, lr=1e-2, num_workers=1)  # 2 batches per epoch

    def trainer(out: str) -> Trainer:
        torch.manual_seed(0)
        vla = build(RECIPE)
        return Trainer(vla, NoisyTinyDataset(vla, 4), config, tmp_path / out)

    straight = trainer("straight")
    straight.train()
    interrupted = trainer("split")
    stop_in_step(interrupted, 4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert checkpoint.name == "step_0000003"  # in the second epoch, after its first batch
    resumed = trainer("split")
    resumed.resume(checkpoint)
    resumed.train()
    for name, tensor in straight.vla.state_dict().items():
        assert torch.equal(resumed.vla.state_dict()[name], tensor), name
    assert purges == [None, None, 4]


def test_the_training_noise_is_the_run_s_own_not_the_global_rng_s(tmp_path):
    weights = []
    for global_seed in (1, 2):
        trainer = make_trainer(tmp_path / str(global_seed), TrainConfig(steps=1, batch_size=2, save_every=None, lr=1e-2))
        torch.manual_seed(global_seed)
        trainer.train()
        weights.append(trainer.vla.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_lora_settings_given_as_a_mapping_become_lora_settings():
    config = TrainConfig(finetune="lora", lora={"rank": 2, "alpha": 4})
    assert config.lora == LoraSettings(rank=2, alpha=4)
    assert TrainConfig(finetune="lora").lora == LoraSettings()


def test_the_curves_plot_one_panel_per_metric_and_one_lr_line_per_group(tmp_path, monkeypatch):
    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig) or save(fig, *args, **kwargs))
    rows = [{"step": s, "loss": 1.0 / s, "vel_cosine": 0.1 * s, "grad_total_norm": 2.0 * s, "grad_max_abs": 0.5 * s,
             "guard_hits": int(s >= 3), "lr_vision": 1e-4, "lr_other": 1e-3, "samples_per_s": 10.0 * s} for s in (1, 2, 3, 4)]
    assert plot_curves(tmp_path / "curves.png", rows, ["vision", "other"], "run").read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    axes = fig.get_axes()
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in axes] == [(2, 3)] * 6
    assert [ax.get_title() for ax in axes] == ["loss", "vel_cosine", "grad_total_norm", "grad_max_abs", "learning rate",
                                                "samples/s"]
    for ax, key in zip(axes, ["loss", "vel_cosine", "grad_total_norm", "grad_max_abs", "lr_vision", "samples_per_s"]):
        assert list(ax.get_lines()[0].get_ydata()) == [r[key] for r in rows], key  # the first line: the metric
    lr_lines = [line for line in axes[4].get_lines() if line.get_color() != "red"]
    assert [line.get_label() for line in lr_lines[:2]] == ["vision", "other"]
    assert [t.get_text() for t in axes[4].get_legend().get_texts()] == ["vision", "other"]
    guard = [line for line in axes[0].get_lines() if line.get_color() == "red"]
    assert [list(line.get_xdata()) for line in guard] == [[3, 3]]  # the step whose guard fired
