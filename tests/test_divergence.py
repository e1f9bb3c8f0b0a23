"""A diverged run is a failure, not a success: after ``max_guard_hits_in_a_row`` skipped steps the
trainer stops with an error, writes no checkpoint, and the last good checkpoint stays ``latest``."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
from ddp_worker import make_trainer

from vlablocks.train.checkpoint import latest_checkpoint
from vlablocks.train.config import TrainConfig
from vlablocks.train.metrics import read_metrics
from vlablocks.train.trainer import TrainingDiverged

FAST = dict(batch_size=2, log_every=1)


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_diverged_run_stops_within_k_steps_and_keeps_the_last_good_checkpoint(tmp_path):
    good = make_trainer(tmp_path, TrainConfig(steps=2, save_every=1, **FAST))
    good.train()
    last_good = latest_checkpoint(tmp_path)
    assert last_good is not None and last_good.name == "step_0000002"
    before = digests(tmp_path / "checkpoints")

    # resumed with a guard that every step trips (as NaN gradients would): K = 3 skipped steps, then an error
    bad = make_trainer(tmp_path, TrainConfig(steps=20, save_every=1, guard_max_grad_norm=1e-30,  # saves each step
                                             max_guard_hits_in_a_row=3, **FAST))
    bad.resume(last_good)
    with pytest.raises(TrainingDiverged, match=r"step 5: the gradient guard skipped 3 optimizer steps in a row .*"
                                               r"the last good one is .*step_0000002"):
        bad.train()
    assert bad.step == 5  # 2 good + 3 skipped: stopped within K + 1 steps of the first bad one
    assert latest_checkpoint(tmp_path) == last_good
    assert digests(tmp_path / "checkpoints") == before  # no checkpoint written or touched
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r["guard_hits"] for r in rows] == [0, 0, 1, 2, 3]


def test_isolated_guard_hits_do_not_stop_the_run(tmp_path):
    trainer = make_trainer(tmp_path, TrainConfig(steps=3, save_every=None, max_guard_hits_in_a_row=2, **FAST))
    hits = iter([True, False, True])  # a NaN grad norm at steps 1 and 3, step 2 applied: never two in a row
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *a, **k: math.nan if next(hits) else clip(*a, **k)
    final = trainer.train()
    assert final["step"] == 3 and final["guard_hits"] == 2


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_guard_hits_in_a_row_is_validated(value):
    with pytest.raises(ValueError, match=r"TrainConfig.max_guard_hits_in_a_row must be an integer >= 1 or None"):
        TrainConfig(max_guard_hits_in_a_row=value)


def test_vlablocks_train_exits_non_zero_on_divergence_and_keeps_latest(tmp_path, monkeypatch, capsys):
    from helpers import write_toy_dataset  # noqa: PLC0415 (the tests' helper, not the package)
    from vlablocks.cli import main  # noqa: PLC0415

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.delenv("VLABLOCKS_DEBUG", raising=False)
    write_toy_dataset(tmp_path / "data", lengths=(6, 6))
    run = tmp_path / "run"
    common = ["train", "tiny_pi0", "--data", str(tmp_path / "data"), "--out", str(run), "policy.action_dim=4",
              "policy.state_dim=4", "train.batch_size=2", "train.save_every=1"]
    assert main([*common, "--steps", "2"]) == 0
    last_good, before = latest_checkpoint(run), digests(run / "checkpoints")
    capsys.readouterr()
    code = main([*common, "--steps", "20", "--resume", "train.guard_max_grad_norm=1e-30",
                 "train.max_guard_hits_in_a_row=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("vlablocks train: ") and "gradient guard skipped 2 optimizer steps in a row" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert latest_checkpoint(run) == last_good and digests(run / "checkpoints") == before
    assert [r["step"] for r in read_metrics(run / "metrics.csv")][-1] == 4  # 2 good + K = 2 skipped
