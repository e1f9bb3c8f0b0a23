"""Pre-emption: :class:`StopSignal` turns SIGTERM into "stop after this step" (the trainer then
writes a checkpoint and returns, and ``resume`` continues without losing a step)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)


class StopSignal:
    """Turns SIGTERM into a request to stop after the current step (while entered).

    A second SIGTERM goes to the previous handler (by default: terminate now; the checkpoint
    writes are atomic, so the last complete checkpoint survives). Outside the main thread no
    handler can be installed and ``requested`` stays False.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, self._previous)
        logger.warning("SIGTERM: stopping after this step and writing a checkpoint (send it again to stop now)")

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGTERM, self._previous)


def any_process_stopping(accelerator: Accelerator, requested: bool) -> bool:
    """Whether any process was asked to stop (every process must stop at the same step)."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor([float(requested)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
