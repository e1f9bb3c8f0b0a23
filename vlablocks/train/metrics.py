"""A run's metrics: one row per ``log_every`` steps in ``metrics.csv`` (rewritten atomically),
TensorBoard scalars and the ``curves.png`` plot; and :func:`read_metrics`, the one reader of a
``metrics.csv`` (the trainer on resume, ``vlablocks report``, the benchmark drivers).

Columns: ``step, loss, vel_cosine, grad_total_norm, grad_max_abs, guard_hits, lr_{group}...,
samples_per_s, wall_time_s`` (means over the row's steps; ``grad_max_abs`` is their max).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlablocks.io.atomic import atomic_path

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
#: columns read back as integers (the rest are floats).
INT_COLUMNS = ("step", "guard_hits")


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step measured (averaged over processes and micro-batches)."""

    loss: float
    vel_cosine: float
    grad_total_norm: float
    grad_max_abs: float
    lrs: dict[str, float]
    seconds: float


def metrics_row(window: Sequence[StepStats], step: int, guard_hits: int, samples_per_step: int,
                wall_time_s: float) -> dict[str, float]:
    """The metrics row of the steps in ``window`` (the last of which is ``step``)."""
    seconds = sum(s.seconds for s in window)
    return {
        "step": step,
        "loss": _mean([s.loss for s in window]),
        "vel_cosine": _mean([s.vel_cosine for s in window]),
        "grad_total_norm": _mean([s.grad_total_norm for s in window]),
        "grad_max_abs": _max([s.grad_max_abs for s in window]),
        "guard_hits": guard_hits,
        **{f"lr_{name}": lr for name, lr in window[-1].lrs.items()},
        "samples_per_s": len(window) * samples_per_step / max(seconds, 1e-9),
        "wall_time_s": wall_time_s,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _max(values: Sequence[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def metric_columns(group_names: Sequence[str]) -> list[str]:
    """The ``metrics.csv`` columns of a run with the parameter groups ``group_names``."""
    return ["step", "loss", "vel_cosine", "grad_total_norm", "grad_max_abs", "guard_hits",
            *[f"lr_{name}" for name in group_names], "samples_per_s", "wall_time_s"]


def read_metrics(path: str | Path, up_to_step: int | None = None) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` (``[]`` if there is none): floats, ``step`` and ``guard_hits``
    as ints, empty cells left out; with ``up_to_step`` only the rows up to that step."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    for row in rows:
        for key in INT_COLUMNS:
            if key in row:
                row[key] = int(row[key])
    return [row for row in rows if up_to_step is None or row["step"] <= up_to_step]


def write_metrics(path: Path, rows: Sequence[Mapping[str, float]], group_names: Sequence[str]) -> None:
    """Write all ``rows`` to the CSV ``path`` atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=metric_columns(group_names), extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)


def open_tensorboard(log_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``log_dir`` (``purge_step``: drop events logged from
    that step on, as after a resume)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)


def add_scalars(writer: Any, row: Mapping[str, float]) -> None:
    """The row's values as TensorBoard scalars ``train/{column}`` and ``lr/{group}`` at its step."""
    for key, value in row.items():
        if key != "step":
            tag = f"lr/{key.removeprefix('lr_')}" if key.startswith("lr_") else f"train/{key}"
            writer.add_scalar(tag, value, row["step"])


def plot_curves(path: Path, rows: Sequence[Mapping[str, float]], group_names: Sequence[str], title: str) -> Path:
    """Plot loss, vel_cosine, gradient norms, learning rates and throughput of ``rows`` into the
    PNG ``path`` (atomically); steps whose gradient guard fired are marked by red lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(12, 7))
    FigureCanvasAgg(fig)
    panels = [("loss", ["loss"], "log"), ("vel_cosine", ["vel_cosine"], "linear"),
              ("grad_total_norm", ["grad_total_norm"], "log"), ("grad_max_abs", ["grad_max_abs"], "log"),
              ("learning rate", [f"lr_{n}" for n in group_names], "linear"),
              ("samples/s", ["samples_per_s"], "linear")]
    hits = [r["step"] for prev, r in zip([{"guard_hits": 0}, *rows], rows) if r["guard_hits"] > prev["guard_hits"]]
    for index, (panel, keys, scale) in enumerate(panels):
        ax = fig.add_subplot(2, 3, index + 1)
        for key in keys:
            ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key.removeprefix("lr_"))
        positive = all(r.get(k, 1.0) > 0 for r in rows for k in keys)
        ax.set_yscale(scale if positive else "linear")
        for step in hits:
            ax.axvline(step, color="red", alpha=0.3, linewidth=0.8)
        ax.set_title(panel)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.3, hspace=0.4)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
