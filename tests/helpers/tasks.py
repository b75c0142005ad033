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


def user_regression(config, seed):
    """The regression task under a user task's name (a name dtrain must import)."""
    return regression.build(config, seed)


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


def counting_eval_regression(config, seed):
    """The regression task with DTRAIN_TEST_EVAL_SAMPLES eval samples and a sampler; every evaluate and sample
    call is appended to a per-rank file in DTRAIN_TEST_SEEN_DIR (to check that all ranks run the same number)."""
    import torch
    from torch.utils.data import Subset

    task = regression.build(config, seed)
    task.eval_data = Subset(task.eval_data, range(int(os.environ["DTRAIN_TEST_EVAL_SAMPLES"])))
    log = Path(os.environ["DTRAIN_TEST_SEEN_DIR"]) / f"eval_calls_rank{os.environ.get('RANK', '0')}.txt"
    evaluate = task.evaluate

    def counted_evaluate(model, batch):
        with open(log, "a") as f:
            f.write(f"evaluate {len(batch[0])}\n")
        return evaluate(model, batch)

    def sample(model, generator):
        with open(log, "a") as f:
            f.write("sample\n")
        x = torch.randn(1, regression.IN_FEATURES, generator=generator)
        return f"f(x) = {model(x).item():.4f}"

    task.evaluate, task.sample = counted_evaluate, sample
    return task
