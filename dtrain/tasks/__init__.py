"""Tasks: what to train (model, data, loss, metrics, samples) behind one small protocol.

A task is a function `build(config: TaskConfig, seed: int) -> Task`. Built-in tasks are named (`charlm`,
`regression`, `causal-lm`); a user task is `package.module:function` and is loaded the same way.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from dtrain.config import TaskConfig
from dtrain.errors import UsageError
from dtrain.tasks.base import Task, default_evaluate

__all__ = ["Task", "build_task", "default_evaluate"]

BUILTIN = {"charlm": "dtrain.tasks.charlm:build", "regression": "dtrain.tasks.regression:build",
           "causal-lm": "dtrain.tasks.causal_lm:build"}


def build_task(config: TaskConfig, seed: int) -> Task:
    target = BUILTIN.get(config.task, config.task)
    module_name, _, function_name = target.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # user tasks usually live next to where the run is started
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import task module '{module_name}' (task {config.task!r}): {exc}") from None
    build = getattr(module, function_name, None)
    if not callable(build):
        raise UsageError(f"task {config.task!r}: module '{module_name}' has no function '{function_name}'")
    task = build(config, seed)
    if not isinstance(task, Task):
        raise UsageError(f"task {config.task!r} returned {type(task).__name__}, expected dtrain.tasks.Task")
    return task
