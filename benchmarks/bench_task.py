"""The benchmarks' model as a dtrain user task (`--task benchmarks.bench_task:build`): a stack of
`n_layer` x Linear(n_embd, n_embd), the model of bench_checkpoint.py, trained to reproduce its input.

With DTRAIN_BENCH_FIRST_STEP_FILE set, the process writes the wall-clock time (time.time()) of the end of its
first optimizer step to that file and exits at once: bench_startup.py times process start -> first step.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import TensorDataset

from dtrain.config import TaskConfig
from dtrain.tasks.base import Task

SAMPLES = 512


def build_model(width: int, layers: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def reconstruction_loss(model: nn.Module, batch) -> torch.Tensor:
    (x,) = batch
    return nn.functional.mse_loss(model(x), x)


def _exit_after_first_optimizer_step(path: str) -> None:
    def hook(optimizer, args, kwargs):
        with open(path, "w") as f:
            f.write(repr(time.time()))
        os._exit(0)  # what is timed ends here; nothing after it matters to the benchmark

    register_optimizer_step_post_hook(hook)  # every optimizer, also once wrapped


def build(config: TaskConfig, seed: int) -> Task:
    if os.environ.get("DTRAIN_BENCH_FIRST_STEP_FILE"):
        _exit_after_first_optimizer_step(os.environ["DTRAIN_BENCH_FIRST_STEP_FILE"])
    width = config.n_embd
    x = torch.randn(SAMPLES, width, generator=torch.Generator().manual_seed(seed))
    model = build_model(width, config.n_layer)
    return Task(name="bench-linear-stack", model=model, train_data=TensorDataset(x), loss=reconstruction_loss,
                shape={"task": "bench-linear-stack", "n_layer": config.n_layer, "n_embd": width},
                fingerprint=f"bench-linear-stack/seed={seed}")
