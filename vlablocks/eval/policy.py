"""Chunk execution: a policy that predicts action chunks ``[1, H, A]`` run one action per step.

Four strategies, each a :class:`~vlablocks.eval.protocol.Policy` (``reset`` / ``select_action``)
with a simulated inference delay of ``delay = d`` control steps (``d = 0``: instantaneous):

- :class:`ChunkPolicy` (``sync``): execute ``k`` actions, then infer. The robot waits for the
  chunk; in simulation the environment does not step while it waits, so ``d`` changes nothing
  but the wait count (``log.waits``).
- :class:`AsyncChunkPolicy` (``async``): the next chunk is requested (from the current
  observation) once ``s = execute_steps`` actions of the current one executed; it arrives ``d``
  steps later, the old queue executing meanwhile; its first ``d`` actions (the time that passed)
  are dropped and the rest replaces the queue. Every chunk thus executes ``s`` actions, and with
  ``d = 0`` this is exactly ``sync`` with ``k = s``. Needs ``d <= s <= H - d``.
- :class:`RealTimeChunkPolicy` (``rtc``): ``async``, with the next chunk sampled by real-time
  chunking (:mod:`vlablocks.heads.rtc`) so that it continues the queued actions.
- :class:`TemporalEnsemblePolicy` (``ensemble``): ACT's temporal ensembling, a chunk every step.

Each records its episode in ``log`` (:class:`ExecutionLog`: executed actions, chunk boundaries,
waits), reset by ``reset()``; :func:`boundary_jerk` measures the jumps at the boundaries.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from vlablocks.policy.vla import VLA

#: ``batch -> actions [1, H, A]``, e.g. ``VLA.predict_action`` or :class:`vlablocks.eval.run.CheckpointPolicy`.
ChunkPredictor = Callable[[Mapping[str, Any]], torch.Tensor]


class GuidedChunkPredictor(Protocol):
    """``(batch, previous [1, P, A] | None, delay) -> actions [1, H, A]``: a chunk that continues
    ``previous`` (raw units; index 0 is the new chunk's first step, ``P <= H``), e.g.
    :class:`GuidedVLAPredictor`. ``previous=None``: a plain chunk."""

    def __call__(self, batch: Mapping[str, Any], previous: torch.Tensor | None, delay: int, /) -> torch.Tensor: ...


@dataclass
class ExecutionLog:
    """One episode of a chunk-executing policy.

    Attributes:
        actions: each executed action ``[A]``, one per ``select_action``.
        boundaries: per step, whether it was a chunk boundary: the first executed action of a
            new chunk (for ensembling: a step where a new prediction entered the average).
        chunks: chunks requested (model calls).
        waits: control steps the robot stood still waiting for a chunk (the environment does
            not step meanwhile in simulation; ``d`` per synchronous request).
    """

    actions: list[torch.Tensor] = field(default_factory=list)
    boundaries: list[bool] = field(default_factory=list)
    chunks: int = 0
    waits: int = 0

    def record(self, action: torch.Tensor, boundary: bool) -> None:
        self.actions.append(action)
        self.boundaries.append(boundary)


def boundary_jerk(actions: Any, boundaries: Any) -> tuple[float, float]:
    """Mean action jump ``||a_t - a_{t-1}||_2`` (L2 over the action dims) at chunk boundaries
    and within chunks: ``(boundary, within)``, NaN for a group with no step.

    Step ``t >= 1`` counts as a boundary when ``boundaries[t]`` (the first action of a new
    chunk: the jump from the old chunk's last executed action); step 0 has no predecessor.
    Shapes: ``actions [T, A]`` (array, tensor or list of ``[A]``), ``boundaries [T]`` bool.
    """
    jumps_at, jumps_within = action_jumps(actions, boundaries)
    mean = lambda x: float(x.mean()) if x.numel() else float("nan")
    return mean(jumps_at), mean(jumps_within)


def action_jumps(actions: Any, boundaries: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The jumps ``||a_t - a_{t-1}||_2`` of steps ``t >= 1``, split: ``(at boundaries, within
    chunks)`` (to pool episodes before averaging; see :func:`boundary_jerk`)."""
    if isinstance(actions, (list, tuple)):
        actions = torch.stack([torch.as_tensor(a) for a in actions]) if actions else torch.zeros(0, 0)
    actions = torch.as_tensor(actions, dtype=torch.float64)
    flags = torch.as_tensor(boundaries, dtype=torch.bool)
    if actions.ndim != 2 or flags.shape != actions.shape[:1]:
        raise ValueError(f"actions must be [T, A] and boundaries [T]; got {list(actions.shape)} and {list(flags.shape)}")
    jumps = (actions[1:] - actions[:-1]).norm(dim=-1)
    return jumps[flags[1:]], jumps[~flags[1:]]


@dataclass
class ChunkPolicy:
    """Executes the first ``execute_steps`` actions of each predicted chunk, then re-plans.

    :meth:`select_action` pops an action ``[A]`` off a queue; when the queue is empty it calls
    ``predict(batch)`` (under ``torch.no_grad``) for a chunk ``[1, H, A]`` and queues
    ``chunk[0, :execute_steps]``. ``horizon`` (``H``, when known) lets the constructor refuse an
    ``execute_steps`` the chunks cannot hold; every chunk is checked too. Picklable when
    ``predict`` is (rollout workers get a copy).

    The ``sync`` strategy: with an inference ``delay`` of ``d`` steps the robot waits for each
    chunk; the simulated environment does not step meanwhile, so the actions are the same for
    every ``d`` and only ``log.waits`` (``d`` per chunk) tells the delays apart.
    """

    predict: ChunkPredictor
    execute_steps: int = 8
    horizon: int | None = None
    delay: int = 0
    log: ExecutionLog = field(default_factory=ExecutionLog, init=False, repr=False)
    _queue: deque[torch.Tensor] = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_delay(self.delay)
        if not isinstance(self.execute_steps, int) or self.execute_steps < 1:
            raise ValueError(f"execute_steps must be an int >= 1; got {self.execute_steps!r}")
        if self.horizon is not None and self.execute_steps > self.horizon:
            raise ValueError(
                f"execute_steps={self.execute_steps} is more than the policy's chunk of horizon={self.horizon} "
                f"actions: use execute_steps <= {self.horizon}"
            )

    def reset(self) -> None:
        """Drop the queued actions and start a new :class:`ExecutionLog` (a new episode)."""
        self._queue.clear()
        self.log = ExecutionLog()

    def select_action(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The next action ``[A]``: from the queue, or the first of a new chunk predicted from ``batch``."""
        boundary = not self._queue
        if boundary:
            with torch.no_grad():
                chunk = self.predict(batch)
            self._queue.extend(_check_chunk(chunk, self.execute_steps)[0, : self.execute_steps])
            self.log.chunks += 1
            self.log.waits += self.delay
        action = self._queue.popleft()
        self.log.record(action, boundary)
        return action


def _check_delay(delay: Any) -> None:
    if not isinstance(delay, int) or delay < 0:
        raise ValueError(f"delay must be an int >= 0 (control steps); got {delay!r}")


def _check_chunk(chunk: Any, needed: int, what: str = "execute_steps") -> torch.Tensor:
    """``chunk`` if it is ``[1, H, A]`` with ``H >= needed``, else ValueError."""
    if not isinstance(chunk, torch.Tensor) or chunk.dim() != 3 or chunk.shape[0] != 1:
        got = list(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise ValueError(f"the policy must return actions [1, H, A]; got {got}")
    if chunk.shape[1] < needed:
        raise ValueError(
            f"{what}={needed} is more than the predicted chunk's H={chunk.shape[1]} actions: "
            f"use {what} <= {chunk.shape[1]}"
        )
    return chunk


@dataclass
class AsyncChunkPolicy:
    """The ``async`` strategy: the next chunk is computed while the current one executes.

    Once ``s = execute_steps`` actions of the current chunk have executed (the queue holds its
    last ``H - s``: the request threshold is ``H - s``), the next chunk is requested from the
    current observation. It arrives ``d = delay`` steps later, the queue executing meanwhile;
    its first ``d`` actions (the steps that passed) are dropped and the rest replaces the
    queue, so each chunk executes exactly ``s`` actions (indices ``d .. s + d - 1``), one every
    ``s`` steps. The first chunk of an episode has nothing to run meanwhile: the robot waits
    ``d`` steps for it (``log.waits``) and executes it from index 0. With ``d = 0`` this is
    :class:`ChunkPolicy` with ``execute_steps = s``, action for action. Needs
    ``d <= s <= H - d`` (checked against ``horizon`` when given, and every chunk).

    Simulation: the chunk is computed at the request (from that step's observation) and held
    back ``d`` steps, which is what a model taking ``d`` control periods would deliver.
    """

    predict: ChunkPredictor
    execute_steps: int = 8
    horizon: int | None = None
    delay: int = 0
    log: ExecutionLog = field(default_factory=ExecutionLog, init=False, repr=False)
    _queue: deque[torch.Tensor] = field(default_factory=deque, init=False, repr=False)
    _pending: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False)
    _step: int = field(default=0, init=False, repr=False)
    _chunk_length: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_delay(self.delay)
        if not isinstance(self.execute_steps, int) or self.execute_steps < max(1, self.delay):
            raise ValueError(f"execute_steps must be an int >= max(1, delay) = {max(1, self.delay)}; got "
                             f"execute_steps={self.execute_steps!r} with delay={self.delay}")
        if self.horizon is not None and self.execute_steps + self.delay > self.horizon:
            raise ValueError(
                f"execute_steps + delay = {self.execute_steps} + {self.delay} is more than the policy's chunk of "
                f"horizon={self.horizon} actions: the queue would run dry before the next chunk arrives"
            )

    def reset(self) -> None:
        """Drop the queue and any chunk in flight; start a new :class:`ExecutionLog`."""
        self._queue.clear()
        self._pending, self._step, self._chunk_length = None, 0, 0
        self.log = ExecutionLog()

    def select_action(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The next action ``[A]`` (see the class docstring for when chunks are requested and arrive)."""
        boundary = False
        if self._pending is not None and self._step >= self._pending[0]:
            boundary = self._switch(self._pending[1])
        if self._pending is None and (not self._queue or len(self._queue) <= self._chunk_length - self.execute_steps):
            first = not self._queue
            with torch.no_grad():
                chunk = self._request(batch)
            chunk = _check_chunk(chunk, self.execute_steps + self.delay, "execute_steps + delay")
            self._chunk_length = chunk.shape[1]
            self.log.chunks += 1
            if first:  # nothing to execute meanwhile: the robot waits, then starts at index 0
                self.log.waits += self.delay
                self._queue.extend(chunk[0])
                boundary = True
            elif self.delay == 0:
                boundary = self._switch(chunk)
            else:
                self._pending = (self._step + self.delay, chunk)
        action = self._queue.popleft()
        self.log.record(action, boundary)
        self._step += 1
        return action

    def _request(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.predict(batch)

    def _switch(self, chunk: torch.Tensor) -> bool:
        """The arrived ``chunk`` replaces the queue, less its first ``d`` actions (already past)."""
        self._queue.clear()
        self._queue.extend(chunk[0, self.delay :])
        self._pending = None
        return True


@dataclass
class RealTimeChunkPolicy(AsyncChunkPolicy):
    """The ``rtc`` strategy: :class:`AsyncChunkPolicy` whose next chunk continues the queue.

    ``predict(batch, previous, delay)`` (a :class:`GuidedChunkPredictor`, e.g.
    :class:`GuidedVLAPredictor`) gets the queued actions ``previous [1, H - s, A]`` at the
    request, the first ``d`` of which execute during the delay: real-time chunking guides the
    new chunk to reproduce them and to follow the rest of the queue with decaying weight, so
    the switch ``d`` steps later does not jump. The first chunk of an episode gets ``None``.
    """

    predict: GuidedChunkPredictor  # type: ignore[assignment]

    def _request(self, batch: Mapping[str, Any]) -> torch.Tensor:
        previous = torch.stack(list(self._queue))[None] if self._queue else None
        return self.predict(batch, previous, self.delay)


@dataclass
class TemporalEnsemblePolicy:
    """The ``ensemble`` strategy: ACT's temporal ensembling (Zhao et al. 2023).

    A chunk is predicted every step; the action of step ``n`` is the weighted mean of every
    arrived chunk's prediction for ``n``, with weights ``exp(-m * i)``, ``i = 0`` the oldest
    prediction (ACT's convention: ``m > 0`` favours older predictions and smooths; ``m < 0``
    favours newer ones). With a ``delay`` of ``d``, the chunk requested at step ``n`` arrives
    at ``n + d`` (the episode's first one: the robot waits ``d`` steps for it and uses it at
    step 0). A step where a new prediction enters the average is a boundary: every step with
    ``d = 0``; step 0 and every step after ``d`` otherwise. Needs ``d < H``.
    """

    predict: ChunkPredictor
    horizon: int | None = None
    delay: int = 0
    m: float = 0.01
    log: ExecutionLog = field(default_factory=ExecutionLog, init=False, repr=False)
    _chunks: list[tuple[int, int, torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _step: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_delay(self.delay)
        if self.horizon is not None and self.delay >= self.horizon:
            raise ValueError(f"delay={self.delay} must be less than horizon={self.horizon}: no prediction would "
                             "cover the steps")

    def reset(self) -> None:
        """Forget the predictions; start a new :class:`ExecutionLog`."""
        self._chunks.clear()
        self._step = 0
        self.log = ExecutionLog()

    def select_action(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The ensembled action ``[A]`` of this step (a new chunk is requested from ``batch``)."""
        n = self._step
        with torch.no_grad():
            chunk = _check_chunk(self.predict(batch), self.delay + 1, "delay + 1")
        arrival = n if not self._chunks else n + self.delay
        self.log.chunks += 1
        if not self._chunks:
            self.log.waits += self.delay
        self._chunks.append((n, arrival, chunk[0]))
        self._chunks = [(t, a, c) for t, a, c in self._chunks if n - t < c.shape[0]]  # oldest first
        ready = [c[n - t] for t, a, c in self._chunks if a <= n]
        if not ready:
            raise RuntimeError(f"no prediction covers step {n}: delay={self.delay} needs chunks longer than it")
        boundary = any(a == n for _, a, _ in self._chunks)
        weights = ensemble_weights(len(ready), self.m).to(ready[0].device)
        action = (torch.stack(ready).float() * weights[:, None]).sum(0).to(ready[0].dtype)
        self.log.record(action, boundary)
        self._step += 1
        return action


def ensemble_weights(count: int, m: float) -> torch.Tensor:
    """ACT's temporal-ensembling weights ``exp(-m i) / sum``, ``i = 0 .. count - 1`` from the
    oldest prediction to the newest: ``[count]`` float32, summing to 1."""
    weights = torch.exp(-m * torch.arange(count, dtype=torch.float64))
    return (weights / weights.sum()).float()


@dataclass
class GuidedVLAPredictor:
    """A :class:`GuidedChunkPredictor` over a :class:`~vlablocks.policy.vla.VLA`: real-time
    chunking through the VLA's public pieces (its ``predict_action`` with guidance).

    ``previous [1, P, A_data]`` (raw units, ``P <= H``, ``delay <= P``) is normalised (padded to
    the model's action width; the padding dims get no guidance), zero-padded to ``H`` steps and
    passed to :meth:`FlowMatchingHead.sample_guided
    <vlablocks.heads.flow_matching.FlowMatchingHead.sample_guided>` with the execution horizon
    ``s = H - P``. ``previous=None``: a plain chunk. Returns ``[1, H, A_data]`` raw actions.
    """

    vla: VLA
    beta: float = 5.0
    num_steps: int | None = None

    def __call__(
        self, batch: Mapping[str, Any], previous: torch.Tensor | None = None, delay: int = 0,
        noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        vla = self.vla
        if previous is None:
            return vla.predict_action(batch, noise=noise, num_steps=self.num_steps, generator=generator)
        vla.check_batch(batch, actions=False)
        with torch.no_grad():
            prefix, state = vla.encode(batch)
        horizon, normalizer = vla.head.horizon, vla.normalizer["action"]
        if previous.dim() != 3 or previous.shape[1] > horizon:
            raise ValueError(f"previous must be [B, P, A] with P <= H = {horizon}; got {list(previous.shape)}")
        target = normalizer.normalize(previous.to(prefix.embeds.device))
        target = torch.nn.functional.pad(target, (0, 0, 0, horizon - previous.shape[1]))
        dim_mask = torch.arange(vla.head.action_dim, device=target.device) < previous.shape[-1]
        with torch.no_grad():
            chunk = vla.head.sample_guided(
                prefix, state, target, delay=delay, execute=horizon - previous.shape[1], beta=self.beta,
                noise=noise, num_steps=self.num_steps, generator=generator, dim_mask=dim_mask,
            )
        actions = normalizer.unnormalize(chunk)
        vla.check_actions(actions)
        return actions


class RecordingPredictor:
    """A chunk predictor that keeps a copy of every chunk ``predict`` returns (e.g. to compare an
    evaluation through a policy server with one in process, chunk by chunk)."""

    def __init__(self, predict: ChunkPredictor) -> None:
        self.predict = predict
        self.chunks: list[torch.Tensor] = []

    def __call__(self, batch: Mapping[str, Any], *args: Any) -> torch.Tensor:
        chunk = self.predict(batch, *args)
        self.chunks.append(chunk.detach().clone())
        return chunk


#: The strategies by name (the benchmark's and any command line's choices).
STRATEGIES: dict[str, type] = {
    "sync": ChunkPolicy,
    "async": AsyncChunkPolicy,
    "rtc": RealTimeChunkPolicy,
    "ensemble": TemporalEnsemblePolicy,
}


def get_strategy(name: str) -> type:
    """The policy class of strategy ``name`` in :data:`STRATEGIES`."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown execution strategy {name!r}; valid names: {sorted(STRATEGIES)}")
    return STRATEGIES[name]
