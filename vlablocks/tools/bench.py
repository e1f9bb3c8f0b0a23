"""``vlablocks bench``: inference latency, training throughput and peak memory of a recipe.

Every figure is the median of ``repeats`` timed rounds after ``warmup`` untimed ones, the
functions interleaved within a round (CUDA work is synchronised before each clock reading).
What is timed, for a batch of random observations (:func:`~vlablocks.policy.checks.random_batch`):

==========================  ==================================================================
``encode_ms``               observation -> prefix tokens (vision, geometry, text embedding)
``prefix_ms``               the prefix pass: ``denoiser.prepare`` (the cache)
``step_ms``                 one denoise step: ``denoiser.velocity`` over the cache
``chunk_cached_ms``         ``prepare`` + ``N`` Euler steps (``FlowMatchingHead.sample``;
                            ``encode_ms + chunk_cached_ms`` is observation to actions)
``chunk_recompute_ms``      ``N`` joint passes over ``[prefix ; suffix]`` (no cache), deep fusion only
``input_checks_ms``         ``vla.check_batch``: what ``predict_action`` spends validating its batch
``output_checks_ms``        ``vla.check_actions``: what it spends checking the chunk is finite
``train_step_ms``           loss, backward and an AdamW step at ``train_batch``
``train_checks_ms``         ``vla.check_batch`` at ``train_batch``: what a training step spends on
                            its batch checks (the gradient guard reuses the clipped norm: free)
==========================  ==================================================================

The cache's speed-up ``chunk_recompute_ms / chunk_cached_ms`` is reported next to the
theoretical token-work ratio ``N (P + S) / (P + N S)`` (``P`` prefix and ``S`` suffix tokens:
the tokens each variant pushes through the stack) and next to the ratio of counted FLOPs
(:class:`torch.utils.flop_counter.FlopCounterMode`), which also weighs a narrower expert.

Peak memory (:func:`~vlablocks.tools.memory.measure_memory`): the model, its gradients and
optimizer state and the work's transient tensors at their peak during one ``predict_action``
call or one training step; on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the peak
resident set (``VmHWM``) of a fresh process less its size before the model was built. Training
memory is measured with and without gradient checkpointing.

``bf16`` runs under ``torch.autocast``; for inference the weights are also cast to bf16 (as a
deployed policy would be), for training they stay fp32 (mixed precision, as the trainer does).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlablocks.heads.deep_fusion import DeepFusionDenoiser
from vlablocks.heads.denoiser import Prefix
from vlablocks.heads.flow_matching import integrate
from vlablocks.io.atomic import write_json
from vlablocks.policy.batch import to_device
from vlablocks.policy.checks import random_batch
from vlablocks.policy.vla import VLA
from vlablocks.tools.bench_setup import DTYPES, BenchSettings, bench_autocast, build_for_bench, make_train_step
from vlablocks.tools.memory import MEMORY_KINDS, measure_memory

__all__ = [  # BenchSettings too: run_bench takes it
    "BenchResult", "BenchSettings", "bench_inference", "bench_training", "chunk_functions", "counted_flops",
    "format_table", "machine_description", "median_ms", "run_bench", "token_work_ratio", "write_result",
]

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """What one ``vlablocks bench`` run measured (milliseconds, MiB; ``None``: not measured)."""

    recipe: str
    overrides: list[str]
    settings: dict[str, Any]
    machine: dict[str, Any]
    parameters: int
    prefix_tokens: int
    suffix_tokens: int
    encode_ms: float
    prefix_ms: float
    step_ms: float
    chunk_cached_ms: float
    input_checks_ms: float | None = None
    output_checks_ms: float | None = None
    chunk_recompute_ms: float | None = None
    speedup: float | None = None
    token_work_ratio: float | None = None
    flop_ratio: float | None = None
    compile_s: float | None = None
    train_step_ms: float | None = None
    train_samples_per_s: float | None = None
    train_step_checkpointed_ms: float | None = None
    train_checks_ms: float | None = None
    memory_mib: dict[str, float] = field(default_factory=dict)

    @property
    def speedup_vs_theory(self) -> float | None:
        """Measured speed-up over the token-work ratio (1.0: the whole theoretical gain)."""
        if self.speedup is None or self.token_work_ratio is None:
            return None
        return self.speedup / self.token_work_ratio

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "speedup_vs_theory": self.speedup_vs_theory}


def token_work_ratio(prefix_tokens: int, suffix_tokens: int, steps: int) -> float:
    """Tokens through the stack without / with the cache: ``N (P + S) / (P + N S)``."""
    return steps * (prefix_tokens + suffix_tokens) / (prefix_tokens + steps * suffix_tokens)


def machine_description(device: str) -> dict[str, Any]:
    """CPU model, core and thread counts, torch version and, on CUDA, the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median_ms(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median wall time in ms of each ``fn()``, over ``repeats`` rounds after ``warmup`` untimed ones.

    The functions are interleaved (one run of each per round), so a slow spell of the machine
    hits them all alike and their ratios stay fair.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch's flop counter sees them (matmuls and attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------ inference


ChunkFn = Callable[[Prefix, "torch.Tensor | None", torch.Tensor], torch.Tensor]


def chunk_functions(
    denoiser: torch.nn.Module,
    steps: int,
    prepare: Callable | None = None,
    velocity: Callable | None = None,
    joint: Callable | None = None,
) -> dict[str, ChunkFn]:
    """The timed chunk functions ``(prefix, state, noise [B, H, A]) -> actions [B, H, A]``.

    ``"chunk_cached_ms"``: ``prepare`` once, then ``steps`` Euler steps of ``velocity`` over the
    cache (what :meth:`FlowMatchingHead.sample` runs); ``"chunk_recompute_ms"`` (deep-fusion
    denoisers only): ``steps`` Euler steps of ``joint_velocity``, the prefix recomputed in each.
    ``prepare`` / ``velocity`` / ``joint`` replace the denoiser's methods (e.g. compiled ones).
    """
    prepare = prepare or denoiser.prepare
    velocity = velocity or denoiser.velocity

    def cached(prefix: Prefix, state: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
        context = prepare(prefix)
        return integrate(lambda x, t: velocity(context, x, t, state), noise, steps)

    functions: dict[str, ChunkFn] = {"chunk_cached_ms": cached}
    if isinstance(denoiser, DeepFusionDenoiser):
        joint = joint or denoiser.joint_velocity

        def recomputed(prefix: Prefix, state: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
            return integrate(lambda x, t: joint(prefix, x, t, state), noise, steps)

        functions["chunk_recompute_ms"] = recomputed
    return functions


def bench_inference(vla: VLA, settings: BenchSettings) -> dict[str, Any]:
    """Timings of the encoding, the prefix pass, one denoise step and the cached / recomputed chunk.

    A cached chunk is ``prepare`` + ``N`` Euler steps of ``velocity`` (what
    :meth:`FlowMatchingHead.sample` runs); a recomputed one is ``N`` steps of ``joint_velocity``.
    ``compile="step"`` compiles ``prepare``, ``velocity`` and ``joint_velocity``, each one graph
    the loops call; ``compile="chunk"`` compiles each whole chunk into one unrolled graph (and
    ``prepare`` and ``velocity`` on their own for their figures).
    """
    device, repeats, warmup, steps = settings.device, settings.repeats, settings.warmup, settings.steps
    vla = vla.eval().to(DTYPES[settings.dtype])
    batch = to_device(random_batch(vla, settings.batch, seed=settings.seed), device)
    denoiser = vla.denoiser
    gen = torch.Generator(device).manual_seed(settings.seed)
    noise = torch.randn((settings.batch, vla.config.horizon, vla.config.action_dim), generator=gen, device=device)
    eager = (denoiser.prepare, denoiser.velocity, getattr(denoiser, "joint_velocity", None))
    graphs = [fn if fn is None or settings.compile == "off" else torch.compile(fn, dynamic=False) for fn in eager]
    prepare, velocity = graphs[0], graphs[1]
    if settings.compile == "chunk":
        chunks = {name: torch.compile(fn, dynamic=False) for name, fn in chunk_functions(denoiser, steps).items()}
    else:
        chunks = chunk_functions(denoiser, steps, *graphs)
    with torch.inference_mode(), bench_autocast(settings):
        prefix, state = vla.encode(batch)
        out: dict[str, Any] = {"prefix_tokens": prefix.embeds.shape[1],
                               "suffix_tokens": len(denoiser.suffix_encoder.layout(1)[0][0])}
        if settings.dtype == "fp32":  # FLOPs do not depend on the dtype: count them once, uncompiled
            out["flops"] = {name: counted_flops(lambda fn=fn: fn(prefix, state, noise))
                            for name, fn in chunk_functions(denoiser, steps).items()}
        start = time.perf_counter()
        context = prepare(prefix)  # compiles, as the first chunk calls do
        for fn in chunks.values():
            fn(prefix, state, noise)
        if device == "cuda":
            torch.cuda.synchronize()
        if settings.compile != "off":
            out["compile_s"] = time.perf_counter() - start
        t = torch.full((settings.batch,), 0.5, device=device)
        timed = {
            "encode_ms": lambda: vla.encode(batch),
            "input_checks_ms": lambda: vla.check_batch(batch, actions=False),
            "output_checks_ms": lambda: vla.check_actions(noise),
            "prefix_ms": lambda: prepare(prefix),
            "step_ms": lambda: velocity(context, noise, t, state),
            **{name: (lambda fn=fn: fn(prefix, state, noise)) for name, fn in chunks.items()},
        }
        out.update(median_ms(timed, repeats, warmup, device))
    return out


# ------------------------------------------------------------------------------------ training


def bench_training(vla: VLA, settings: BenchSettings) -> dict[str, float]:
    """Training step time without and with gradient checkpointing, and its batch checks' time."""
    out = {}
    repeats, warmup = max(3, settings.repeats // 2), max(1, settings.warmup)
    batch = to_device(random_batch(vla, settings.train_batch, seed=settings.seed), settings.device)
    for checkpointed in (False, True):
        vla.set_gradient_checkpointing(checkpointed)
        step = make_train_step(vla, settings)
        name = "train_step_checkpointed_ms" if checkpointed else "train_step_ms"
        timed = {name: step}
        if not checkpointed:
            timed["train_checks_ms"] = lambda: vla.check_batch(batch, actions=True)
        out.update(median_ms(timed, repeats, warmup, settings.device))
    vla.set_gradient_checkpointing(False)
    out["train_samples_per_s"] = 1000 * settings.train_batch / out["train_step_ms"]
    return out


# ------------------------------------------------------------------------------------ the run


def run_bench(
    recipe: str,
    overrides: Sequence[str] = (),
    settings: BenchSettings = BenchSettings(),
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Measure a recipe; see the module docstring for what each figure is."""
    say = progress or (lambda message: logger.info(message))
    vla = build_for_bench(recipe, overrides, settings.seed, settings.device)
    parameters = sum(p.numel() for p in vla.parameters())
    say(f"inference: batch {settings.batch}, {settings.steps} ODE steps")
    inference = bench_inference(vla, settings)
    steps = settings.steps
    result = BenchResult(
        recipe=recipe, overrides=list(overrides), settings=asdict(settings),
        machine=machine_description(settings.device), parameters=parameters,
        prefix_tokens=inference["prefix_tokens"], suffix_tokens=inference["suffix_tokens"],
        encode_ms=inference["encode_ms"], prefix_ms=inference["prefix_ms"], step_ms=inference["step_ms"],
        chunk_cached_ms=inference["chunk_cached_ms"], input_checks_ms=inference["input_checks_ms"],
        output_checks_ms=inference["output_checks_ms"],
        compile_s=inference.get("compile_s"),
    )
    if "chunk_recompute_ms" in inference:
        result.chunk_recompute_ms = inference["chunk_recompute_ms"]
        result.speedup = result.chunk_recompute_ms / result.chunk_cached_ms
        result.token_work_ratio = token_work_ratio(result.prefix_tokens, result.suffix_tokens, steps)
        flops = inference.get("flops", {})
        if "chunk_recompute_ms" in flops:
            result.flop_ratio = flops["chunk_recompute_ms"] / flops["chunk_cached_ms"]
    del vla
    if settings.compile != "off":
        torch._dynamo.reset()  # drop the compiled graphs and what they hold
    gc.collect()
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    if settings.train:
        say(f"training: batch {settings.train_batch}, with and without gradient checkpointing")
        result.__dict__.update(bench_training(
            build_for_bench(recipe, overrides, settings.seed, settings.device), settings))
    if settings.memory:
        kinds: Iterable[str] = MEMORY_KINDS if settings.train else ("inference",)
        for kind in kinds:
            say(f"peak memory: {kind}")
            result.memory_mib[kind] = measure_memory(kind, recipe, overrides, settings)
    return result


def format_table(result: BenchResult) -> str:
    """The human-readable report printed by ``vlablocks bench``."""
    s = result.settings
    lines = [
        f"recipe     {result.recipe} {' '.join(result.overrides)}".rstrip(),
        f"machine    {result.machine.get('gpu') or result.machine['cpu']} ({result.machine['torch_threads']} threads), "
        f"torch {result.machine['torch']}",
        f"settings   {s['device']} {s['dtype']}{'' if s['compile'] == 'off' else ', compiled per ' + s['compile']}, batch {s['batch']}, "
        f"{s['steps']} ODE steps, median of {s['repeats']} after {s['warmup']} warm-up",
        f"model      {result.parameters:,} parameters; prefix P = {result.prefix_tokens} tokens, "
        f"suffix S = {result.suffix_tokens} tokens",
        "",
        f"{'figure':34s} {'value':>12s}",
    ]

    def row(name: str, value: float | None, unit: str = "ms") -> None:
        if value is not None:
            lines.append(f"{name:34s} {value:12.2f} {unit}")

    row("observation encoding", result.encode_ms)
    row("prefix pass (cache)", result.prefix_ms)
    row("one denoise step", result.step_ms)
    row(f"chunk, cached ({s['steps']} steps)", result.chunk_cached_ms)
    row(f"chunk, full recompute ({s['steps']} steps)", result.chunk_recompute_ms)
    row("observation to actions", result.encode_ms + result.chunk_cached_ms)
    if result.input_checks_ms is not None:
        row("batch checks of predict_action", result.input_checks_ms)
        row("  share of observation to actions", 100 * result.input_checks_ms / (result.encode_ms + result.chunk_cached_ms), "%")
    if result.output_checks_ms is not None:
        row("action checks of predict_action", result.output_checks_ms)
        row("  share of observation to actions", 100 * result.output_checks_ms / (result.encode_ms + result.chunk_cached_ms), "%")
    if result.speedup is not None:
        row("cache speed-up", result.speedup, "x")
        row("  theoretical (token work)", result.token_work_ratio, "x")
        row("  theoretical (counted FLOPs)", result.flop_ratio, "x")
        row("  achieved / token-work ratio", result.speedup_vs_theory, "")
    row("compilation (first calls)", result.compile_s, "s")
    if result.train_step_ms is not None:
        row(f"training step (batch {s['train_batch']})", result.train_step_ms)
        row("  samples / s", result.train_samples_per_s, "")
        row("  with gradient checkpointing", result.train_step_checkpointed_ms)
    if result.train_checks_ms is not None and result.train_step_ms is not None:
        row("batch checks of a training step", result.train_checks_ms)
        row("  share of the training step", 100 * result.train_checks_ms / result.train_step_ms, "%")
    memory = result.memory_mib
    for kind, label in (("inference", "inference"), ("train", "training"),
                        ("train_checkpointed", "training, checkpointed")):
        row(f"peak memory, {label}", memory.get(kind), "MiB")
    if "train" in memory and "train_checkpointed" in memory:
        row("  checkpointing cuts it by", memory["train"] / memory["train_checkpointed"], "x")
    return "\n".join(lines)


def write_result(result: BenchResult, path: str | Path) -> None:
    """Write the result as JSON, atomically."""
    write_json(path, result.to_json(), allow_nan=True)

