"""Building the DataLoader that feeds the training loop."""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset


def _ignore_interrupts_in_worker(_worker_id: int) -> None:
    # The trainer process decides how to stop; a worker that dies on Ctrl+C would only crash the loader.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_sampler, collate_fn=None, num_workers: int = 0, seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    # An explicit generator keeps iterator creation from drawing on the global torch RNG; otherwise a resumed
    # run (which creates one iterator more than a straight run) would see different dropout masks.
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
                      worker_init_fn=_ignore_interrupts_in_worker if num_workers else None,
                      persistent_workers=False)
