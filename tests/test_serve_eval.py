"""A Meta-World evaluation through `vlablocks serve` equals the in-process one for the same seeds:
the same action chunk at every step of every episode, so the same successes. The policy reads
depth and intrinsics (a geometry encoder, as the demo's), which travel in the request."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from vlablocks.cli import main
from vlablocks.eval.run import evaluate_run
from vlablocks.serve import default_observation_map
from vlablocks.serve.client import RemotePredictor
from vlablocks.serve.server import PolicyServer, load_for_serving

TASK = "button-press-topdown-v3"


class Recorder:
    """A chunk predictor that keeps every chunk it returns."""

    def __init__(self, predict) -> None:
        self.predict, self.chunks = predict, []

    def __call__(self, batch):
        chunk = self.predict(batch)
        self.chunks.append(chunk.clone())
        return chunk


def serve_in_thread(checkpoint: Path) -> tuple[str, asyncio.Event, threading.Thread, asyncio.AbstractEventLoop]:
    """A server on a free loopback port in a background thread (same process: same torch settings)."""
    vla, _ = load_for_serving(checkpoint)
    server = PolicyServer(vla, default_observation_map(1), "demo")
    ready, holder = threading.Event(), {}

    async def main_loop() -> None:
        holder["stop"], holder["loop"] = asyncio.Event(), asyncio.get_running_loop()
        await server.serve("127.0.0.1", 0, ready=lambda host, port: (holder.update(port=port), ready.set()),
                           stop=holder["stop"], handle_signals=False)

    thread = threading.Thread(target=asyncio.run, args=(main_loop(),), daemon=True)
    thread.start()
    assert ready.wait(60), "the server did not start"
    return f"ws://127.0.0.1:{holder['port']}", holder["stop"], thread, holder["loop"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A geometry policy (tiny LLaVA-3D deep fusion: depth + intrinsics) after 2 steps on 1 demo."""
    root = tmp_path_factory.mktemp("serve_eval")
    assert main(["data", "metaworld", "--tasks", TASK, "--episodes", "1", "--image-size", "32", "--depth",
                 "--out", str(root / "data")]) == 0
    assert main(["train", "tiny_llava3d_deepfusion", "--data", str(root / "data"), "--out", str(root / "run"),
                 "--steps", "2", "vision.image_size=32", "train.batch_size=4", "train.ema_decay=null", "train.warmup_steps=0"]) == 0
    return root / "run"


def test_evaluation_through_the_server_takes_the_in_process_actions(run):
    from vlablocks.train.checkpoint import load_policy

    policy, checkpoint = load_policy(run)
    local = Recorder(policy.predict_action)
    expected = evaluate_run(run, [TASK], episodes=2, execute_steps=8, predictor=local)
    url, stop, thread, loop = serve_in_thread(checkpoint)
    try:
        remote = Recorder(RemotePredictor(url))
        through = evaluate_run(run, [TASK], episodes=2, execute_steps=8, predictor=remote, predictor_name=url)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
    assert through["per_task"] == expected["per_task"] and through["predictor"] == url
    assert len(remote.chunks) == len(local.chunks) > 10
    assert all(torch.equal(a, b) for a, b in zip(remote.chunks, local.chunks))
    metadata = remote.predict.metadata
    assert metadata["geometry"] is True and metadata["observation_map"]["depth"] == "observation/depth"
