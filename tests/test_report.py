"""vlablocks report: the pieces that do not need a run (the CLI test in test_workflow covers a run)."""

import pytest
import torch

from vlablocks.policy import batch as keys
from vlablocks.policy.checks import random_batch
from vlablocks.recipes.builder import build
from vlablocks.tools.report import diagnose, training_summary


def test_training_summary_reads_the_tail_of_metrics_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = ["step,loss,vel_cosine,grad_total_norm,grad_max_abs,guard_hits,lr_other,samples_per_s,wall_time_s"]
    rows += [f"{s},{1.0 / s},{0.5},{s},{0.1},{int(s > 15)},{1e-3},{10},{s * 2.0}" for s in range(1, 21)]
    path.write_text("\n".join(rows) + "\n")
    summary = training_summary(path)
    assert summary["steps"] == 20 and summary["guard_hits"] == 1 and summary["wall_time_s"] == 40.0
    assert summary["final_loss"] == pytest.approx((1 / 19 + 1 / 20) / 2)  # the last tenth: 2 rows
    assert summary["best_loss"] == pytest.approx(1 / 20) and summary["grad_norm_max"] == 20
    path.write_text(rows[0] + "\n")
    with pytest.raises(ValueError, match="has no rows"):
        training_summary(path)


def _items(batch: dict, n: int) -> list[dict]:
    """A list dataset of the ``n`` samples of a random batch (tensors sliced, the task string kept)."""
    return [{k: (v[i] if isinstance(v, torch.Tensor) else v[i]) for k, v in batch.items()} for i in range(n)]


def test_action_error_is_split_by_task():
    """Per-task errors weight back to the overall error, and an off-target task stands out alone."""
    torch.manual_seed(0)
    vla = build("tiny_pi0")
    batch = random_batch(vla, batch_size=8, seed=1)  # 4 tasks, 2 samples each
    items = _items(batch, 8)
    found = diagnose(vla, items, samples=8, batch_size=3, t_bins=2)
    tasks = sorted(set(batch[keys.TASK]))
    assert sorted(found["error_by_task"]) == tasks and found["samples_by_task"] == dict.fromkeys(tasks, 2)
    overall = sum(found["error_by_dim"]) / len(found["error_by_dim"])  # every sample has all H x A elements
    assert sum(found["error_by_task"].values()) / len(tasks) == pytest.approx(overall, rel=1e-9)
    # shift one task's recorded actions far off: only its error grows
    far = tasks[0]
    shifted = [{**item, keys.ACTIONS: item[keys.ACTIONS] + 10.0} if item[keys.TASK] == far else item for item in items]
    moved = diagnose(vla, shifted, samples=8, batch_size=3, t_bins=2)
    assert moved["error_by_task"][far] > found["error_by_task"][far] + 50
    for task in tasks[1:]:
        assert moved["error_by_task"][task] == pytest.approx(found["error_by_task"][task], rel=1e-9)
