"""Numerics over a long run: fp32 and bf16 autocast training of a tiny recipe stays finite, learns,
and reports the gradient guard's statistics in every metrics row (slow: ``make test-slow``)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from ddp_worker import make_trainer

from vlablocks.train.config import TrainConfig

#: CPUs without bf16 instructions (AVX512-BF16 / AMX) emulate bf16 autocast at ~7x the fp32 step
#: time (measured here: 300 steps in 20 min on an AVX2 EPYC): the bf16 run is shorter there.
NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
STEPS = {"no": 2000, "bf16": 2000 if NATIVE_BF16 else 400}
LOG_EVERY = 50


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # fp32: ~10 min for 2000 steps on 2 busy cores; bf16 emulated: ~25 min for 400
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_long_run_stays_finite_and_reports_the_guard(tmp_path, precision):
    steps = STEPS[precision]
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-4, warmup_steps=100, log_every=LOG_EVERY, save_every=None,
                         ema_decay=0.999, mixed_precision=precision, clip_grad_norm=1.0, guard_max_grad_norm=1e3)
    trainer = make_trainer(tmp_path, config, size=64)
    trainer.train()
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == steps // LOG_EVERY
    assert {"guard_hits", "grad_total_norm", "grad_max_abs"} <= set(rows[0])
    for row in rows:
        for key in ("loss", "vel_cosine", "grad_total_norm", "grad_max_abs"):
            assert math.isfinite(float(row[key])), (row["step"], key, row[key])
    assert int(rows[-1]["guard_hits"]) == 0, "no step of a healthy run should be skipped"
    # random targets (memorised, not generalised): the loss falls steadily rather than to ~0 (measured:
    # fp32 2.08 -> 1.09 in 2000 steps, bf16 2.08 -> 1.66 in 400)
    assert float(rows[-1]["loss"]) < 0.9 * float(rows[0]["loss"]), "the run must learn, not just stay finite"
    assert all(torch.isfinite(p).all() for p in trainer.vla.parameters())
