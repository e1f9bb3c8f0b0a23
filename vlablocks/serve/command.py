"""``vlablocks serve CHECKPOINT``: its options (registered by :mod:`vlablocks.cli`, which answers
errors with one line) and the steps from a checkpoint to a listening server.

(Its parser lives here, not in ``cli.py``, only to keep ``cli.py`` readable in one sitting.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlablocks.policy.inference import QUANTIZE, InferenceOptions, optimize_for_inference
from vlablocks.serve.observation import default_observation_map, load_observation_map
from vlablocks.serve.server import DEFAULT_MAX_SIZE, PolicyServer, load_for_serving, policy_name, trained_cameras


def make_server(checkpoint: str | Path, device: str = "cpu", obs_map: str | Path | None = None,
                max_size: int | None = DEFAULT_MAX_SIZE, inference: InferenceOptions | None = None) -> PolicyServer:
    """A server for a checkpoint or run directory: the default observation map has as many
    cameras as the run trained with (1 outside a run); ``obs_map`` (a YAML file) overrides it.
    ``inference``: optimise the policy first (:func:`~vlablocks.policy.inference.optimize_for_inference`)."""
    vla, directory = load_for_serving(checkpoint, device=device)
    observation_map = default_observation_map(trained_cameras(directory) or 1)
    if obs_map is not None:
        observation_map = load_observation_map(obs_map, base=observation_map)
    if inference is not None:
        optimize_for_inference(vla, inference)
    return PolicyServer(vla, observation_map, policy_name(directory), max_size=max_size)


def run_server(server: PolicyServer, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve until SIGTERM / SIGINT; ``announce("serving NAME on ws://HOST:PORT")`` once listening
    (the real port when ``port`` is 0). ValueError when the address cannot be bound."""

    def ready(bound_host: str, bound_port: int) -> None:
        announce(f"serving {server.name} on ws://{bound_host}:{bound_port}")
        sys.stdout.flush()  # scripts and tests read the line through a pipe

    try:
        asyncio.run(server.serve(host, port, ready=ready))
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535; got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535; got {value}")
    return value


def _mebibytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (MiB); got {text!r}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    inference = None
    if args.fuse or args.quantize != "none" or args.compile:
        inference = InferenceOptions(fuse=args.fuse, quantize=args.quantize, compile="step" if args.compile else "off")
    server = make_server(args.checkpoint, device=args.device, inference=inference, obs_map=args.obs_map,
                         max_size=args.max_size * 2**20)
    run_server(server, args.host, args.port, announce=lambda line: sys.stdout.write(line + "\n"))
    return 0


def add_serve_command(sub: Any) -> None:
    """``serve``, on the ``vlablocks`` subparsers ``sub``."""
    serve = sub.add_parser("serve", help="serve a policy over a websocket in openpi's protocol (openpi-client)")
    serve.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint, EMA weights)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_port, default=8000, help="port (0: a free one, printed)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile the prefix pass and the denoise step (the first request compiles them)")
    serve.add_argument("--fuse", action="store_true",
                       help="fused q/k/v and gate/up matmuls, grouped-matmul attention (same actions up to float rounding)")
    serve.add_argument("--quantize", choices=QUANTIZE, default="none",
                       help="int8: dynamic int8 linears on the CPU (action error in docs/benchmarks.md)")
    serve.add_argument("--obs-map", default=None, metavar="FILE.yaml",
                       help="request keys of the images, state, prompt and noise (default: openpi's LIBERO keys; "
                            "docs/deployment.md)")
    serve.add_argument("--max-size", type=_mebibytes, default=DEFAULT_MAX_SIZE // 2**20, metavar="MIB",
                       help="largest request in MiB (default 64); a larger one closes its connection")
    serve.set_defaults(fn=cmd_serve)
