"""Load test of ``vlablocks serve``: latency and throughput for 1, 4 and 16 concurrent clients.

    python benchmarks/serve_load.py                           # tiny_pi0 (random weights) on CPU
    python benchmarks/serve_load.py --checkpoint DIR --device cuda --requests 50

The server runs as its own process (``python -m vlablocks.cli serve CKPT --port 0``) on the
loopback interface; each client is a thread with its own connection (openpi's
``WebsocketClientPolicy`` when ``openpi-client`` is installed, else a websockets client speaking
the same messages) sending ``--requests`` observations of the shape the metadata announces, one
after the other. Latency is the client's round trip; requests/s counts every request of a round
over its wall time. Inference is serialised (one policy, one lock), so requests/s stays near
1 / inference time and latency grows with the clients: the figures show queueing, not batching.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from websockets.sync.client import connect

from vlablocks.recipes.builder import build
from vlablocks.serve import wire


class RawClient:
    """``WebsocketClientPolicy``'s protocol over a plain websockets connection (no openpi-client)."""

    def __init__(self, host: str, port: int) -> None:
        self._ws = connect(f"ws://{host}:{port}", compression=None, max_size=None)
        self.metadata = wire.unpackb(self._ws.recv())

    def get_server_metadata(self) -> dict:
        return self.metadata

    def infer(self, obs: dict) -> dict:
        self._ws.send(wire.packb(obs))
        reply = self._ws.recv()
        if isinstance(reply, str):
            raise RuntimeError(reply)
        return wire.unpackb(reply)


def make_client(port: int):
    try:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy
    except ImportError:
        return RawClient("127.0.0.1", port)
    return WebsocketClientPolicy("127.0.0.1", port)


def tiny_checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    return build("tiny_pi0").save_pretrained(directory / "tiny_pi0")


def observation(meta: dict, seed: int) -> dict:
    """A request with the keys and shapes the server's metadata announces."""
    rng = np.random.default_rng(seed)
    obs_map, size = meta["observation_map"], meta["image_size"] or 0
    obs = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in obs_map["images"][: meta["num_cameras"]]}
    if meta["state_dim"] and obs_map["state"]:
        obs[obs_map["state"]] = rng.standard_normal(meta["state_dim"]).astype(np.float32)
    obs[obs_map["prompt"]] = "pick up the red block"
    return obs


def run_round(port: int, clients: int, requests: int) -> tuple[list[float], float]:
    """``clients`` threads x ``requests`` round trips: the latencies (ms) and the wall time (s)."""
    latencies: list[float] = []
    connections = [make_client(port) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def work(client, index: int) -> None:
        obs = observation(client.get_server_metadata(), index)
        barrier.wait()
        for _ in range(requests):
            start = time.perf_counter()
            client.infer(obs)
            latencies.append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(connections)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start


def start_server(checkpoint: Path, device: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "vlablocks.cli", "serve", str(checkpoint), "--port", "0",
                             "--device", device], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a checkpoint or run directory (default: tiny_pi0, random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=20, help="requests per client per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests first (one client)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(Path(tmp))
        proc, port = start_server(checkpoint, args.device)
        try:
            run_round(port, 1, args.warmup)
            print(f"{'clients':>7s} {'requests':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>7s}")
            for clients in (int(c) for c in args.clients.split(",")):
                latencies, wall = run_round(port, clients, args.requests)
                p50, p99 = np.percentile(latencies, [50, 99])
                print(f"{clients:7d} {len(latencies):8d} {p50:8.1f} {p99:8.1f} {len(latencies) / wall:7.1f}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
    print(f"server exited with {code} after SIGTERM")


if __name__ == "__main__":
    main()
