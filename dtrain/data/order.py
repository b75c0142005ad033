"""Deterministic, resumable order of a map-style dataset.

The order of an epoch is a pure function of (seed, epoch): one permutation of the dataset, read as a sequence
of global micro-batches of `world_size * batch_size` samples, rank r taking the r-th slice of each. A position
inside the epoch is therefore just a number of samples (`start_sample`), and resuming there costs one slice of
the permutation: no sample is loaded and thrown away. Because the position is counted in global samples, a run
may resume with another world size and still see every remaining sample of the epoch exactly once.
"""

from __future__ import annotations

from typing import Iterator

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Mixing with a large odd constant keeps (seed, epoch) pairs from colliding for small seeds.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class ResumableBatchSampler:
    """Yields this rank's micro-batches (lists of indices) for one epoch, from `start_sample` on.

    Each epoch holds a whole number of optimizer steps: micro-batches that would make an incomplete last
    accumulation window are dropped, so every optimizer step boundary is a resumable point. With
    `drop_last=False` an incomplete last global micro-batch is kept: its samples are split evenly across
    ranks, topped up (fewer than world_size samples) from the start of the epoch's order so that no rank
    goes without, as torch's DistributedSampler does.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 grad_accum: int = 1, shuffle: bool = True, drop_last: bool = True):
        if num_samples < batch_size * world_size * grad_accum:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one optimizer step needs "
                             f"(batch_size {batch_size} x world size {world_size} x grad_accum {grad_accum})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.grad_accum = grad_accum
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_sample = 0

    @property
    def samples_per_micro_step(self) -> int:
        """Global samples consumed by one micro-batch on every rank."""
        return self.batch_size * self.world_size

    def micro_steps_from(self, start_sample: int) -> int:
        remaining = self.num_samples - start_sample
        per_step = self.samples_per_micro_step
        steps = remaining // per_step if self.drop_last else -(-remaining // per_step)
        return steps - steps % self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a full epoch."""
        return self.micro_steps_from(0) // self.grad_accum

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        if not 0 <= start_sample <= self.num_samples:
            raise ValueError(f"start_sample {start_sample} is outside the epoch of {self.num_samples} samples")
        self.epoch = epoch
        self.start_sample = start_sample

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=epoch_generator(self.seed, epoch))

    def __len__(self) -> int:
        return self.micro_steps_from(self.start_sample)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        per_step = self.samples_per_micro_step
        first = self.start_sample + self.rank * self.batch_size
        for step in range(len(self)):
            begin = first + step * per_step
            if begin - self.rank * self.batch_size + per_step > self.num_samples:
                yield self._last_partial(order, begin - self.rank * self.batch_size)
            else:
                yield order[begin:begin + self.batch_size].tolist()

    def _last_partial(self, order: torch.Tensor, begin: int) -> list[int]:
        """This rank's share of an incomplete last global micro-batch (drop_last=False)."""
        remaining = self.num_samples - begin
        per_rank = -(-remaining // self.world_size)
        padded = torch.cat([order[begin:], order[:per_rank * self.world_size - remaining]])
        return padded[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()
