"""What closed-loop evaluation needs from an environment and from a policy.

An environment runs one task; episode ``i`` is a fixed, reproducible start (Meta-World: layout
``i``). The loop (:func:`vlablocks.eval.rollout.rollout`) is::

    observation = env.reset(episode)              # policy.reset() too
    while not done:
        action = policy.select_action(env.to_batch(observation))   # [A]
        observation, success, done = env.step(action)

``to_batch`` builds the policy batch of size 1 with the keys of :mod:`vlablocks.policy.batch`
(``images [1, N, 3, H, W]`` in [0, 1], ``task [instruction]``, ``state [1, S]``, ...);
``frame`` is the picture of an observation for people (videos), at any resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

#: an environment's observation: named arrays (what they hold is the environment's business).
Observation = Mapping[str, Any]


@runtime_checkable
class Env(Protocol):
    """One task of a simulator (or a robot) behind the evaluation loop; a context manager."""

    task: str  #: the task's name
    instruction: str  #: the language instruction given to the policy
    action_dim: int  #: ``A``: an action is ``[A]``
    fps: float  #: control steps per second (video speed)
    bucket: str | None  #: the task's difficulty bucket, or None

    def reset(self, episode: int, /) -> Observation:
        """Start episode ``episode`` (a fixed start: the same index gives the same episode)."""
        ...

    def step(self, action: np.ndarray, /) -> tuple[Observation, bool, bool]:
        """Apply ``action [A]`` -> ``(observation, success, done)``."""
        ...

    def to_batch(self, observation: Observation, /) -> dict[str, Any]:
        """The policy batch of size 1 seen from ``observation`` (keys of :mod:`vlablocks.policy.batch`)."""
        ...

    def frame(self, observation: Observation, /) -> np.ndarray:
        """A picture ``[H, W, 3]`` uint8 of ``observation`` for people (call it before the next step)."""
        ...

    def close(self) -> None:
        """Free the simulator and renderer."""
        ...

    def __enter__(self) -> Env: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class EnvFactory(Protocol):
    """Makes the environment of a task; picklable, since rollout workers get a copy."""

    #: the difficulty buckets in report order (empty if the tasks have none)
    buckets: tuple[str, ...]

    def __call__(self, task: str, /) -> Env:
        """A new environment of ``task`` (the caller closes it)."""
        ...

    def check(self, tasks: Sequence[str], episodes: int) -> None:
        """Raise ValueError, before anything runs, if ``tasks`` or ``episodes`` per task cannot be run."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able settings worth recording next to the results (e.g. the state layout)."""
        ...


@runtime_checkable
class Policy(Protocol):
    """A closed-loop policy: one action per observation batch (see :class:`vlablocks.eval.policy.ChunkPolicy`)."""

    def reset(self) -> None:
        """Forget the episode so far (called at each episode start)."""
        ...

    def select_action(self, batch: Mapping[str, Any], /) -> torch.Tensor | np.ndarray:
        """The action ``[A]`` to execute now."""
        ...
