"""Action execution strategies (sync, async, real-time chunking, temporal ensembling) with a
simulated inference delay, the RTC math of ``vlablocks.heads.rtc`` and the jerk metric."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import pytest
import torch
from test_eval import GoalChunks, PointEnv
from vlablocks.heads.rtc import guidance_weight, soft_mask
from vlablocks.recipes.builder import build

from vlablocks.eval.policy import (
    STRATEGIES,
    AsyncChunkPolicy,
    ChunkPolicy,
    GuidedVLAPredictor,
    RealTimeChunkPolicy,
    TemporalEnsemblePolicy,
    boundary_jerk,
    ensemble_weights,
    get_strategy,
)
from vlablocks.eval.protocol import Policy
from vlablocks.eval.rollout import rollout
from vlablocks.policy.checks import random_batch


class Stamped:
    """Chunks whose action ``j`` is ``[request step, j]`` (the step read from ``batch['step']``);
    as a guided predictor it also records the ``previous`` chunks and delays it was given."""

    def __init__(self, horizon: int = 8) -> None:
        self.horizon, self.previous = horizon, []

    def __call__(self, batch: dict[str, Any], previous: torch.Tensor | None = None, delay: int = 0) -> torch.Tensor:
        if previous is not None or delay:
            self.previous.append((batch["step"], None if previous is None else previous.clone(), delay))
        step = torch.full((self.horizon,), float(batch["step"]))
        return torch.stack([step, torch.arange(self.horizon).float()], dim=-1)[None]


def run(policy: Policy, steps: int) -> torch.Tensor:
    """``steps`` actions of ``policy`` fed ``{"step": n}``: ``[steps, A]``."""
    policy.reset()
    return torch.stack([policy.select_action({"step": n}) for n in range(steps)])


# ----------------------------------------------------------------------------- sync and async


def test_sync_is_chunk_policy_and_its_delay_only_counts_waits():
    assert get_strategy("sync") is ChunkPolicy and set(STRATEGIES) == {"sync", "async", "rtc", "ensemble"}
    with pytest.raises(ValueError, match="unknown execution strategy 'fast'.*'async'"):
        get_strategy("fast")
    quick, slow = ChunkPolicy(Stamped(), execute_steps=3), ChunkPolicy(Stamped(), execute_steps=3, delay=4)
    actions = run(quick, 10)
    assert torch.equal(actions, run(slow, 10))
    expected = torch.tensor([[3.0 * (n // 3), n % 3] for n in range(10)])
    assert torch.equal(actions, expected)  # execute 3, re-plan from the current observation
    assert slow.log.boundaries == [n % 3 == 0 for n in range(10)]
    assert (slow.log.chunks, slow.log.waits, quick.log.waits) == (4, 16, 0)
    assert len(slow.log.actions) == 10
    slow.reset()
    assert slow.log.actions == [] and slow.log.waits == 0


@pytest.mark.parametrize("execute", [1, 3, 8])
def test_async_without_delay_is_sync_action_for_action(execute):
    sync = run(ChunkPolicy(Stamped(), execute_steps=execute), 25)
    policy = AsyncChunkPolicy(Stamped(), execute_steps=execute, horizon=8)
    assert torch.equal(run(policy, 25), sync)
    assert policy.log.boundaries == [n % execute == 0 for n in range(25)]


@pytest.mark.parametrize(("execute", "delay"), [(4, 2), (4, 4), (5, 3), (3, 1)])
def test_the_delay_really_delays(execute, delay):
    policy = AsyncChunkPolicy(Stamped(horizon=8), execute_steps=execute, delay=delay)
    actions = run(policy, 30)
    stamp, index = actions[:, 0], actions[:, 1]
    steps = torch.arange(30.0)
    assert torch.equal(stamp + index, steps)  # every action runs at the step it was planned for
    later = stamp > 0
    assert (stamp[later] <= steps[later] - delay).all()  # a chunk is used d steps after its request at the earliest
    boundaries = [0] + [execute + delay + k * execute for k in range(10) if execute + delay + k * execute < 30]
    assert [n for n, b in enumerate(policy.log.boundaries) if b] == boundaries
    assert torch.equal(stamp[boundaries[1:]], torch.tensor(boundaries[1:]) - delay)
    assert torch.equal(index[boundaries[1:]], torch.full((len(boundaries) - 1,), float(delay)))  # first d dropped
    assert policy.log.waits == delay  # only the first chunk is waited for


def test_async_checks_its_settings():
    with pytest.raises(ValueError, match=r"execute_steps \+ delay = 6 \+ 4 is more than.*horizon=8"):
        AsyncChunkPolicy(Stamped(), execute_steps=6, horizon=8, delay=4)
    with pytest.raises(ValueError, match=r"execute_steps must be an int >= max\(1, delay\) = 3"):
        AsyncChunkPolicy(Stamped(), execute_steps=2, delay=3)
    with pytest.raises(ValueError, match="delay must be an int >= 0"):
        ChunkPolicy(Stamped(), delay=-1)
    with pytest.raises(ValueError, match=r"execute_steps \+ delay=10 is more than the predicted chunk's H=8"):
        AsyncChunkPolicy(Stamped(horizon=8), execute_steps=6, delay=4).select_action({"step": 0})


def test_rtc_passes_the_queue_that_will_execute_as_the_previous_chunk():
    predictor = Stamped(horizon=8)
    policy = RealTimeChunkPolicy(predictor, execute_steps=3, delay=2, horizon=8)
    actions = run(policy, 12)
    assert torch.equal(actions, run(AsyncChunkPolicy(Stamped(horizon=8), execute_steps=3, delay=2), 12))
    assert predictor.previous[0][1] is None  # the first chunk of an episode: nothing to continue
    requests = [(step, prev) for step, prev, delay in predictor.previous if prev is not None]
    assert [step for step, _ in requests] == [3, 6, 9]
    for step, previous in requests:  # the H - s queued actions, the first d of which run during the delay
        assert previous.shape == (1, 8 - 3, 2)
        assert torch.equal(previous[0, :2], actions[step : step + 2])
    assert all(delay == 2 for _, _, delay in predictor.previous)


# ----------------------------------------------------------------------------- temporal ensembling


def test_ensemble_weights_follow_act():
    weights = ensemble_weights(3, 0.01)
    expected = torch.exp(-0.01 * torch.arange(3.0, dtype=torch.float64))
    torch.testing.assert_close(weights, (expected / expected.sum()).float())
    assert weights[0] > weights[1] > weights[2]  # i = 0 the oldest prediction
    assert torch.equal(ensemble_weights(4, 0.0), torch.full((4,), 0.25))


@pytest.mark.parametrize("delay", [0, 2])
def test_ensemble_averages_every_arrived_prediction_for_the_step(delay):
    horizon, m = 4, 0.5
    policy = TemporalEnsemblePolicy(Stamped(horizon), horizon=horizon, delay=delay, m=m)
    actions = run(policy, 9)
    for n in range(9):
        stamps = [t for t in range(n + 1) if n - t < horizon and (t == 0 or t + delay <= n)]
        w = ensemble_weights(len(stamps), m)
        expected = sum(wi * torch.tensor([t, n - t], dtype=torch.float32) for wi, t in zip(w, stamps))
        torch.testing.assert_close(actions[n], expected)
        assert (actions[n, 0] + actions[n, 1]).item() == pytest.approx(n)  # each prediction is for step n
    assert policy.log.boundaries == [n == 0 or n > delay or delay == 0 for n in range(9)]
    assert (policy.log.chunks, policy.log.waits) == (9, delay)
    with pytest.raises(ValueError, match="delay=4 must be less than horizon=4"):
        TemporalEnsemblePolicy(Stamped(4), horizon=4, delay=4)


def test_every_strategy_runs_in_a_rollout():
    factories = {
        "sync": lambda: ChunkPolicy(GoalChunks(horizon=6), execute_steps=3, delay=2),
        "async": lambda: AsyncChunkPolicy(GoalChunks(horizon=6), execute_steps=3, delay=2),
        "rtc": lambda: RealTimeChunkPolicy(lambda batch, previous, delay: GoalChunks(horizon=6)(batch), 3, delay=2),
        "ensemble": lambda: TemporalEnsemblePolicy(GoalChunks(horizon=6), delay=2),
    }
    with PointEnv("near") as env:
        for name, make in factories.items():
            policy = make()
            assert isinstance(policy, Policy), name
            episode = rollout(env, policy, 0)  # (stale constant-step plans may overshoot: no success asserted)
            assert len(policy.log.actions) == len(policy.log.boundaries) == episode.length


# ----------------------------------------------------------------------------- jerk


def test_boundary_jerk_on_a_hand_made_sequence():
    actions = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [3.0, 5.0], [0.0, 1.0]])
    boundaries = [True, False, True, False, True]
    # jumps of steps 1..4: 5 (within), 0 (boundary), 1 (within), 5 (boundary)
    assert boundary_jerk(actions, boundaries) == (2.5, 3.0)
    assert boundary_jerk(list(actions.numpy()), boundaries) == (2.5, 3.0)
    at, within = boundary_jerk(actions[:2], [True, False])
    assert math.isnan(at) and within == 5.0
    with pytest.raises(ValueError, match="boundaries"):
        boundary_jerk(actions, [True])


# ----------------------------------------------------------------------------- RTC math


def test_soft_mask_cell_by_cell():
    horizon, delay, execute = 8, 2, 3
    mask = soft_mask(horizon, delay, execute)
    end = horizon - execute
    expected = []
    for i in range(horizon):
        c = (end - i) / (end - delay + 1)
        expected.append(1.0 if i < delay else c * (math.exp(c) - 1) / (math.e - 1) if i < end else 0.0)
    assert mask.dtype == torch.float32 and mask.shape == (horizon,)
    for i in range(horizon):
        assert mask[i].item() == pytest.approx(expected[i], abs=1e-7), i
    assert torch.equal(mask[:delay], torch.ones(delay)) and torch.equal(mask[end:], torch.zeros(execute))
    decaying = mask[delay:end]
    assert (decaying > 0).all() and (decaying < 1).all() and (decaying[1:] < decaying[:-1]).all()
    assert torch.equal(soft_mask(4, 0, 4), torch.zeros(4)) and torch.equal(soft_mask(4, 4, 0), torch.ones(4))
    with pytest.raises(ValueError, match="delay <= horizon - execute.*delay=3, execute=6"):
        soft_mask(8, 3, 6)


def test_guidance_weight_is_the_papers_in_our_time():
    t = torch.tensor([1.0, 0.75, 0.5, 0.1, 0.0])
    tau = 1 - t.double()
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    paper = torch.minimum(torch.tensor(5.0, dtype=torch.float64), (1 - tau) / (tau * r2))  # inf at tau = 0 -> beta
    paper[-1] = 5.0  # tau = 1: (1 - tau) / (tau r^2) -> inf as well (0 / 0 in floats)
    torch.testing.assert_close(guidance_weight(t, 5.0), paper.float())
    assert guidance_weight(torch.tensor([0.5]), 100.0).item() == pytest.approx(2.0)
    assert torch.equal(guidance_weight(t, 0.0), torch.zeros(5))
    with pytest.raises(ValueError, match="beta must be >= 0"):
        guidance_weight(t, -1.0)


@pytest.fixture(scope="module")
def pi0():
    torch.manual_seed(0)
    return build("tiny_pi0", ["policy.horizon=8"]).eval()


def test_rtc_with_beta_zero_is_plain_sampling(pi0):
    torch.manual_seed(1)
    batch = random_batch(pi0, batch_size=1)
    noise = torch.randn(1, 8, pi0.config.action_dim)
    previous = torch.randn(1, 6, pi0.normalizer["action"].width)
    with torch.no_grad():
        plain = pi0.predict_action(batch, noise=noise)
        guided = GuidedVLAPredictor(pi0, beta=0.0)(batch, previous, 2, noise=noise)
        prefix, state = pi0.encode(batch)
        head_plain = pi0.head.sample(prefix, state, noise=noise)
        head_guided = pi0.head.sample_guided(prefix, state, torch.randn_like(noise), delay=2, execute=3, beta=0.0, noise=noise)
    torch.testing.assert_close(guided, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(head_guided, head_plain, rtol=0, atol=1e-6)


def test_rtc_guidance_makes_the_new_chunk_continue_the_previous_one(pi0):
    torch.manual_seed(2)
    batch = random_batch(pi0, batch_size=1)
    width, delay = pi0.normalizer["action"].width, 3
    previous = pi0.predict_action(batch, noise=torch.randn(1, 8, pi0.config.action_dim))[:, 2:]  # s = 2 executed
    noise = torch.randn(1, 8, pi0.config.action_dim)
    unguided = pi0.predict_action(batch, noise=noise)
    guided = GuidedVLAPredictor(pi0, beta=5.0)(batch, previous, delay, noise=noise)
    assert guided.shape == (1, 8, width)
    error = lambda chunk: (chunk[0, :delay] - previous[0, :delay]).abs().max().item()
    assert error(guided) < 0.1 * error(unguided), (error(guided), error(unguided))
    overlap = lambda chunk: (chunk[0, delay:6] - previous[0, delay:6]).abs().mean().item()
    assert overlap(guided) < overlap(unguided)


def test_rtc_refuses_inference_mode_and_bad_previous_chunks(pi0):
    batch = random_batch(pi0, batch_size=1)
    prefix, state = pi0.encode(batch)
    previous = torch.zeros(1, 8, pi0.config.action_dim)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not torch.inference_mode"):
        pi0.head.sample_guided(prefix, state, previous, delay=1, execute=2)
    with pytest.raises(ValueError, match=r"previous must have shape \[B, H, A\]"):
        pi0.head.sample_guided(prefix, state, previous[:, :4], delay=1, execute=2)
    with pytest.raises(ValueError, match="previous must be"):
        GuidedVLAPredictor(pi0)(batch, torch.zeros(1, 9, pi0.normalizer["action"].width), 1)


def test_a_rtc_policy_over_a_vla_runs():
    queue: deque[int] = deque()
    torch.manual_seed(0)
    vla = build("tiny_pi0", ["policy.horizon=8"]).eval()
    policy = RealTimeChunkPolicy(GuidedVLAPredictor(vla, num_steps=2), execute_steps=4, delay=2, horizon=8)
    batch = random_batch(vla, batch_size=1)
    for _ in range(9):
        queue.append(policy.select_action(batch).shape[0])
    assert set(queue) == {vla.normalizer["action"].width} and policy.log.chunks == 3
