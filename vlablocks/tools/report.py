"""``vlablocks report RUN``: why a run's flow-matching loss is where it is.

From the run's ``metrics.csv``: the loss and vel_cosine at the end, gradient-norm statistics,
gradient-guard hits. From its checkpoint, on a fixed random sample of its training data:

- **loss by flow time**: the loss with ``t`` held at the centre of each of ``t_bins`` equal
  bins of ``[0, 1]``. Near ``t = 1`` (pure noise) it measures how well the observation
  determines the action: the residual action variance ``s2`` is read off the last bin
  (:func:`~vlablocks.heads.flow_matching.residual_var_at`), and the profile is shown next to
  :func:`~vlablocks.heads.flow_matching.gaussian_loss_curve` for that ``s2`` (what a network
  that treats action elements as independent could reach; below it at small ``t``, the network
  uses the chunk's structure to tell noise from action; above it, look at the time conditioning);
- **action error** of ``predict_action`` against the recorded chunk, per action dimension and
  per chunk step, in the model's normalised units (the loss's) and in raw units, and per task
  (which tasks of a multi-task run hold the loss up).

Written to ``RUN/report/``: ``report.md``, ``report.json`` and ``report.png``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlablocks.heads.flow_matching import gaussian_loss_curve, residual_var_at
from vlablocks.io.atomic import atomic_path, write_json, write_text
from vlablocks.policy import batch as keys
from vlablocks.policy.batch import collate, to_device
from vlablocks.policy.vla import VLA
from vlablocks.train.checkpoint import load_policy
from vlablocks.train.metrics import METRICS_FILE, read_metrics
from vlablocks.data import DataSelection
from vlablocks.train.workflow import DATA_INFO_FILE, open_dataset

logger = logging.getLogger(__name__)

REPORT_DIR = "report"


@dataclass
class RunReport:
    """Everything ``vlablocks report`` measured (see the module docstring)."""

    run: str
    checkpoint: str
    data: str
    samples: int
    training: dict[str, Any]
    t_centres: list[float]
    loss_by_t: list[float]
    vel_cosine_by_t: list[float]
    residual_var: float
    curve_by_t: list[float]
    expected_curve: float
    error_by_dim: list[float]
    raw_error_by_dim: list[float]
    error_by_step: list[float]
    error_by_task: dict[str, float]
    samples_by_task: dict[str, int]


def training_summary(metrics_path: Path) -> dict[str, Any]:
    """Final / best loss and vel_cosine (means over the last tenth of the logged rows), gradient
    norms and guard hits from a run's ``metrics.csv``."""
    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} has no rows: has the run logged a step yet?")
    tail = rows[-max(1, len(rows) // 10):]
    norms = np.array([r["grad_total_norm"] for r in rows if "grad_total_norm" in r])
    return {
        "steps": int(rows[-1]["step"]),
        "final_loss": float(np.mean([r["loss"] for r in tail])),
        "best_loss": float(min(r["loss"] for r in rows)),
        "final_vel_cosine": float(np.mean([r["vel_cosine"] for r in tail])),
        "grad_norm_median": float(np.median(norms)) if norms.size else math.nan,
        "grad_norm_max": float(norms.max()) if norms.size else math.nan,
        "guard_hits": int(rows[-1].get("guard_hits", 0)),
        "wall_time_s": float(rows[-1].get("wall_time_s", math.nan)),
    }


@torch.no_grad()
def diagnose(
    vla: VLA,
    dataset: torch.utils.data.Dataset,
    samples: int = 256,
    batch_size: int = 32,
    t_bins: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss by flow time and action errors of ``vla`` on ``samples`` random items of ``dataset``."""
    vla.eval()
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=gen)[: min(samples, len(dataset))].tolist()
    centres = [(i + 0.5) / t_bins for i in range(t_bins)]
    loss_sums, cos_sums = np.zeros(t_bins), np.zeros(t_bins)
    action_dim = vla.normalizer["action"].width
    sq_err, raw_abs, counts = np.zeros(action_dim), np.zeros(action_dim), 0.0
    step_sq, step_counts = np.zeros(vla.config.horizon), np.zeros(vla.config.horizon)
    task_sq: dict[str, float] = {}
    task_counts: dict[str, float] = {}
    task_samples: dict[str, int] = {}
    device = next(vla.parameters()).device
    batches = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    for chunk in tqdm(batches, desc="report", unit="batch", leave=False):
        batch = collate([dataset[i] for i in chunk])
        batch = to_device(batch, device)
        n = len(chunk)
        for b, centre in enumerate(centres):
            out = vla(batch, generator=torch.Generator(device).manual_seed(seed + b), t=torch.full((n,), centre, device=device))
            loss_sums[b] += out.loss.item() * n
            cos_sums[b] += out.vel_cosine.item() * n
        predicted = vla.predict_action(batch, generator=torch.Generator(device).manual_seed(seed))
        actions = batch[keys.ACTIONS][..., : predicted.shape[-1]]
        mask = batch.get(keys.ACTION_MASK)
        valid = torch.ones(actions.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.bool()
        normalizer = vla.normalizer["action"]
        err = (normalizer.normalize(predicted) - normalizer.normalize(actions)).double()  # [B, H, A]
        weight = valid[..., None].double()
        sq = err**2 * weight  # [B, H, A]
        sq_err += sq.sum(dim=(0, 1)).cpu().numpy()
        raw_abs += ((predicted - actions).abs().double() * weight).sum(dim=(0, 1)).cpu().numpy()
        counts += float(valid.sum())
        step_sq += sq.mean(dim=2).sum(dim=0).cpu().numpy()
        step_counts += valid.sum(dim=0).double().cpu().numpy()
        per_sample = sq.sum(dim=(1, 2)).cpu().tolist()  # [B]
        per_sample_count = (valid.sum(dim=1) * err.shape[-1]).cpu().tolist()
        for task, sample_sq, count in zip(batch[keys.TASK], per_sample, per_sample_count):
            task_sq[task] = task_sq.get(task, 0.0) + sample_sq
            task_counts[task] = task_counts.get(task, 0.0) + count
            task_samples[task] = task_samples.get(task, 0) + 1
    total = len(indices)
    loss_by_t = (loss_sums / total).tolist()
    residual_var = residual_var_at(centres[-1], loss_by_t[-1])
    sampler_t = vla.head.time_sampler(100_000, "cpu", torch.Generator().manual_seed(seed))
    return {
        "samples": total,
        "t_centres": centres,
        "loss_by_t": loss_by_t,
        "vel_cosine_by_t": (cos_sums / total).tolist(),
        "residual_var": residual_var,
        "curve_by_t": gaussian_loss_curve(torch.tensor(centres), residual_var).tolist(),
        "expected_curve": float(gaussian_loss_curve(sampler_t, residual_var).mean()),
        "error_by_dim": (sq_err / max(counts, 1.0)).tolist(),
        "raw_error_by_dim": (raw_abs / max(counts, 1.0)).tolist(),
        "error_by_step": (step_sq / np.maximum(step_counts, 1.0)).tolist(),
        "error_by_task": {task: task_sq[task] / max(task_counts[task], 1.0) for task in sorted(task_sq)},
        "samples_by_task": {task: task_samples[task] for task in sorted(task_samples)},
    }


def build_report(run: str | Path, data: str | Path | None = None, samples: int = 256, batch_size: int = 32,
                 t_bins: int = 10, use_ema: bool = True, seed: int = 0, verify: bool = True) -> RunReport:
    """Diagnose a training run (its latest checkpoint) on its training data (or ``data``);
    ``verify=False`` loads a checkpoint without a manifest."""
    run = Path(run)
    metrics = run / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: `vlablocks report` takes a training run directory")
    if data is None:
        info_path = run / DATA_INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} not found: give the dataset with --data")
        info = json.loads(info_path.read_text())
        data, selection = info["data"], DataSelection(**_selection(info.get("selection", {})))
    else:
        selection = DataSelection()
    vla, checkpoint = load_policy(run, use_ema, verify)
    dataset = open_dataset(vla, data, selection=selection)
    found = diagnose(vla, dataset, samples, batch_size, t_bins, seed)
    return RunReport(run=str(run), checkpoint=str(checkpoint), data=str(data), training=training_summary(metrics),
                     **found)


def _selection(recorded: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded feature selection (``data.json``) as DataSelection arguments."""
    cameras = recorded.get("cameras")
    return {**recorded, "cameras": None if cameras is None else tuple(cameras)}


def format_report(report: RunReport) -> str:
    """The markdown of ``report.md``."""
    tr = report.training
    lines = [
        f"# Run report: {report.run}",
        "",
        f"Checkpoint `{report.checkpoint}`, {report.samples} samples of `{report.data}`.",
        "",
        "## Training",
        "",
        f"- {tr['steps']} steps in {tr['wall_time_s'] / 60:.1f} min; final loss {tr['final_loss']:.4f} "
        f"(best logged {tr['best_loss']:.4f}), vel_cosine {tr['final_vel_cosine']:.3f}",
        f"- gradient norm: median {tr['grad_norm_median']:.3g}, max {tr['grad_norm_max']:.3g}; "
        f"gradient-guard hits: {tr['guard_hits']}",
        "",
        "## Loss by flow time",
        "",
        f"Residual action variance near t = 1: s2 = {report.residual_var:.4g} (normalised units; the mean "
        f"action the network reads from the observation is off by {math.sqrt(report.residual_var):.2f} std). "
        f"For independent action elements with that s2 the loss `s2 / (t^2 + (1 - t)^2 s2)` averages "
        f"{report.expected_curve:.4f} over the training time sampler; the final training loss is "
        f"{tr['final_loss']:.4f}.",
        "",
        "| t | loss | independent-element curve | vel_cosine |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for t, loss, curve, cos in zip(report.t_centres, report.loss_by_t, report.curve_by_t, report.vel_cosine_by_t):
        lines.append(f"| {t:.2f} | {loss:.4f} | {curve:.4f} | {cos:.3f} |")
    lines += [
        "",
        "How to read it: near t = 1 the input is pure noise and the loss is the error of the mean action "
        "the network infers from the observation, s2: it sets the loss that remains (pi0's ~0.02 needs "
        "s2 ~ 1e-3; s2 near 1 means the observation is barely used). Towards t = 0 the noise must be "
        "told apart from the action: bins below the curve show the network using the chunk's "
        "smoothness and correlations, bins above it point at the time conditioning.",
        "",
        "## Action error of predict_action",
        "",
        "| dim | MSE (normalised) | mean abs error (raw units) |",
        "| ---: | ---: | ---: |",
    ]
    for d, (mse, mae) in enumerate(zip(report.error_by_dim, report.raw_error_by_dim)):
        lines.append(f"| {d} | {mse:.4f} | {mae:.4f} |")
    steps = report.error_by_step
    lines += ["", f"MSE (normalised) along the chunk: step 0 {steps[0]:.4f}, middle {steps[len(steps) // 2]:.4f}, "
                  f"last {steps[-1]:.4f}.", ""]
    if len(report.error_by_task) > 1:
        lines += ["## Action error by task", "",
                  "MSE (normalised, all dims and chunk steps) of predict_action per task, largest first: in a "
                  "multi-task run this shows which tasks hold the loss up (a few samples per task: a rough guide).",
                  "", "| task | samples | MSE (normalised) |", "| --- | ---: | ---: |"]
        for task, mse in sorted(report.error_by_task.items(), key=lambda item: -item[1]):
            lines.append(f"| {task} | {report.samples_by_task[task]} | {mse:.4f} |")
        lines.append("")
    return "\n".join(lines)


def plot_report(report: RunReport, path: Path) -> Path:
    """``report.png``: loss by t (and the independent-element curve), vel_cosine by t, error by dimension and by chunk step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 4, 1)
    ax.plot(report.t_centres, report.loss_by_t, "o-", label="measured")
    ax.plot(report.t_centres, report.curve_by_t, "--", label=f"independent elements, s2={report.residual_var:.3g}")
    ax.set(yscale="log", xlabel="flow time t", title="loss by t")
    ax.legend(fontsize="small")
    ax = fig.add_subplot(1, 4, 2)
    ax.plot(report.t_centres, report.vel_cosine_by_t, "o-")
    ax.set(xlabel="flow time t", title="vel_cosine by t")
    ax = fig.add_subplot(1, 4, 3)
    ax.bar(range(len(report.error_by_dim)), report.error_by_dim)
    ax.set(xlabel="action dim", title="action MSE (normalised)")
    ax = fig.add_subplot(1, 4, 4)
    ax.plot(range(len(report.error_by_step)), report.error_by_step, "o-")
    ax.set(xlabel="chunk step", title="action MSE along the chunk")
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.88, wspace=0.35)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def write_report(report: RunReport, out: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.json`` and ``report.png`` (default ``RUN/report/``)."""
    out = Path(out) if out is not None else Path(report.run) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", format_report(report))
    write_json(out / "report.json", asdict(report), allow_nan=True)
    plot_report(report, out / "report.png")
    return out
