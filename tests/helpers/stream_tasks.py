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


def _task(name: str, train_data, config, eval_data=None) -> Task:
    return Task(name=name, model=regression.make_mlp(config), train_data=train_data, loss=regression.mse_loss,
                collate_fn=collate_records, eval_data=eval_data,
                shape={"n_layer": config.n_layer, "n_embd": config.n_embd})


def _hf_dataset(seed: int):
    from datasets import Dataset as HFDataset

    x, y = _data(seed)
    return HFDataset.from_dict({"id": list(range(STREAM_SAMPLES)), "x": x.tolist(), "y": y.tolist()})


def hf_stream(config, seed):
    """A Hugging Face IterableDataset of 4 shards (exact state: resumed from its state_dict), evaluated on
    another stream (whose ids are recorded as negative numbers)."""
    evaluation = _hf_dataset(seed + 1).select(range(40)).map(lambda row: {"id": -1 - row["id"]})
    return _task("hf_stream", _hf_dataset(seed).to_iterable_dataset(num_shards=4).with_format("torch"), config,
                 eval_data=evaluation.to_iterable_dataset(num_shards=2).with_format("torch"))


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


class StatefulStream:
    """Not a torch Dataset at all: an iterable with set_epoch() and an exact state_dict()/load_state_dict()."""

    def __init__(self, seed: int):
        self.x, self.y = _data(seed)
        self.seed, self.epoch, self.position = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        order = torch.randperm(STREAM_SAMPLES, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        while self.position < STREAM_SAMPLES:
            i = order[self.position].item()
            self.position += 1
            yield {"id": i, "x": self.x[i], "y": self.y[i]}
        self.position = 0


def stateful_stream(config, seed):
    """An iterable with its own exact state (resumed from it)."""
    return _task("stateful_stream", StatefulStream(seed), config)


class TinyStream(IterableDataset):
    def __iter__(self):
        x, y = _data(0)
        return iter({"id": i, "x": x[i], "y": y[i]} for i in range(8))


def tiny_stream(config, seed):
    """A stream shorter than one micro-batch of 16."""
    return _task("tiny_stream", TinyStream(), config)
