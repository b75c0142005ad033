"""Choosing the TrainSource for a task's training data: dtrain's own order for map-style data, a stateful loader
for streams and for samplers that keep their own state."""

from __future__ import annotations

from torch.utils.data import IterableDataset

from dtrain.data.loader import LoaderSettings
from dtrain.data.ordered import OrderedSource
from dtrain.data.source import TrainSource
from dtrain.data.stream import StatefulSource
from dtrain.errors import UsageError


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
