"""Episode jobs in worker processes, with results in job order whatever the number of workers.

A job is a picklable object (a dataclass: its fields name what it needs) whose ``run()``
yields one result per episode. :func:`run_jobs` runs a list of them in this process or in
``workers`` spawned processes and yields each job's results in job order; a tqdm bar advances
once per finished episode (workers report through a managed queue passed to each job).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

R_co = TypeVar("R_co", covariant=True)


class Job(Protocol[R_co]):
    """Episodes of one task (or any unit of work): ``run()`` yields one result per episode."""

    def run(self) -> Iterator[R_co]: ...


def split_episodes(tasks: Sequence[str], episodes: int, workers: int) -> list[tuple[str, range]]:
    """``(task, episodes)`` parts: each task's episodes ``0 .. episodes - 1`` in ``min(workers, episodes)``
    contiguous ranges, task by task (so that every worker has work even for one task)."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1; got {workers!r}")
    parts = min(workers, episodes)
    bounds = [round(i * episodes / parts) for i in range(parts + 1)]
    return [(task, range(lo, hi)) for task in tasks for lo, hi in itertools.pairwise(bounds)]


def run_jobs(jobs: Sequence[Job[Any]], workers: int, bar: tqdm | None = None) -> Iterator[list[Any]]:
    """``list(job.run())`` for each of ``jobs``, yielded in job order; ``bar`` advances per episode.

    With ``workers > 1`` the jobs run in that many spawned processes (each with
    ``cpu_count // workers`` torch threads); jobs and results must then be picklable.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1; got {workers!r}")
    if workers == 1:
        for job in jobs:
            yield _collect(job, None, bar)
        return
    context = multiprocessing.get_context("spawn")  # a forked GL / OpenMP state is not safe
    threads = max(1, (os.cpu_count() or 1) // workers)
    with context.Manager() as manager, ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        progress = manager.Queue()
        futures: list[Future] = [pool.submit(_collect, job, progress) for job in jobs]
        for future in futures:
            while not future.done():
                _drain(progress, bar, timeout=0.2, once=True)
            yield future.result()
        _drain(progress, bar, timeout=0.05, once=False)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _collect(job: Job[Any], progress: Any, bar: tqdm | None = None) -> list[Any]:
    """A job's results; each episode is counted on ``progress`` (a queue, in a worker) or ``bar``."""
    results = []
    for result in job.run():
        results.append(result)
        if progress is not None:
            progress.put(1)
        if bar is not None:
            bar.update(1)
    return results


def _drain(progress: Any, bar: tqdm | None, timeout: float, once: bool) -> None:
    """Move episode counts from the worker queue onto ``bar``: one wait, or until the queue is empty."""
    while True:
        try:
            count = progress.get(timeout=timeout)
        except queue.Empty:
            return
        if bar is not None:
            bar.update(count)
        if once:
            return
