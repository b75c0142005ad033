"""User tasks over streams and random augmentation, for `--task tests.helpers.stream_tasks:NAME`.

Every task here is the regression task's model and loss on STREAM_SAMPLES synthetic samples. With
DTRAIN_TEST_SEEN_DIR set, each rank appends what it reads to its own file there (sample ids, and for the
augmenting dataset the seed the sample was drawn under), so tests can check what each rank saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from dtrain.tasks import regression
from dtrain.tasks.base import Task

STREAM_SAMPLES = 512


def _data(seed: int):
    rng = torch.Generator().manual_seed(seed)
    weights = torch.randn(regression.IN_FEATURES, generator=rng)
    x = torch.randn(STREAM_SAMPLES, regression.IN_FEATURES, generator=rng)
    return x, torch.sin(x @ weights / 4)


def _record(lines: list[str]) -> None:
    folder = os.environ.get("DTRAIN_TEST_SEEN_DIR")
    if folder:
        with open(Path(folder) / f"seen_rank{os.environ.get('RANK', '0')}_pid{os.getpid()}.txt", "a") as f:
            f.write("".join(line + "\n" for line in lines))


def collate_records(samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks samples {"id", "x", "y"} into (x, y) and records the ids read."""
    _record([str(int(s["id"])) for s in samples])
    return torch.stack([torch.as_tensor(s["x"]) for s in samples]), torch.stack([torch.as_tensor(s["y"]) for s in samples])


def _task(name: str, train_data, config) -> Task:
    return Task(name=name, model=regression.make_mlp(config), train_data=train_data, loss=regression.mse_loss,
                collate_fn=collate_records, shape={"n_layer": config.n_layer, "n_embd": config.n_embd})


def _hf_dataset(seed: int):
    from datasets import Dataset as HFDataset

    x, y = _data(seed)
    return HFDataset.from_dict({"id": list(range(STREAM_SAMPLES)), "x": x.tolist(), "y": y.tolist()})


def hf_stream(config, seed):
    """A Hugging Face IterableDataset of 4 shards (exact state: resumed from its state_dict)."""
    return _task("hf_stream", _hf_dataset(seed).to_iterable_dataset(num_shards=4).with_format("torch"), config)


def hf_stream_shuffled(config, seed):
    """The same stream behind a shuffle buffer, which its state does not hold (resumed by replay)."""
    stream = _hf_dataset(seed).to_iterable_dataset(num_shards=4).shuffle(seed=seed, buffer_size=64)
    return _task("hf_stream_shuffled", stream.with_format("torch"), config)


class PlainStream(IterableDataset):
    """A torch IterableDataset without state: each epoch a different (seeded) order of the samples."""

    def __init__(self, seed: int):
        self.x, self.y = _data(seed)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(STREAM_SAMPLES, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for i in order.tolist():
            yield {"id": i, "x": self.x[i], "y": self.y[i]}


def torch_stream(config, seed):
    """A plain torch IterableDataset with set_epoch and no state_dict (resumed by replay)."""
    return _task("torch_stream", PlainStream(seed), config)


class AugmentingDataset(Dataset):
    """Map-style samples with random noise drawn from torch and numpy in __getitem__ (a random augmentation)."""

    def __init__(self, seed: int):
        self.x, self.y = _data(seed)

    def __len__(self) -> int:
        return STREAM_SAMPLES

    def __getitem__(self, i: int):
        noise = torch.randn(regression.IN_FEATURES) * 0.1 + float(np.random.uniform(-0.1, 0.1))
        info = get_worker_info()
        _record([f"{i} {torch.initial_seed()} {info.id if info else -1}"])
        return self.x[i] + noise, self.y[i]


def random_augment(config, seed):
    """Map-style data with random augmentation in __getitem__ (for --num-workers)."""
    return Task(name="random_augment", model=regression.make_mlp(config), train_data=AugmentingDataset(seed),
                loss=regression.mse_loss, shape={"n_layer": config.n_layer, "n_embd": config.n_embd})
