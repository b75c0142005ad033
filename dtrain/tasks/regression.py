"""A small synthetic regression task: fast enough for tests, real enough to show learning."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.config import TaskConfig
from dtrain.tasks.base import Task

IN_FEATURES = 16
TRAIN_SAMPLES = 2048
EVAL_SAMPLES = 256


def make_mlp(config: TaskConfig) -> nn.Module:
    layers: list[nn.Module] = []
    width = IN_FEATURES
    for _ in range(config.n_layer):
        layers += [nn.Linear(width, config.n_embd), nn.GELU(), nn.Dropout(config.dropout)]
        width = config.n_embd
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).squeeze(-1), y)


def build(config: TaskConfig, seed: int) -> Task:
    data_rng = torch.Generator().manual_seed(seed)
    weights = torch.randn(IN_FEATURES, generator=data_rng)
    x = torch.randn(TRAIN_SAMPLES + EVAL_SAMPLES, IN_FEATURES, generator=data_rng)
    y = torch.sin(x @ weights / 4) + 0.05 * torch.randn(len(x), generator=data_rng)
    return Task(
        name="regression",
        model=make_mlp(config),
        train_data=TensorDataset(x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES]),
        eval_data=TensorDataset(x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:]),
        loss=mse_loss,
        shape={"task": "regression", "n_layer": config.n_layer, "n_embd": config.n_embd},
        fingerprint=f"synthetic-regression/seed={seed}",
    )
