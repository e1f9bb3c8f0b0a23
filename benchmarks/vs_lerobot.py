"""vlablocks against LeRobot 0.6.1, side by side in one interleaved run on this machine.

For each policy (pi0, SmolVLA) at a mid-size configuration (``vs_lerobot_worker.py`` lists it):

1. LeRobot builds the policy with its own classes (seeded random weights) and saves it; vlablocks
   converts that directory (``vlablocks convert lerobot``), so both sides hold the same weights.
   Parameter counts are compared block by block, and both sides' actions for one observation
   and one noise are compared (they must agree to float rounding).
2. Inference: observation to action chunk at batch 1 (LeRobot: its pre-processor,
   ``predict_action_chunk`` and post-processor; vlablocks: ``predict_action``, which tokenises,
   normalises and un-normalises inside). Every mode of both sides runs once per round, round
   after round (interleaved), so drifts of this shared machine hit every mode alike. LeRobot:
   eager and ``compile_model=True`` (its own ``torch.compile`` of ``sample_actions``, each
   ``--lerobot-compile`` mode). vlablocks: as loaded, and optimised for inference
   (:mod:`vlablocks.policy.inference`: fused, fused + compiled, fused + int8). Each optimised
   mode's action error against vlablocks' float32 eager chunk is stated.
3. The denoise step: its FLOPs (torch's counter) and the machine's measured matmul rate give its
   FLOP time; each vlablocks mode's step time is set beside it.
4. Training: forward + backward at batch 8, eager and compiled on both sides, interleaved.

Min / median / max of every figure and the load average are recorded in the JSON.

Run (LeRobot's environment from ``benchmarks/vs_lerobot_env.sh``):
    python benchmarks/vs_lerobot.py --json docs/benchmarks/vs_lerobot.json --update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import vlablocks
from vlablocks.convert.lerobot import convert_lerobot, family, read_policy
from vlablocks.io.atomic import replace_section, write_json
from vlablocks.policy.config import Precision
from vlablocks.policy.inference import InferenceOptions, cpu_native_bf16, optimize_for_inference
from vlablocks.policy.precision import apply_precision
from vlablocks.tools.bench import counted_flops, spread_of

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "vs_lerobot_worker.py"
DEFAULT_PYTHON = "/work/lerobot_envs/v3/bin/python"
#: vlablocks' modes: label -> (parameter precision, options; None: the policy as loaded, eager).
OURS: dict[str, tuple[Precision, InferenceOptions | None]] = {
    "eager": ("float32", None),
    "fused": ("float32", InferenceOptions(fuse=True)),
    "fused + compiled": ("float32", InferenceOptions(fuse=True, compile="step")),
    "fused + int8": ("float32", InferenceOptions(fuse=True, quantize="int8")),
    "fused + int8 + compiled": ("float32", InferenceOptions(fuse=True, quantize="int8", compile="step")),
}
#: added where the CPU computes bf16 natively (AMX / AVX512-BF16, :func:`cpu_native_bf16`) or with ``--bf16``.
BF16_MODES: dict[str, tuple[Precision, InferenceOptions | None]] = {
    "fused + bf16": ("bfloat16", InferenceOptions(fuse=True)),
    "fused + bf16 + compiled": ("bfloat16", InferenceOptions(fuse=True, compile="step")),
}
#: per policy: converter overrides LeRobot's config.json cannot give (pi0's SigLIP head count is a constant there).
CONVERT_OVERRIDES = {"pi0": ["vision.config.num_attention_heads=4"], "smolvla": []}


class LeRobotWorker:
    """One LeRobot process holding one policy (``vs_lerobot_worker.py``), spoken to in JSON lines."""

    def __init__(self, python: str, threads: int) -> None:
        env = {**os.environ, "VS_THREADS": str(threads)}
        self.process = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=sys.stderr, text=True, env=env, cwd=ROOT)
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the LeRobot worker exited (code {self.process.poll()}); its errors are above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"LeRobot worker: {answer['error']}")
        return answer

    def ask(self, op: str, **kwargs: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def seconds(self, what: str) -> float:
        return self.ask("time", what=what, repeats=1)["seconds"][0]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def stats(seconds: Sequence[float]) -> dict[str, float]:
    """min / median / max in ms of per-pass seconds."""
    return spread_of([1e3 * s for s in seconds])


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_rate(size: int = 2048, repeats: int = 1) -> float:
    """The machine's float32 matmul rate in GFLOP/s now: the best of ``repeats`` ``size``-cubed matmuls."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / min(timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def block_counts(lerobot_dir: Path, vla: torch.nn.Module, lerobot_blocks: dict[str, int]) -> list[dict[str, Any]]:
    """Per LeRobot block: its parameter count and the count of the vlablocks tensors its keys
    map to (through the converter's key table; ``None`` for tensors vlablocks does not use)."""
    policy = read_policy(lerobot_dir)
    table = family(policy.config, str(lerobot_dir / "config.json")).keys(
        policy.config, {k: list(v.shape) for k, v in policy.weights.items()})
    ours = dict(vla.state_dict())
    rows: dict[str, dict[str, Any]] = {}
    for key, tensor in policy.weights.items():
        block = next((b for b in sorted(lerobot_blocks, key=len, reverse=True) if key.startswith(b + ".")), None)
        if block is None:
            continue
        target = table(key)
        row = rows.setdefault(block, {"block": block, "lerobot": lerobot_blocks[block], "vlablocks": 0, "unused": 0})
        if target is None:
            row["unused"] += tensor.numel()
        else:
            row["vlablocks"] += ours[target].numel()
    return list(rows.values())


def our_batches(directory: Path, task: str, action_dim: int, horizon: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The observation LeRobot used (batch 1) and a training batch of 8, in vlablocks' keys."""
    obs = load_file(str(directory / "observation.safetensors"))
    one = {"images": obs["image"][:, None], "state": obs["state"], "task": [task]}
    g = torch.Generator().manual_seed(11)
    train = {"images": torch.rand(8, 1, *obs["image"].shape[1:], generator=g),
             "state": torch.randn(8, obs["state"].shape[1], generator=g), "task": [task] * 8,
             "actions": torch.randn(8, horizon, action_dim, generator=g)}
    return one, train


def run_policy(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    say = lambda message: print(f"[{name}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    source, converted = work / f"lerobot_{name}", work / f"vlablocks_{name}"
    eager = LeRobotWorker(args.lerobot_python, args.threads)
    built = eager.ask("build", policy=name, dest=str(source))
    say(f"LeRobot {eager.hello['lerobot']} built {built['parameters']:,} parameters; converting")
    convert_lerobot(source, converted, tokenizer=source / "tokenizer", overrides=CONVERT_OVERRIDES[name])
    reference = vlablocks.from_pretrained(converted).eval()
    blocks = block_counts(source, reference, built["blocks"])
    unequal = [row for row in blocks if row["lerobot"] != row["vlablocks"] + row["unused"]]
    if unequal:
        raise SystemExit(f"[{name}] parameter counts differ block by block: {unequal}")
    one, train_batch = our_batches(source, built["task"], reference.normalizer["action"].width, reference.config.horizon)

    noise = torch.randn(1, reference.config.horizon, reference.config.action_dim, generator=torch.Generator().manual_seed(5))
    save_file({"noise": noise}, str(work / "noise.safetensors"))
    eager.ask("actions", noise=str(work / "noise.safetensors"), out=str(work / "lerobot_actions.safetensors"))
    lerobot_actions = load_file(str(work / "lerobot_actions.safetensors"))["actions"]
    with torch.no_grad():
        ours_actions = reference.predict_action(one, noise=noise)
    parity = (ours_actions - lerobot_actions).abs().max().item()
    say(f"LeRobot vs vlablocks actions, same weights and noise: max abs difference {parity:.2e}")

    lerobot = {"eager": eager}
    compile_s: dict[str, float] = {}
    for mode in args.lerobot_compile:
        worker = LeRobotWorker(args.lerobot_python, args.threads)
        worker.ask("build", policy=name, compile_mode=mode)
        say(f"compiling LeRobot ({mode})")
        compile_s[f"LeRobot compiled ({mode})"] = worker.seconds("chunk")
        lerobot[f"compiled ({mode})"] = worker

    ours: dict[str, torch.nn.Module] = {}
    errors: dict[str, float] = {}
    for label, (precision, options) in (OURS | (BF16_MODES if args.bf16 else {})).items():
        vla = vlablocks.from_pretrained(converted).eval()
        apply_precision(vla, precision)
        if options is not None:
            optimize_for_inference(vla, options)
        with torch.no_grad():
            start = time.perf_counter()
            actions = vla.predict_action(one, noise=noise)
            if options is not None and options.compile != "off":
                compile_s[f"vlablocks {label}"] = time.perf_counter() - start
        errors[label] = (actions - ours_actions).abs().max().item()
        ours[label] = vla

    say(f"inference: {args.rounds} interleaved rounds")
    chunk: dict[str, list[float]] = {}
    step: dict[str, list[float]] = {}
    loads = [os.getloadavg()[0]]
    rates: list[float] = []  # the matmul rate, once per round: the step's FLOP time follows the machine's drifts
    with torch.no_grad():
        contexts = {}
        for label, vla in ours.items():
            prefix, state = vla.encode(one)
            contexts[label] = (vla.denoiser.prepare(prefix), state)
        t = torch.full((1,), 0.5)
        for _ in range(args.rounds):
            for label, worker in lerobot.items():
                chunk.setdefault(f"LeRobot {label}", []).append(worker.seconds("chunk"))
            for label, vla in ours.items():
                chunk.setdefault(f"vlablocks {label}", []).append(timed(lambda: vla.predict_action(one)))
                context, state = contexts[label]
                ten = timed(lambda: [vla.denoiser.velocity(context, noise, t, state) for _ in range(10)])
                step.setdefault(label, []).append(ten / 10)  # a chunk's 10 steps in a row, per step
            rates.append(matmul_rate())
            loads.append(os.getloadavg()[0])
        # counted on the fused eager model: its attention is matmuls, which the counter sees (SDPA's it may not)
        step_flops = counted_flops(lambda: ours["fused"].denoiser.velocity(contexts["fused"][0], noise, t, contexts["fused"][1]))
    rate = statistics.median(rates)
    flop_ratio = {label: statistics.median(seconds / (step_flops / (r * 1e9)) for seconds, r in zip(values, rates))
                  for label, values in step.items()}  # per round: step time / FLOP time at that round's rate

    say(f"training: forward + backward at batch 8, {args.train_rounds} interleaved rounds")
    for worker in lerobot.values():
        worker.seconds("train")  # warm-up (compiles LeRobot's compiled forward)
    trainee = vlablocks.from_pretrained(converted).train()
    compiled_forward = torch.compile(trainee, dynamic=False)

    def our_step(forward: Callable[..., Any]) -> None:
        trainee.zero_grad(set_to_none=True)
        forward(train_batch).loss.backward()

    train_flops = counted_flops(lambda: our_step(trainee))
    start = time.perf_counter()
    our_step(compiled_forward)
    compile_s["vlablocks training forward"] = time.perf_counter() - start
    our_step(trainee)
    train: dict[str, list[float]] = {}
    for _ in range(args.train_rounds):
        for label, worker in lerobot.items():
            train.setdefault(f"LeRobot {label}", []).append(worker.seconds("train"))
        train.setdefault("vlablocks eager", []).append(timed(lambda: our_step(trainee)))
        train.setdefault("vlablocks compiled", []).append(timed(lambda: our_step(compiled_forward)))
        loads.append(os.getloadavg()[0])
    for worker in lerobot.values():
        worker.close()
    torch._dynamo.reset()
    return {
        "policy": name, "lerobot": eager.hello, "parameters": {"lerobot": built["parameters"],
                                                               "vlablocks": sum(p.numel() for p in reference.parameters())},
        "blocks": blocks, "text_tokens": {"lerobot": built["text_tokens"], "real": built["real_text_tokens"]},
        "prefix_tokens_vlablocks": int(reference.encode(one).prefix.embeds.shape[1]),
        "parity_max_abs": parity, "action_error_vs_fp32_eager": errors,
        "chunk_ms": {k: stats(v) for k, v in chunk.items()},
        "step_ms": {k: stats(v) for k, v in step.items()},
        "step_flops": step_flops, "matmul_gflops": rate, "matmul_gflops_rounds": spread_of(rates),
        "step_flop_time_ms": step_flops / rate / 1e6, "step_over_flop_time": flop_ratio,
        "train_fwd_bwd_ms": {k: stats(v) for k, v in train.items()}, "train_flops": train_flops,
        "train_flop_time_ms": train_flops / rate / 1e6, "compile_s": compile_s,
        "load_average": {"min": min(loads), "max": max(loads)},
    }


def table(result: dict[str, Any]) -> str:
    """The markdown rows of one policy: chunk latency per mode, the step, training."""
    name = result["policy"]
    chunks = result["chunk_ms"]
    fastest_lerobot = min(v["median"] for k, v in chunks.items() if k.startswith("LeRobot"))
    lines = [f"**{name}** ({result['parameters']['lerobot']:,} parameters in LeRobot, {result['parameters']['vlablocks']:,} "
             f"used by vlablocks; actions of the two for the same weights and noise differ by "
             f"{result['parity_max_abs']:.1e}; {len(result['blocks'])} blocks compared, each of equal size on both sides; "
             "not used by vlablocks: " + ", ".join(f"`{row['block']}` ({row['unused']:,})"
                                                 for row in result["blocks"] if row["unused"]) + ")", "",
             "| observation -> chunk, batch 1 | min | median | max | vs LeRobot's fastest | action error vs fp32 eager |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, s in chunks.items():
        mode = label.removeprefix("vlablocks ")
        error = result["action_error_vs_fp32_eager"].get(mode) if label.startswith("vlablocks") else None
        lines.append(f"| {label} | {s['min']:.0f} ms | {s['median']:.0f} ms | {s['max']:.0f} ms | "
                     f"**{fastest_lerobot / s['median']:.2f}x** | {'' if error is None else f'{error:.1e}'} |")
    flop_ms = result["step_flop_time_ms"]
    spread = result["matmul_gflops_rounds"]
    lines += ["", f"Denoise step: {result['step_flops'] / 1e9:.2f} GFLOP (torch's counter, fused model), {flop_ms:.1f} ms "
              f"at the median float32 matmul rate {result['matmul_gflops']:.0f} GFLOP/s (a 2048^3 matmul timed in every "
              f"round: {spread['min']:.0f} to {spread['max']:.0f}). Each step time is the mean of a chunk's 10 steps "
              "run back to back; / FLOP time is the median over rounds of the step time over the FLOP time at that "
              "round's rate.", "",
              "| vlablocks denoise step | min | median | max | / FLOP time |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, s in result["step_ms"].items():
        lines.append(f"| {label} | {s['min']:.1f} ms | {s['median']:.1f} ms | {s['max']:.1f} ms | "
                     f"{result['step_over_flop_time'][label]:.2f} |")
    train = result["train_fwd_bwd_ms"]
    fastest = min(v["median"] for k, v in train.items() if k.startswith("LeRobot"))
    train_flop_ms = result["train_flop_time_ms"]
    lines += ["", f"Training forward + backward: {result['train_flops'] / 1e9:.1f} GFLOP (vlablocks' count), "
              f"{train_flop_ms:.0f} ms at the measured matmul rate.", "",
              "| training forward + backward, batch 8 | min | median | max | samples / s | vs LeRobot's fastest | / FLOP time |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, s in train.items():
        lines.append(f"| {label} | {s['min']:.0f} ms | {s['median']:.0f} ms | {s['max']:.0f} ms | "
                     f"{8000 / s['median']:.1f} | {fastest / s['median']:.2f}x | {s['median'] / train_flop_ms:.2f} |")
    lines += ["", "Compilation (first call): " + ", ".join(f"{k} {v:.0f} s" for k, v in result["compile_s"].items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", nargs="+", default=["pi0", "smolvla"], choices=["pi0", "smolvla"])
    parser.add_argument("--lerobot-python", default=DEFAULT_PYTHON, help="python of LeRobot's environment")
    parser.add_argument("--lerobot-compile", nargs="*", default=["max-autotune"],
                        help="LeRobot compile_mode values to measure (compile_model=True; max-autotune is LeRobot's default)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--train-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=cpu_native_bf16(),
                        help="also time fused bf16 modes (default: where the CPU has AMX / AVX512-BF16)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--update", type=Path, help="markdown file with a <!-- vs_lerobot:begin/end --> section")
    parser.add_argument("--tables-from", type=Path, metavar="JSON",
                        help="measure nothing: print (and --update) the tables of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.tables_from is not None:
        results = json.loads(args.tables_from.read_text())["results"]
        print("\n\n".join(table(r) for r in results))
        if args.update:
            replace_section(args.update, "vs_lerobot", "\n\n".join(table(r) for r in results))
        return 0
    torch.set_num_threads(args.threads)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
               "native_bf16": cpu_native_bf16(), "date": time.strftime("%Y-%m-%d")}
    results = []
    with tempfile.TemporaryDirectory(prefix="vs_lerobot_") as work:
        for name in args.policy:
            results.append(run_policy(name, args, Path(work)))
            print(table(results[-1]) + "\n", flush=True)
    if args.json:
        write_json(args.json, {"machine": machine, "results": results})
    if args.update:
        replace_section(args.update, "vs_lerobot", "\n\n".join(table(r) for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
