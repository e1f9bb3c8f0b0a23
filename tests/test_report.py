"""vlablocks report: the pieces that do not need a run (the CLI test in test_workflow covers a run)."""

import pytest

from vlablocks.report import training_summary


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
