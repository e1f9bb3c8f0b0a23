"""A Meta-World evaluation through `vlablocks serve` equals the in-process one for the same seeds:
the same action chunk at every step of every episode, so the same successes. The policy reads
depth and intrinsics (a geometry encoder, as the demo's), which travel in the request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlablocks.cli import main
from vlablocks.eval.policy import GuidedVLAPredictor, RecordingPredictor
from vlablocks.eval.run import evaluate_run
from vlablocks.policy.checks import random_batch
from vlablocks.serve import default_observation_map
from vlablocks.serve.client import RemotePredictor, ServerError
from vlablocks.serve.server import PolicyServer, load_for_serving, serving_in_background
from vlablocks.train.checkpoint import load_policy

TASK = "button-press-topdown-v3"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A geometry policy (tiny LLaVA-3D deep fusion: depth + intrinsics) after 2 steps on 1 demo."""
    root = tmp_path_factory.mktemp("serve_eval")
    assert main(["data", "metaworld", "--tasks", TASK, "--episodes", "1", "--image-size", "32", "--depth",
                 "--out", str(root / "data")]) == 0
    assert main(["train", "tiny_llava3d_deepfusion", "--data", str(root / "data"), "--out", str(root / "run"),
                 "--steps", "2", "vision.image_size=32", "train.batch_size=4", "train.ema_decay=null", "train.warmup_steps=0"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def served(run):
    """``(the run's policy in process, its checkpoint, the URL of a server of the same checkpoint)``."""
    policy, checkpoint = load_policy(run)
    vla, _ = load_for_serving(checkpoint)
    with serving_in_background(PolicyServer(vla, default_observation_map(1), "demo")) as url:
        yield policy.eval(), checkpoint, url


def test_evaluation_through_the_server_takes_the_in_process_actions(run, served):
    policy, _, url = served
    local = RecordingPredictor(policy.predict_action)
    expected = evaluate_run(run, [TASK], episodes=2, execute_steps=8, predictor=local)
    remote = RecordingPredictor(RemotePredictor(url))
    through = evaluate_run(run, [TASK], episodes=2, execute_steps=8, predictor=remote, predictor_name=url)
    assert through["per_task"] == expected["per_task"] and through["predictor"] == url
    assert len(remote.chunks) == len(local.chunks) > 10
    assert all(torch.equal(a, b) for a, b in zip(remote.chunks, local.chunks))
    metadata = remote.predict.metadata
    assert metadata["geometry"] is True and metadata["observation_map"]["depth"] == "observation/depth"


def test_real_time_chunking_behind_the_server(served):
    """A request with the queued actions and the delay is sampled with RTC on the server, as in process."""
    policy, _, url = served
    batch = random_batch(policy, 1)
    previous = torch.randn(1, 6, policy.normalizer["action"].width)
    remote = RemotePredictor(url)
    torch.manual_seed(5)
    guided = remote(batch, previous=previous, delay=2)
    torch.manual_seed(5)
    assert torch.equal(guided, GuidedVLAPredictor(policy)(batch, previous=previous, delay=2))
    torch.manual_seed(5)
    assert not torch.equal(guided, remote(batch))  # the guidance changed the chunk
    with pytest.raises(ServerError, match=r"inference_delay'\]: expected an int delay in \[0, 6\]"):
        remote(batch, previous=previous, delay=7)


def test_eval_command_runs_a_strategy_under_a_delay(run, capsys):
    assert main(["eval", str(run), "--tasks", TASK, "--episodes", "1", "--execute-steps", "8",
                 "--strategy", "rtc", "--delay", "2"]) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert (results["strategy"], results["delay"], results["predictor"]) == ("rtc", 2, "in-process")
    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", TASK, "--episodes", "1", "--execute-steps", "8",
                 "--strategy", "async", "--delay", "9"]) == 1  # the queue would run dry before a chunk arrives
    assert "execute_steps must be an int >= max(1, delay) = 9" in capsys.readouterr().err
