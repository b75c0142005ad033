"""Building DataLoaders, and reading what a user's own DataLoader asks for.

dtrain builds the training loader itself (it owns the order, so that it can resume exactly), but through the
Python API it keeps what the user's DataLoader says: shuffle or not, drop_last, workers, pin_memory, a custom
sampler (if it can say where it is), the collate function and worker_init_fn. `LoaderSettings` is that
reading; nothing the user set is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from dtrain.data.workers import WorkerInit
from dtrain.errors import UsageError


@dataclass
class LoaderSettings:
    """What a user's training DataLoader asks for (None: the config decides)."""

    shuffle: bool = True
    drop_last: bool = True
    num_workers: int | None = None
    pin_memory: bool | None = None
    worker_init_fn: Callable[[int], Any] | None = None
    sampler: Any = None  # a custom sampler with state_dict()/load_state_dict() (yields indices)
    batch_sampler: Any = None  # a custom batch sampler with state_dict()/load_state_dict() (yields lists)


def settings_from_dataloader(loader: DataLoader) -> LoaderSettings:
    """Reads a DataLoader's choices; refuses a custom sampler whose position cannot be saved."""
    settings = LoaderSettings(drop_last=loader.drop_last, num_workers=loader.num_workers,
                              pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn)
    if isinstance(loader.dataset, IterableDataset):
        return settings  # a stream has no sampler: its order is the stream's own
    batch_sampler = loader.batch_sampler
    if type(batch_sampler) is not BatchSampler:
        _require_stateful(batch_sampler, "batch_sampler")
        settings.batch_sampler = batch_sampler
        return settings
    sampler = loader.sampler
    if type(sampler) is RandomSampler:
        settings.shuffle = True  # dtrain's own shuffled order: a pure function of (--seed, epoch)
    elif type(sampler) is SequentialSampler:
        settings.shuffle = False
    else:
        _require_stateful(sampler, "sampler")
        settings.sampler = sampler
    return settings


def _require_stateful(sampler, what: str) -> None:
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(sampler, m, None))]
    if missing:
        raise UsageError(
            f"train_dataloader's {what} {type(sampler).__name__} has no {' / '.join(m + '()' for m in missing)}, "
            f"so dtrain cannot save and restore its position: add state_dict() (returning a JSON-able dict of "
            f"where it is) and load_state_dict(state) (and set_epoch(epoch) if its order changes per epoch), "
            f"or use shuffle=True/False instead of a custom {what}")


def make_loader(dataset: Dataset, batch_sampler, collate_fn=None, num_workers: int = 0, seed: int = 0,
                pin_memory: bool = False, worker_init_fn: Callable[[int], Any] | None = None) -> DataLoader:
    """A DataLoader over dtrain's batch sampler (map-style data)."""
    # An explicit generator keeps iterator creation from drawing on the global torch RNG; otherwise a resumed
    # run (which creates one iterator more than a straight run) would see different dropout masks.
    if num_workers and worker_init_fn is None:
        worker_init_fn = WorkerInit(seed, 0, 0)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
                      worker_init_fn=worker_init_fn if num_workers else None, persistent_workers=False)
