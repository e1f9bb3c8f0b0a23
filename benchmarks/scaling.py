"""Scaling curves of a deep-fusion recipe: chunk latency against ODE steps, prefix length, expert
width and depth, and training time against batch size. PNG plots, a JSON of every figure and
the markdown tables of docs/benchmarks.md.

    python benchmarks/scaling.py                                   # mid_llava3d_deepfusion, CPU fp32
    python benchmarks/scaling.py --out docs/benchmarks --update docs/benchmarks.md

Every figure is the median of ``--repeats`` interleaved runs (see ``vlablocks.tools.bench.median_ms``)
at batch 1 (training: the batch sizes listed), eager fp32 on the device given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlablocks.policy.batch import to_device
from vlablocks.tools.bench import chunk_functions, machine_description, median_ms
from vlablocks.tools.bench_setup import BenchSettings, build_for_bench, make_train_step
from vlablocks.policy.checks import random_batch
from vlablocks.io.atomic import atomic_path, replace_section, write_json

logger = logging.getLogger("scaling")

ODE_STEPS = (1, 2, 4, 6, 8, 10, 12, 16, 20)
IMAGE_SIZES = (64, 128, 192, 256, 320, 384)  # conv-net stride 16: 4^2 .. 24^2 image tokens
EXPERT_WIDTHS = (64, 128, 256, 512)
EXPERT_EVERY = (8, 4, 2, 1)  # every k-th of the 8 base layers: 1, 2, 4, 8 expert layers
TRAIN_BATCHES = (1, 2, 4, 8, 16)


def inputs(vla: Any, device: str, seed: int = 0) -> tuple[Any, Any, torch.Tensor]:
    """``(prefix, state, noise)`` of one random observation."""
    batch = to_device(random_batch(vla, 1, seed=seed), device)
    with torch.inference_mode():
        prefix, state = vla.encode(batch)
    noise = torch.randn(1, vla.config.horizon, vla.config.action_dim, generator=torch.Generator().manual_seed(seed))
    return prefix, state, noise.to(device)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Least squares ``y = a + b x``: coefficients, R^2 and residuals."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    b, a = np.polyfit(x_arr, y_arr, 1)
    residuals = y_arr - (a + b * x_arr)
    r2 = 1 - (residuals**2).sum() / ((y_arr - y_arr.mean()) ** 2).sum()
    return {"intercept": a, "slope": b, "r2": r2, "residuals": residuals.tolist(),
            "max_abs_residual_pct": float(np.max(np.abs(residuals) / y_arr) * 100)}


def sweep_ode_steps(recipe: str, overrides: list[str], device: str, repeats: int) -> dict[str, Any]:
    vla = build_for_bench(recipe, overrides, 0, device).eval()
    prefix, state, noise = inputs(vla, device)
    denoiser = vla.denoiser
    fns = {}
    for n in ODE_STEPS:
        for name, fn in chunk_functions(denoiser, n).items():
            fns[(name, n)] = (lambda fn=fn: fn(prefix, state, noise))
    with torch.inference_mode():
        times = median_ms({f"{name}@{n}": fn for (name, n), fn in fns.items()}, repeats, 1, device)
        prefix_ms = median_ms({"prefix": lambda: denoiser.prepare(prefix)}, repeats, 1, device)["prefix"]
    cached = [times[f"chunk_cached_ms@{n}"] for n in ODE_STEPS]
    recompute = [times[f"chunk_recompute_ms@{n}"] for n in ODE_STEPS]
    return {"steps": list(ODE_STEPS), "cached_ms": cached, "recompute_ms": recompute, "prefix_ms": prefix_ms,
            "prefix_tokens": prefix.embeds.shape[1], "cached_fit": linear_fit(ODE_STEPS, cached),
            "recompute_fit": linear_fit(ODE_STEPS, recompute)}


def _variant_timings(recipe: str, variants: dict[Any, list[str]], device: str, repeats: int) -> dict[Any, dict]:
    """Prefix pass, denoise step, cached and recomputed 10-step chunk of each variant (recipe
    overrides), all interleaved in one measurement so that the machine's drift hits them alike."""
    fns, info = {}, {}
    for key, overrides in variants.items():
        vla = build_for_bench(recipe, overrides, 0, device).eval()
        prefix, state, noise = inputs(vla, device)
        denoiser = vla.denoiser
        chunks = chunk_functions(denoiser, 10)
        t = torch.full((1,), 0.5, device=device)
        with torch.inference_mode():
            context = denoiser.prepare(prefix)
        fns[(key, "prefix")] = lambda d=denoiser, p=prefix: d.prepare(p)
        fns[(key, "step")] = lambda d=denoiser, c=context, n=noise, t=t, s=state: d.velocity(c, n, t, s)
        for name, label in (("chunk_cached_ms", "chunk"), ("chunk_recompute_ms", "recompute")):
            fns[(key, label)] = lambda f=chunks[name], p=prefix, s=state, n=noise: f(p, s, n)
        info[key] = {"prefix_tokens": prefix.embeds.shape[1],
                     "expert_parameters": sum(p.numel() for _, p in denoiser.stack.expert_named_parameters(1))}
    with torch.inference_mode():
        times = median_ms({f"{key}|{what}": fn for (key, what), fn in fns.items()}, repeats, 1, device)
    return {key: {**info[key], **{what: times[f"{key}|{what}"] for k, what in fns if k == key}} for key in variants}


def sweep_prefix_length(recipe: str, overrides: list[str], device: str, repeats: int) -> dict[str, Any]:
    timings = _variant_timings(recipe, {size: [*overrides, f"vision.image_size={size}"] for size in IMAGE_SIZES},
                               device, repeats)
    rows = [{"image_size": size, **timings[size]} for size in IMAGE_SIZES]
    tokens = np.array([r["prefix_tokens"] for r in rows], dtype=float)
    prefix_ms = np.array([r["prefix"] for r in rows])
    c2, c1, c0 = np.polyfit(tokens, prefix_ms, 2)
    fitted = c0 + c1 * tokens + c2 * tokens**2
    return {"rows": rows, "prefix_fit": {"a": c0, "b_per_token": c1, "c_per_token2": c2,
                                         "max_abs_residual_pct": float(np.max(np.abs(prefix_ms - fitted) / prefix_ms) * 100),
                                         "linear": linear_fit(tokens, prefix_ms)}}


def sweep_expert(recipe: str, overrides: list[str], device: str, repeats: int) -> dict[str, Any]:
    variants = {("width", w): [*overrides, f"backbone.experts.1.width={w}", f"backbone.experts.1.mlp_dim={int(2.75 * w)}"]
                for w in EXPERT_WIDTHS}
    variants.update({("depth", 8 // k): [*overrides, f"backbone.experts.1.every_kth_layer={k}"] for k in EXPERT_EVERY})
    timings = _variant_timings(recipe, variants, device, repeats)
    out: dict[str, list] = {"width": [], "depth": []}
    for (kind, value), row in timings.items():
        out[kind].append({kind: value, **row})
    return out


def sweep_train_batch(recipe: str, overrides: list[str], device: str, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for batch in TRAIN_BATCHES:
        vla = build_for_bench(recipe, overrides, 0, device)
        step = make_train_step(vla, BenchSettings(device=device, train_batch=batch))
        ms = median_ms({"step": step}, repeats, 1, device)["step"]
        rows.append({"batch": batch, "step_ms": ms, "samples_per_s": 1000 * batch / ms})
    return rows


# ------------------------------------------------------------------------------------ report


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(path)

    ode = results["ode_steps"]
    fig, (ax, ax_res) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("cached_ms", "prefix cache"), ("recompute_ms", "full recompute")):
        fit = ode[key.replace("_ms", "_fit")]
        (points,) = ax.plot(ode["steps"], ode[key], "o", label=f"{label}: {fit['intercept']:.0f} + {fit['slope']:.1f} N ms")
        color = points.get_color()
        ax.plot(ode["steps"], [fit["intercept"] + fit["slope"] * n for n in ode["steps"]], "-", alpha=0.5, color=color)
        ax_res.plot(ode["steps"], fit["residuals"], "o-", label=label, color=color)
    ax.set(xlabel="ODE steps N", ylabel="chunk latency (ms)", title="chunk latency vs ODE steps")
    ax.legend(fontsize=8)
    ax_res.axhline(0, color="grey", lw=0.5)
    ax_res.set(xlabel="ODE steps N", ylabel="residual of the linear fit (ms)", title="residuals")
    ax_res.legend(fontsize=8)
    save(fig, "latency_vs_ode_steps.png")

    rows = results["prefix_length"]["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    tokens = [r["prefix_tokens"] for r in rows]
    ax.plot(tokens, [r["prefix"] for r in rows], "o-", label="prefix pass")
    ax.plot(tokens, [r["chunk"] for r in rows], "s-", label="cached chunk (10 steps)")
    ax.plot(tokens, [10 * r["step"] for r in rows], "^-", label="10 denoise steps")
    ax.set(xlabel="prefix tokens P", ylabel="ms", title="latency vs prefix length")
    ax.legend(fontsize=8)
    save(fig, "latency_vs_prefix_length.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind, label in zip(axes, ("width", "depth"), ("expert width", "expert layers (of 8)")):
        rows = results["expert"][kind]
        xs = [r[kind] for r in rows]
        ax.plot(xs, [r["chunk"] for r in rows], "o-", label="cached chunk")
        ax.plot(xs, [r["recompute"] for r in rows], "s-", label="full recompute")
        ax.plot(xs, [10 * r["step"] for r in rows], "^-", label="10 denoise steps")
        ax.set(xlabel=label, ylabel="ms", title=f"chunk latency vs {label}")
        ax.legend(fontsize=8)
    save(fig, "latency_vs_expert.png")

    rows = results["train_batch"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["batch"] for r in rows], [r["step_ms"] for r in rows], "o-", color="C0")
    ax.set(xlabel="batch size", ylabel="training step (ms)", title="training time vs batch")
    twin = ax.twinx()
    twin.plot([r["batch"] for r in rows], [r["samples_per_s"] for r in rows], "s--", color="C1")
    twin.set_ylabel("samples / s", color="C1")
    save(fig, "train_time_vs_batch.png")
    return paths


def markdown(results: dict[str, Any]) -> str:
    ode = results["ode_steps"]
    cf, rf = ode["cached_fit"], ode["recompute_fit"]
    lines = [
        f"Recipe `{results['recipe']}` {' '.join(results['overrides'])}, {results['device']} fp32 eager, batch 1, "
        f"median of {results['repeats']} interleaved runs; "
        f"machine: {results['machine'].get('gpu') or results['machine']['cpu']}, "
        f"{results['machine']['torch_threads']} threads, torch {results['machine']['torch']}.",
        "",
        f"**Chunk latency vs ODE steps** (prefix P = {ode['prefix_tokens']} tokens; prefix pass alone "
        f"{ode['prefix_ms']:.1f} ms). Linear fits: cached `{cf['intercept']:.1f} + {cf['slope']:.2f} N` ms "
        f"(R^2 = {cf['r2']:.4f}, largest residual {cf['max_abs_residual_pct']:.1f} %); full recompute "
        f"`{rf['intercept']:.1f} + {rf['slope']:.2f} N` ms (R^2 = {rf['r2']:.4f}, largest residual "
        f"{rf['max_abs_residual_pct']:.1f} %).",
        "",
        "| N | cached (ms) | residual (ms) | recompute (ms) | residual (ms) | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, n in enumerate(ode["steps"]):
        lines.append(f"| {n} | {ode['cached_ms'][i]:.1f} | {cf['residuals'][i]:+.1f} | {ode['recompute_ms'][i]:.1f} | "
                     f"{rf['residuals'][i]:+.1f} | {ode['recompute_ms'][i] / ode['cached_ms'][i]:.2f}x |")
    pf = results["prefix_length"]["prefix_fit"]
    lines += [
        "",
        f"**Latency vs prefix length** (image size varied). Prefix pass fit `a + b P + c P^2`: "
        f"b = {pf['b_per_token']:.3f} ms/token, c = {pf['c_per_token2'] * 1000:.4f} ms per 1000 token^2 "
        f"(largest residual {pf['max_abs_residual_pct']:.1f} %); a straight line fits with R^2 = "
        f"{pf['linear']['r2']:.4f}.",
        "",
        "| image px | prefix tokens P | prefix pass (ms) | ms / token | denoise step (ms) | cached chunk, 10 steps (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["prefix_length"]["rows"]:
        lines.append(f"| {r['image_size']} | {r['prefix_tokens']} | {r['prefix']:.1f} | {r['prefix'] / r['prefix_tokens']:.3f} | "
                     f"{r['step']:.2f} | {r['chunk']:.1f} |")
    lines += ["", "**Latency vs the action expert** (10 steps; width at every 2nd layer, then depth at width 256).", "",
              "| expert | parameters | denoise step (ms) | cached chunk (ms) | full recompute (ms) | speed-up |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind, label in (("width", "width {}"), ("depth", "{} of 8 layers")):
        for r in results["expert"][kind]:
            lines.append(f"| {label.format(r[kind])} | {r['expert_parameters'] / 1e6:.2f} M | {r['step']:.2f} | "
                         f"{r['chunk']:.1f} | {r['recompute']:.1f} | {r['recompute'] / r['chunk']:.2f}x |")
    lines += ["", "**Training time vs batch** (loss + backward + AdamW step).", "",
              "| batch | step (ms) | samples / s |", "| ---: | ---: | ---: |"]
    for r in results["train_batch"]:
        lines.append(f"| {r['batch']} | {r['step_ms']:.0f} | {r['samples_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mid_llava3d_deepfusion")
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/scaling", help="folder for the PNGs and scaling.json")
    parser.add_argument("--update", default=None, help="markdown file whose scaling section gets the tables")
    parser.add_argument("--replot", action="store_true", help="redraw plots and tables from OUT/scaling.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        results = json.loads((out / "scaling.json").read_text())
    else:
        results = {"recipe": args.recipe, "overrides": args.overrides, "device": args.device,
                   "repeats": args.repeats, "machine": machine_description(args.device)}
        sweeps = (("ode_steps", sweep_ode_steps), ("prefix_length", sweep_prefix_length), ("expert", sweep_expert),
                  ("train_batch", sweep_train_batch))
        for name, sweep in sweeps:
            start = time.perf_counter()
            results[name] = sweep(args.recipe, args.overrides, args.device, args.repeats)
            logger.info("%s done in %.0f s", name, time.perf_counter() - start)
        write_json(out / "scaling.json", results, allow_nan=True)
    for path in plot(results, out):
        logger.info("wrote %s", path)
    text = markdown(results)
    if args.update:
        replace_section(args.update, "scaling", text)
        logger.info("updated %s", args.update)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
