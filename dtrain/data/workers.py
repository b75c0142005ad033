"""Randomness in DataLoader workers: seeds that are a pure function of where the data is, never of history.

A worker process starts with torch, numpy and Python `random` seeded from
`worker_seed(seed, epoch, rank, worker)`. For map-style data, every micro-batch is moreover fetched under
`batch_seed(seed, epoch, rank, micro_step)`: which worker serves a batch, and what that worker served before,
depends on where the loader started (a resumed run starts mid-epoch), so only a per-batch seed gives each
sample the same random augmentation in a resumed run as in an uninterrupted one. Ranks never share a seed.
"""

from __future__ import annotations

import hashlib
import random
import signal
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info


def _mix(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def worker_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """The seed a DataLoader worker process starts with."""
    return _mix("worker", seed, epoch, rank, worker)


def batch_seed(seed: int, epoch: int, rank: int, micro_step: int) -> int:
    """The seed a worker fetches micro-batch `micro_step` of the epoch under (map-style data)."""
    return _mix("batch", seed, epoch, rank, micro_step)


def seed_everything_here(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def ignore_interrupts() -> None:
    # The trainer process decides how to stop; a worker that dies on Ctrl+C would only crash the loader.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class WorkerInit:
    """worker_init_fn: ignore signals, seed from (seed, epoch, rank, worker), then the user's own init."""

    def __init__(self, seed: int, epoch: int, rank: int, user_init: Callable[[int], Any] | None = None):
        self.seed, self.epoch, self.rank, self.user_init = seed, epoch, rank, user_init

    def __call__(self, worker_id: int) -> None:
        ignore_interrupts()
        seed_everything_here(worker_seed(self.seed, self.epoch, self.rank, worker_id))
        if self.user_init is not None:
            self.user_init(worker_id)


class SeededBatch(list):
    """A micro-batch's sample indices, carrying the seed it must be fetched under."""

    def __init__(self, indices, seed: int):
        super().__init__(indices)
        self.seed = seed

    def __reduce__(self):  # travels to worker processes through a queue
        return SeededBatch, (list(self), self.seed)


class PerBatchSeeded(torch.utils.data.Dataset):
    """Wraps a map-style dataset: inside a worker, each SeededBatch is fetched under its own seed.

    In the main process (num_workers=0) nothing is reseeded: there the samples draw from the trainer's own
    generators, which a checkpoint restores exactly.
    """

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        return self.inner[index]

    def __getitems__(self, indices):
        if isinstance(indices, SeededBatch) and get_worker_info() is not None:
            seed_everything_here(indices.seed)
        many = getattr(self.inner, "__getitems__", None)
        return many(list(indices)) if many is not None else [self.inner[i] for i in indices]
