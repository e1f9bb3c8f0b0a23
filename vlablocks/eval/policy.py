"""Chunk execution: a policy that predicts action chunks ``[1, H, A]`` run one action per step."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: ``batch -> actions [1, H, A]``, e.g. ``VLA.predict_action`` or :class:`vlablocks.eval.run.CheckpointPolicy`.
ChunkPredictor = Callable[[Mapping[str, Any]], torch.Tensor]


@dataclass
class ChunkPolicy:
    """Executes the first ``execute_steps`` actions of each predicted chunk, then re-plans.

    :meth:`select_action` pops an action ``[A]`` off a queue; when the queue is empty it calls
    ``predict(batch)`` (under ``torch.no_grad``) for a chunk ``[1, H, A]`` and queues
    ``chunk[0, :execute_steps]``. ``horizon`` (``H``, when known) lets the constructor refuse an
    ``execute_steps`` the chunks cannot hold; every chunk is checked too. Picklable when
    ``predict`` is (rollout workers get a copy).
    """

    predict: ChunkPredictor
    execute_steps: int = 8
    horizon: int | None = None
    _queue: deque[torch.Tensor] = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.execute_steps, int) or self.execute_steps < 1:
            raise ValueError(f"execute_steps must be an int >= 1; got {self.execute_steps!r}")
        if self.horizon is not None and self.execute_steps > self.horizon:
            raise ValueError(
                f"execute_steps={self.execute_steps} is more than the policy's chunk of horizon={self.horizon} "
                f"actions: use execute_steps <= {self.horizon}"
            )

    def reset(self) -> None:
        """Drop the queued actions (a new episode)."""
        self._queue.clear()

    def select_action(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The next action ``[A]``: from the queue, or the first of a new chunk predicted from ``batch``."""
        if not self._queue:
            with torch.no_grad():
                chunk = self.predict(batch)
            self._queue.extend(self._check_chunk(chunk)[0, : self.execute_steps])
        return self._queue.popleft()

    def _check_chunk(self, chunk: Any) -> torch.Tensor:
        if not isinstance(chunk, torch.Tensor) or chunk.dim() != 3 or chunk.shape[0] != 1:
            got = list(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise ValueError(f"the policy must return actions [1, H, A]; got {got}")
        if chunk.shape[1] < self.execute_steps:
            raise ValueError(
                f"execute_steps={self.execute_steps} is more than the predicted chunk's H={chunk.shape[1]} actions: "
                f"use execute_steps <= {chunk.shape[1]}"
            )
        return chunk
