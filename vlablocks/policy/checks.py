"""Random inputs shaped for a policy, and the ``vlablocks check`` smoke run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from vlablocks.policy import batch as keys
from vlablocks.policy.vla import VLA

TASKS = ("pick up the red block", "open the drawer", "push the button", "close the window")


def random_batch(vla: VLA, batch_size: int = 2, num_cameras: int = 1, seed: int = 0) -> dict[str, Any]:
    """A batch with every key ``vla`` reads, random but well-formed (depth of a plane at ~1 m); state
    and actions as wide as the data the normalisers were given (the model's widths before that)."""
    gen = torch.Generator().manual_seed(seed)
    config = vla.config
    batch: dict[str, Any] = {keys.TASK: [TASKS[i % len(TASKS)] for i in range(batch_size)]}
    if vla.vision is not None:
        size = vla.vision.image_size
        batch[keys.IMAGES] = torch.rand(batch_size, num_cameras, 3, size, size, generator=gen)
        if vla.geometry is not None:
            batch[keys.DEPTH] = 1.0 + 0.1 * torch.rand(batch_size, num_cameras, size, size, generator=gen)
            intrinsics = torch.tensor([[size, 0.0, size / 2], [0.0, size, size / 2], [0.0, 0.0, 1.0]])
            batch[keys.INTRINSICS] = intrinsics.expand(batch_size, num_cameras, 3, 3).clone()
    if config.state_dim is not None:
        batch[keys.STATE] = torch.randn(batch_size, vla.normalizer["state"].width, generator=gen)
    batch[keys.ACTIONS] = torch.randn(batch_size, config.horizon, vla.normalizer["action"].width, generator=gen)
    return batch


@dataclass(frozen=True)
class CheckReport:
    """What ``vlablocks check`` measured."""

    loss: float
    vel_cosine: float
    action_shape: tuple[int, ...]
    prefix_length: int
    forward_ms: float
    backward_ms: float
    predict_ms: float
    parameters_without_grad: tuple[str, ...]


def smoke_check(vla: VLA, batch_size: int = 2, seed: int = 0) -> CheckReport:
    """One loss + backward + predict_action on random inputs, timed; finite results required."""
    batch = random_batch(vla, batch_size, seed=seed)
    vla.train()
    start = time.perf_counter()
    out = vla(batch, generator=torch.Generator().manual_seed(seed))
    forward_ms = 1000 * (time.perf_counter() - start)
    start = time.perf_counter()
    out.loss.backward()
    backward_ms = 1000 * (time.perf_counter() - start)
    if not torch.isfinite(out.loss):
        raise FloatingPointError(f"the loss is not finite: {out.loss.item()}")
    no_grad = tuple(n for n, p in vla.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum()))
    vla.zero_grad(set_to_none=True)
    vla.eval()
    start = time.perf_counter()
    actions = vla.predict_action(batch, generator=torch.Generator().manual_seed(seed))
    predict_ms = 1000 * (time.perf_counter() - start)
    if not torch.isfinite(actions).all():
        raise FloatingPointError("predict_action returned non-finite actions")
    return CheckReport(
        loss=out.loss.item(),
        vel_cosine=out.vel_cosine.item(),
        action_shape=tuple(actions.shape),
        prefix_length=vla.encode(batch).prefix.embeds.shape[1],
        forward_ms=forward_ms,
        backward_ms=backward_ms,
        predict_ms=predict_ms,
        parameters_without_grad=no_grad,
    )
