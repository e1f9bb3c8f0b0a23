"""``vlablocks bench RECIPE``: its options (registered by :mod:`vlablocks.cli`, which runs the
command and answers errors with one line).

(The parser lives here, not in ``cli.py``, only to keep ``cli.py`` readable in one sitting.)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from vlablocks.tools.bench_setup import BenchSettings


def bench_settings(args: argparse.Namespace) -> BenchSettings:
    """The :class:`BenchSettings` the parsed ``bench`` options ask for (ValueError: a bad value)."""
    return BenchSettings(
        device=args.device, dtype=args.dtype, compile=args.compile, batch=args.batch, train_batch=args.train_batch,
        steps=args.steps, repeats=args.repeats, warmup=args.warmup, train=args.train, memory=args.memory,
        prompt_tokens=args.prompt_tokens, prompts=args.prompts, fuse=args.fuse, quantize=args.quantize,
    )


def add_bench_command(sub: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    """``bench``, on the ``vlablocks`` subparsers ``sub``, run by ``handler(args)``."""
    bench = sub.add_parser("bench", help="inference latency (cached vs recomputed prefix), training speed, peak memory")
    bench.add_argument("recipe")
    bench.add_argument("overrides", nargs="*", help="key.path=value, e.g. policy.horizon=50 vision.image_size=256")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    bench.add_argument("--compile", nargs="?", const="step", default="off", choices=["off", "step", "chunk"],
                       help="torch.compile the prefix pass and the denoise step (step, the default when given) "
                            "or each whole action chunk as one graph (chunk: faster on a CPU, slow to compile)")
    bench.add_argument("--fuse", action="store_true",
                       help="time inference with fused projections and the auto attention backend (vlablocks serve --fuse)")
    bench.add_argument("--quantize", choices=["none", "int8"], default="none",
                       help="time inference with dynamic int8 linears (CPU; vlablocks serve --quantize int8)")
    bench.add_argument("--batch", type=int, default=1, help="observations per inference call (default 1: one robot)")
    bench.add_argument("--train-batch", type=int, default=8, help="samples per training step")
    bench.add_argument("--steps", type=int, default=10, help="ODE steps per action chunk")
    bench.add_argument("--repeats", type=int, default=10,
                       help="timed runs per figure (min / median / max reported; the JSON's figures are medians)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    prompts = bench.add_mutually_exclusive_group()
    prompts.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                         help="task prompts of exactly N tokens for the policy's text encoder (at most its max_length; "
                              "default: short built-in tasks)")
    prompts.add_argument("--prompts", default=None, metavar="FILE_OR_DATASET",
                         help="task prompts from a text file (one per line) or a LeRobot dataset's meta/tasks")
    bench.add_argument("--no-train", dest="train", action="store_false", help="skip the training step")
    bench.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    bench.add_argument("--json", default=None, help="also write the figures to this JSON file")
    bench.set_defaults(fn=handler)
