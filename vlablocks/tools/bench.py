"""``vlablocks bench``: inference latency, training throughput and peak memory of a recipe.

Every figure is the median of ``repeats`` timed rounds after ``warmup`` untimed ones, the
functions interleaved within a round (CUDA work is synchronised before each clock reading); the
min, median and max of each are kept in :attr:`BenchResult.spread` (:func:`timing_stats`). What
is timed, for a batch of random observations (:func:`~vlablocks.tools.bench_setup.bench_batch`:
:func:`~vlablocks.policy.checks.random_batch`, its task prompts as ``--prompt-tokens`` /
``--prompts`` ask):

==========================  ==================================================================
``encode_ms``               observation -> prefix tokens (vision, geometry, text embedding)
``prefix_ms``               the prefix pass: ``denoiser.prepare`` (the cache)
``step_ms``                 one denoise step: ``denoiser.velocity`` over the cache
``chunk_cached_ms``         ``prepare`` + ``N`` Euler steps (``FlowMatchingHead.sample``;
                            ``encode_ms + chunk_cached_ms`` is observation to actions)
``chunk_recompute_ms``      ``N`` joint passes over ``[prefix ; suffix]`` (no cache), deep fusion only
``input_checks_ms``         ``vla.check_batch``: what ``predict_action`` spends validating its batch
``output_checks_ms``        ``vla.check_actions``: what it spends checking the chunk is finite
``train_fwd_bwd_ms``        loss and backward at ``train_batch`` (gradients set to ``None`` first)
``train_optimizer_ms``      the AdamW step and ``zero_grad(set_to_none=True)``, timed in the same
                            rounds, right after the forward + backward it follows
``train_step_ms``           the whole step: per round, ``train_fwd_bwd_ms + train_optimizer_ms``
``train_checks_ms``         ``vla.check_batch`` at ``train_batch``: what a training step spends on
                            its batch checks (the gradient guard reuses the clipped norm: free)
==========================  ==================================================================

``train_samples_per_s`` is ``train_batch`` over the whole step (``train_step_ms``);
``train_fwd_bwd_samples_per_s`` over forward + backward alone (``train_fwd_bwd_ms``).

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
from vlablocks.policy.inference import InferenceOptions, optimize_for_inference
from vlablocks.policy.vla import VLA
from vlablocks.tools.bench_setup import DTYPES, BenchSettings, bench_autocast, bench_batch, build_for_bench, make_train_phases
from vlablocks.tools.memory import MEMORY_KINDS, measure_memory

__all__ = [  # BenchSettings too: run_bench takes it
    "BenchResult", "BenchSettings", "bench_inference", "bench_training", "chunk_functions", "counted_flops",
    "format_table", "machine_description", "median_ms", "run_bench", "spread_of", "time_rounds", "timing_stats",
    "token_work_ratio", "write_result",
]

#: the statistics of each timed figure in :attr:`BenchResult.spread`.
Stats = dict[str, float]  # {"min": ms, "median": ms, "max": ms}

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """What one ``vlablocks bench`` run measured (milliseconds, MiB; ``None``: not measured).

    The ``*_ms`` fields are medians; ``spread`` maps each timed figure's name (``"step_ms"``...)
    to its ``{"min", "median", "max"}`` in ms. ``prefix_tokens`` is the prefix length ``P`` of
    the inference batch (image tokens + the longest prompt's text tokens, padded).
    """

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
    train_fwd_bwd_ms: float | None = None
    train_optimizer_ms: float | None = None
    train_fwd_bwd_samples_per_s: float | None = None
    train_step_checkpointed_ms: float | None = None
    train_checks_ms: float | None = None
    memory_mib: dict[str, float] = field(default_factory=dict)
    spread: dict[str, Stats] = field(default_factory=dict)

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


def time_rounds(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Wall time in ms of each ``fn()`` in each of ``repeats`` rounds (``{name: [repeats]}``),
    after ``warmup`` untimed rounds.

    The functions are interleaved (one run of each per round, in ``fns``' order), so a slow spell
    of the machine hits them all alike and their ratios stay fair.
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
    return times


def spread_of(values: Sequence[float]) -> Stats:
    """``{"min", "median", "max"}`` of ``values`` (ms)."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def timing_stats(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str) -> dict[str, Stats]:
    """Min, median and max wall time in ms of each ``fn()`` (:func:`time_rounds`, interleaved)."""
    return {name: spread_of(values) for name, values in time_rounds(fns, repeats, warmup, device).items()}


def median_ms(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median wall time in ms of each ``fn()`` (:func:`timing_stats`' medians)."""
    return {name: stats["median"] for name, stats in timing_stats(fns, repeats, warmup, device).items()}


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
    if settings.fuse or settings.quantize != "none":
        optimize_for_inference(vla, InferenceOptions(fuse=settings.fuse, quantize=settings.quantize))
    batch = bench_batch(vla, settings.batch, settings)
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
        if settings.dtype == "fp32" and settings.quantize == "none":  # count once, uncompiled (int8 ops are not counted)
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
        out["spread"] = timing_stats(timed, repeats, warmup, device)
        out.update({name: stats["median"] for name, stats in out["spread"].items()})
    return out


# ------------------------------------------------------------------------------------ training


def bench_training(vla: VLA, settings: BenchSettings) -> dict[str, Any]:
    """Training step time without and with gradient checkpointing, and its batch checks' time.

    Without checkpointing, forward + backward (``train_fwd_bwd_ms``) and the optimizer step
    (``train_optimizer_ms``) are timed apart in the same rounds; ``train_step_ms`` is their sum
    per round (with checkpointing only that sum is kept). ``train_samples_per_s`` is from the
    whole step, ``train_fwd_bwd_samples_per_s`` from forward + backward. ``"spread"``: each
    figure's min / median / max.
    """
    out: dict[str, Any] = {}
    spread: dict[str, Stats] = {}
    repeats, warmup = max(3, settings.repeats // 2), max(1, settings.warmup)
    batch = bench_batch(vla, settings.train_batch, settings)
    for checkpointed in (False, True):
        vla.set_gradient_checkpointing(checkpointed)
        forward_backward, optimizer_step = make_train_phases(vla, settings)
        timed = {"fwd_bwd": forward_backward, "optimizer": optimizer_step}  # in this order: one step per round
        if not checkpointed:
            timed["train_checks_ms"] = lambda: vla.check_batch(batch, actions=True)
        rounds = time_rounds(timed, repeats, warmup, settings.device)
        fwd_bwd, optimizer = rounds.pop("fwd_bwd"), rounds.pop("optimizer")
        steps = [a + b for a, b in zip(fwd_bwd, optimizer)]
        if checkpointed:
            spread["train_step_checkpointed_ms"] = spread_of(steps)
        else:
            spread.update(train_fwd_bwd_ms=spread_of(fwd_bwd), train_optimizer_ms=spread_of(optimizer),
                          train_step_ms=spread_of(steps), train_checks_ms=spread_of(rounds["train_checks_ms"]))
    vla.set_gradient_checkpointing(False)
    out.update({name: stats["median"] for name, stats in spread.items()})
    out["train_samples_per_s"] = 1000 * settings.train_batch / out["train_step_ms"]
    out["train_fwd_bwd_samples_per_s"] = 1000 * settings.train_batch / out["train_fwd_bwd_ms"]
    out["spread"] = spread
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
        compile_s=inference.get("compile_s"), spread=dict(inference["spread"]),
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
        training = bench_training(build_for_bench(recipe, overrides, settings.seed, settings.device), settings)
        result.spread.update(training.pop("spread"))
        result.__dict__.update(training)
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
        f"settings   {s['device']} {s['dtype']}{'' if s['compile'] == 'off' else ', compiled per ' + s['compile']}"
        f"{', fused' if s.get('fuse') else ''}{', int8' if s.get('quantize') == 'int8' else ''}, batch {s['batch']}, "
        f"{s['steps']} ODE steps, min / median / max of {s['repeats']} after {s['warmup']} warm-up",
        f"model      {result.parameters:,} parameters; prefix P = {result.prefix_tokens} tokens"
        f"{_prompt_note(s)}, suffix S = {result.suffix_tokens} tokens",
        "",
        f"{'figure':40s} {'min':>10s} {'median':>10s} {'max':>10s}",
    ]

    def row(name: str, value: float | None, unit: str = "ms", figure: str | None = None) -> None:
        """One line: a timed ``figure``'s min / median / max, or ``value`` alone in the median column."""
        if value is None:
            return
        stats = result.spread.get(figure or "")
        low, high = (f"{stats['min']:10.2f}", f"{stats['max']:10.2f}") if stats else (f"{'':10s}", f"{'':10s}")
        lines.append(f"{name:40s} {low} {value:10.2f} {high} {unit}".rstrip())

    row("observation encoding", result.encode_ms, figure="encode_ms")
    row("prefix pass (cache)", result.prefix_ms, figure="prefix_ms")
    row("one denoise step", result.step_ms, figure="step_ms")
    row(f"chunk, cached ({s['steps']} steps)", result.chunk_cached_ms, figure="chunk_cached_ms")
    row(f"chunk, full recompute ({s['steps']} steps)", result.chunk_recompute_ms, figure="chunk_recompute_ms")
    row("observation to actions", result.encode_ms + result.chunk_cached_ms)
    if result.input_checks_ms is not None:
        row("batch checks of predict_action", result.input_checks_ms, figure="input_checks_ms")
        row("  share of observation to actions", 100 * result.input_checks_ms / (result.encode_ms + result.chunk_cached_ms), "%")
    if result.output_checks_ms is not None:
        row("action checks of predict_action", result.output_checks_ms, figure="output_checks_ms")
        row("  share of observation to actions", 100 * result.output_checks_ms / (result.encode_ms + result.chunk_cached_ms), "%")
    if result.speedup is not None:
        row("cache speed-up", result.speedup, "x")
        row("  theoretical (token work)", result.token_work_ratio, "x")
        row("  theoretical (counted FLOPs)", result.flop_ratio, "x")
        row("  achieved / token-work ratio", result.speedup_vs_theory, "")
    row("compilation (first calls)", result.compile_s, "s")
    if result.train_step_ms is not None:
        row(f"training step (batch {s['train_batch']})", result.train_step_ms, figure="train_step_ms")
        row("  forward + backward", result.train_fwd_bwd_ms, figure="train_fwd_bwd_ms")
        row("  optimizer step (AdamW + zero_grad)", result.train_optimizer_ms, figure="train_optimizer_ms")
        row("  samples / s (whole step)", result.train_samples_per_s, "")
        row("  samples / s (forward + backward)", result.train_fwd_bwd_samples_per_s, "")
        row("  with gradient checkpointing", result.train_step_checkpointed_ms, figure="train_step_checkpointed_ms")
    if result.train_checks_ms is not None and result.train_step_ms is not None:
        row("batch checks of a training step", result.train_checks_ms, figure="train_checks_ms")
        row("  share of the training step", 100 * result.train_checks_ms / result.train_step_ms, "%")
    memory = result.memory_mib
    for kind, label in (("inference", "inference"), ("train", "training"),
                        ("train_checkpointed", "training, checkpointed")):
        row(f"peak memory, {label}", memory.get(kind), "MiB")
    if "train" in memory and "train_checkpointed" in memory:
        row("  checkpointing cuts it by", memory["train"] / memory["train_checkpointed"], "x")
    return "\n".join(lines)


def _prompt_note(settings: dict[str, Any]) -> str:
    """`` (N-token prompts)`` / `` (prompts from FILE)`` for the table's model line, else nothing."""
    if settings.get("prompt_tokens") is not None:
        return f" ({settings['prompt_tokens']}-token prompts)"
    if settings.get("prompts") is not None:
        return f" (prompts from {settings['prompts']})"
    return ""


def write_result(result: BenchResult, path: str | Path) -> None:
    """Write the result as JSON, atomically."""
    write_json(path, result.to_json(), allow_nan=True)

