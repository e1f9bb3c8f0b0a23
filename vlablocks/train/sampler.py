"""The data order and the random streams of a run: :class:`ShardedEpochSampler` (one process's
micro-batches of a seeded per-epoch permutation, resumable mid-epoch) and :func:`derive_seed`
(independent, well-mixed seeds for the streams of one run seed)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

#: stream keys of :func:`derive_seed`: the flow-matching noise (per global micro-batch), the
#: epoch permutations (per epoch) and the DataLoader generator (worker seeds).
NOISE_STREAM, EPOCH_STREAM, LOADER_STREAM = 1, 2, 3


class ShardedEpochSampler(Sampler[list[int]]):
    """One process's micro-batches of a seeded per-epoch permutation, resumable mid-epoch.

    Epoch ``e`` permutes the dataset with a generator seeded by ``(seed, e)`` and cuts it into
    global micro-batches of ``batch_size`` (the incomplete tail, and micro-batches that would
    leave the processes unequal, are dropped); process ``rank`` takes ``j = c * num_replicas +
    rank`` for ``c = start, start + 1, ...``.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.batches_per_epoch = num_samples // (batch_size * num_replicas)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global micro-batch "
                f"(batch_size {batch_size} x {num_replicas} processes)"
            )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this process's micro-batch ``start``."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_STREAM, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for c in range(self.start, self.batches_per_epoch):
            j = c * self.num_replicas + self.rank
            yield order[j * self.batch_size : (j + 1) * self.batch_size]


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream ``keys`` of ``seed``."""
    low, high = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)
