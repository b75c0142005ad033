"""User tasks for tests, loaded through `--task tests.helpers.tasks:NAME` like any user's task."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from dtrain.tasks import regression


class RecordingDataset(Dataset):
    """Wraps a dataset and appends every index it serves to a per-rank file (to check the data order)."""

    def __init__(self, inner: Dataset, log_dir: Path):
        self.inner = inner
        self.log = log_dir / f"seen_rank{os.environ.get('RANK', '0')}_pid{os.getpid()}.txt"

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        with open(self.log, "a") as f:
            f.write(f"{index}\n")
        return self.inner[index]


def recording_regression(config, seed):
    """The regression task, recording which training samples are read (DTRAIN_TEST_SEEN_DIR)."""
    task = regression.build(config, seed)
    task.train_data = RecordingDataset(task.train_data, Path(os.environ["DTRAIN_TEST_SEEN_DIR"]))
    return task


def crashing_regression(config, seed):
    """The regression task whose loss raises on its 12th call: an unexpected failure mid-run."""
    task = regression.build(config, seed)
    inner, calls = task.loss, [0]

    def loss(model, batch):
        calls[0] += 1
        if calls[0] == 12:
            raise RuntimeError("simulated crash in the user's loss function")
        return inner(model, batch)

    task.loss = loss
    return task
