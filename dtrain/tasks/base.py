"""The task protocol: everything the trainer needs to know about a model and its data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

Batch = Any


def batch_length(batch: Batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values())) if isinstance(batch, dict) else batch
    return len(first)


def default_evaluate(loss: Callable[[nn.Module, Batch], torch.Tensor]) -> Callable[[nn.Module, Batch], dict]:
    """An evaluate function that reports the mean task loss as `val_loss`."""

    def evaluate(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        n = batch_length(batch)
        return {"val_loss": loss(model, batch).detach().float() * n, "count": torch.tensor(float(n))}

    return evaluate


def evaluation_sums(task: "Task", model: nn.Module, batches, device) -> dict[str, torch.Tensor]:
    """Adds up `task.evaluate` over batches: float64 sums on the CPU, including `count`."""
    from accelerate.utils import send_to_device

    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        for key, value in task.evaluate(model, send_to_device(batch, device)).items():
            sums[key] = sums.get(key, 0) + torch.as_tensor(value, dtype=torch.float64).cpu()
    return sums


# Metrics that are no averages: a task sums their logarithm per sample, and reports exp(mean).
EXP_OF_MEAN = ("perplexity",)


def metrics_from_sums(totals: dict[str, float]) -> dict[str, float]:
    """Per-sample metrics from summed ones: every sum divided by `count` (exp of that for EXP_OF_MEAN)."""
    totals = dict(totals)
    count = float(totals.pop("count", 1.0)) or 1.0
    means = {key: float(value) / count for key, value in totals.items()}
    return {key: math.exp(min(value, 700.0)) if key in EXP_OF_MEAN else value for key, value in means.items()}


@dataclass
class Task:
    """What to train.

    - `loss(model, batch)` returns the mean loss of a micro-batch (it is what backward runs on).
    - `evaluate(model, batch)` returns metric SUMS over the batch plus a `count`; the trainer adds them up over
      batches and ranks and divides by the count. Default: the loss, reported as `val_loss`. A `perplexity`
      sum is a sum of log-perplexities (losses): it is reported as exp of its mean.
    - `sample(model, generator)` optionally returns text written to `samples/` at each eval. It must draw
      random numbers only from `generator`, so evaluation never changes the training run's randomness.
    - `shape` holds the settings that decide the model's tensors; resuming with different ones is refused.
    - `fingerprint` identifies the data; a change is reported on resume.
    - `train_data` is a map-style Dataset or an IterableDataset (a stream; then set --max-steps).
    - `train_loader` (dtrain.data.LoaderSettings) keeps what a user's own DataLoader asked for;
      `eval_batch_size` the eval DataLoader's batch size (default: --batch-size).
    """

    name: str
    model: nn.Module
    train_data: Dataset
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    eval_data: Dataset | None = None
    evaluate: Callable[[nn.Module, Batch], dict[str, torch.Tensor]] | None = None
    sample: Callable[[nn.Module, torch.Generator], str] | None = None
    collate_fn: Callable | None = None
    shape: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    train_loader: Any = None
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.evaluate is None:
            self.evaluate = default_evaluate(self.loss)

    @classmethod
    def from_pieces(cls, model: nn.Module, loss_fn, train_dataloader, eval_dataloader=None) -> "Task":
        """Wraps a user's model, loss and DataLoaders. dtrain rebuilds the loaders so it can resume exactly, and
        keeps what they say (see dtrain.data.loader.settings_from_dataloader); what it cannot keep is refused."""
        from dtrain.data.loader import settings_from_dataloader

        return cls(name=type(model).__name__, model=model, train_data=train_dataloader.dataset, loss=loss_fn,
                   eval_data=eval_dataloader.dataset if eval_dataloader is not None else None,
                   collate_fn=train_dataloader.collate_fn,
                   train_loader=settings_from_dataloader(train_dataloader),
                   eval_batch_size=eval_dataloader.batch_size if eval_dataloader is not None else None,
                   shape={"model": type(model).__name__,
                          "parameters": {k: list(v.shape) for k, v in model.state_dict().items()}})
