"""The training data as the Trainer sees it: "the loader from position P" and "the position now".

Two kinds, one interface (`TrainSource`):

- `OrderedSource`: a map-style dataset in dtrain's own order (order.ResumableBatchSampler): shuffled per
  (seed, epoch) or sequential, resumed in O(1) from a count of samples, across world-size changes.
- `stream.StatefulSource`: an IterableDataset, or a user's sampler that keeps its own state, read through
  torchdata's StatefulDataLoader; resumed from the loader's state where that is exact, else by replay.

The Trainer calls `seek(epoch, epoch_samples_seen, saved_position)` once at the start and at each new epoch,
iterates the source for the rest of the epoch, and stores `checkpoint_position()` in trainer_state.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Iterator

from torch.utils.data import IterableDataset

from dtrain.data.loader import LoaderSettings, make_loader
from dtrain.data.order import ResumableBatchSampler
from dtrain.data.workers import PerBatchSeeded, SeededBatch, WorkerInit, batch_seed
from dtrain.errors import UsageError


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TrainSource:
    """What the trainer needs of its training data (see the module docstring)."""

    kind: str  # "map", "stream" or "sampler"
    steps_per_epoch: int | None  # None: unknown until the data ends (a stream)
    samples_per_micro_step: int  # global samples one micro-step consumes on all ranks together

    def seek(self, epoch: int, epoch_samples_seen: int = 0, saved_position: dict | None = None) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        """This rank's micro-batches from the position sought to the end of that epoch."""
        raise NotImplementedError

    def checkpoint_position(self) -> dict:
        """The position now, as JSON for trainer_state.json. Called on every rank at the same point."""
        raise NotImplementedError

    def check_resume(self, saved_position: dict | None, saved_world_size: int) -> None:
        """Raises UsageError for a saved position this run cannot continue from (before anything is loaded)."""

    def next_batch_digest(self) -> str:
        """sha256 naming what this rank's next micro-batch will contain; consumes nothing."""
        raise NotImplementedError

    def epoch_ends_at(self, epoch_samples_seen: int) -> bool:
        """Whether no micro-batch of the epoch is left after this many samples (False when not known ahead)."""
        return False

    def describe(self) -> str:
        raise NotImplementedError


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

    def checkpoint_position(self) -> dict:
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


def is_stream(data) -> bool:
    """An IterableDataset, or any iterable object without indexing (e.g. one with state_dict())."""
    return isinstance(data, IterableDataset) or (hasattr(data, "__iter__") and not hasattr(data, "__getitem__"))


def build_train_source(task, config, accelerator) -> TrainSource:
    """The training data of a task as a TrainSource for this rank."""
    cfg = config.train
    settings: LoaderSettings = getattr(task, "train_loader", None) or LoaderSettings()
    num_workers = settings.num_workers or cfg.num_workers
    pin_memory = settings.pin_memory if settings.pin_memory is not None else accelerator.device.type == "cuda"
    common = dict(batch_size=cfg.batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes,
                  seed=cfg.seed, grad_accum=cfg.grad_accum, collate_fn=task.collate_fn,
                  drop_last=settings.drop_last, num_workers=num_workers, pin_memory=pin_memory,
                  worker_init_fn=settings.worker_init_fn)
    stream = is_stream(task.train_data)
    if stream or settings.sampler is not None or settings.batch_sampler is not None:
        from dtrain.data.stream import StatefulSource

        if stream and not cfg.max_steps:
            raise UsageError("invalid value for max_steps: 0; accepted: a positive integer when the training "
                             "data is a stream (IterableDataset), whose length is unknown")
        return StatefulSource(task.train_data, **common, sampler=settings.sampler,
                              batch_sampler=settings.batch_sampler, device=accelerator.device,
                              is_main=accelerator.is_main_process,
                              allow_inexact_resume=config.checkpoint.allow_inexact_resume)
    try:
        return OrderedSource(task.train_data, shuffle=settings.shuffle, **common)
    except ValueError as exc:
        raise UsageError(f"invalid value for batch_size: {cfg.batch_size}; {exc}") from None
