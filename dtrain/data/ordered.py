"""A map-style dataset in dtrain's resumable order: shuffled per (seed, epoch) or sequential, resumed in O(1)."""

from __future__ import annotations

import copy
from typing import Any, Iterator

from dtrain.data.loader import make_loader
from dtrain.data.order import ResumableBatchSampler
from dtrain.data.source import TrainSource, digest
from dtrain.data.workers import PerBatchSeeded, SeededBatch, WorkerInit, batch_seed


class OrderedSource(TrainSource):
    """A map-style dataset in dtrain's resumable order."""

    kind = "map"

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int, grad_accum: int,
                 collate_fn=None, shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                 pin_memory: bool = False, worker_init_fn=None):
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, rank, world_size, seed, grad_accum,
                                             shuffle=shuffle, drop_last=drop_last)
        self.dataset = PerBatchSeeded(dataset) if num_workers else dataset
        self.collate_fn, self.num_workers, self.pin_memory = collate_fn, num_workers, pin_memory
        self.worker_init_fn, self.seed, self.rank = worker_init_fn, seed, rank
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.samples_per_micro_step = self.sampler.samples_per_micro_step
        self.epoch, self.start_sample = 0, 0

    def seek(self, epoch: int, epoch_samples_seen: int = 0, saved_position: dict | None = None) -> None:
        # A save right after an incomplete last micro-batch (drop_last=False) counts past the end: epoch over.
        self.epoch, self.start_sample = epoch, min(epoch_samples_seen, self.sampler.num_samples)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch, self.start_sample)
        per_step = self.samples_per_micro_step
        batches = self.sampler
        if self.num_workers:
            first = self.start_sample // per_step
            batches = _Seeded(self.sampler, self.seed, self.epoch, self.rank, first)
        loader = make_loader(self.dataset, batches, self.collate_fn, self.num_workers, self.seed,
                             self.pin_memory, WorkerInit(self.seed, self.epoch, self.rank, self.worker_init_fn))
        for batch in loader:
            # The position moves before the batch is handed out: a save after this micro-step resumes after it.
            self.start_sample = min(self.start_sample + per_step, self.sampler.num_samples)
            yield batch

    def state_dict(self) -> dict:
        return {"kind": "map", "resume": "order", "epoch": self.epoch, "samples": self.start_sample,
                "shuffle": self.sampler.shuffle}

    def next_batch_digest(self) -> str:
        sampler = copy.copy(self.sampler)
        epoch, start = self.epoch, self.start_sample
        if sampler.micro_steps_from(start) == 0:
            epoch, start = epoch + 1, 0  # this epoch has no batch left: the next one starts the next epoch
        sampler.set_epoch(epoch, start)
        indices = next(iter(sampler))
        return digest({"kind": "map", "epoch": epoch, "indices": indices})

    def epoch_ends_at(self, epoch_samples_seen: int) -> bool:
        return self.sampler.micro_steps_from(epoch_samples_seen) == 0

    def describe(self) -> str:
        order = "shuffled per epoch" if self.sampler.shuffle else "sequential"
        return f"map-style data, {order}, resumable in O(1)"


class _Seeded:
    """dtrain's batch sampler, each batch carrying the seed a worker fetches it under."""

    def __init__(self, sampler: ResumableBatchSampler, seed: int, epoch: int, rank: int, first_micro_step: int):
        self.sampler, self.seed, self.epoch, self.rank, self.first = sampler, seed, epoch, rank, first_micro_step

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for step, indices in enumerate(self.sampler, start=self.first):
            yield SeededBatch(indices, batch_seed(self.seed, self.epoch, self.rank, step))
