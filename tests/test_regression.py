"""Outputs recorded by the code before the application-layer restructure (tests/data/make_reference.py,
run at commit 7df7761; the tiny_pi05 and tiny_smolvla outputs rewritten for issue 21 by tests/data/update_reference.py) are reproduced bitwise: the tiny recipes' loss and sampled chunks, and a
trainer checkpoint written then still loads, verifies and predicts the same actions."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlablocks.recipes import build, from_pretrained
from vlablocks.train.checkpoint import load_ema_policy

DATA = Path(__file__).parent / "data"
RECIPES = ("tiny_pi0", "tiny_pi05", "tiny_smolvla", "tiny_llava3d_deepfusion", "tiny_gr00t")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The reference ran on one thread (reductions split differently across threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def named_weights(model: torch.nn.Module) -> None:
    """The generator's weights: ``0.05 * N(0, 1)`` seeded by each parameter's name."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def batch_from(tensors: dict[str, torch.Tensor], prefix: str, tasks: list[str]) -> dict[str, object]:
    batch: dict[str, object] = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    batch["task"] = tasks
    return batch


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_outputs_unchanged(name: str) -> None:
    path = DATA / "reference_outputs.safetensors"
    ref = load_file(path)
    with safe_open(path, "pt") as handle:
        tasks = json.loads(handle.metadata()["tasks"])[name]["task"]
    vla = build(name).eval()
    named_weights(vla)
    batch = batch_from(ref, f"{name}.batch.", tasks)
    out = vla(batch, generator=torch.Generator().manual_seed(5), t=torch.tensor([0.3, 0.8]))
    assert torch.equal(out.loss, ref[f"{name}.loss"]), (out.loss.item(), ref[f"{name}.loss"].item())
    assert torch.equal(out.vel_cosine, ref[f"{name}.vel_cosine"])
    actions = vla.predict_action(batch, noise=ref[f"{name}.noise"])
    assert torch.equal(actions, ref[f"{name}.actions"]), (actions - ref[f"{name}.actions"]).abs().max()


def test_legacy_checkpoint_predicts_the_same_actions() -> None:
    ref = load_file(DATA / "legacy_actions.safetensors")
    tasks = json.loads((DATA / "legacy_tasks.json").read_text())
    batch = batch_from(ref, "batch.", tasks)
    raw = from_pretrained(DATA / "legacy_checkpoint").eval()
    assert torch.equal(raw.predict_action(batch, noise=ref["noise"]), ref["actions"])
    ema = load_ema_policy(DATA / "legacy_checkpoint").eval()
    assert torch.equal(ema.predict_action(batch, noise=ref["noise"]), ref["actions_ema"])
    assert not torch.equal(ref["actions"], ref["actions_ema"])  # the two weight sets really differ
