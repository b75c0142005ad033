"""Tasks: what to train (model, data, loss, metrics, samples) behind one small protocol.

A task is a function `build(config: TaskConfig, seed: int) -> Task`. Built-in tasks are named (`charlm`,
`regression`, `causal-lm`); a user task is `package.module:function` and is loaded the same way.

A task name is code to import, so where it comes from matters: one the command line names (`--task`) is imported,
with the working directory on the path as users expect; one read from a file (a checkpoint's recorded config, an
export's metadata) is imported only when it is built in, or when the user explicitly trusts it
(`--trust-task`), and then never from the working directory (`task_recorded_in`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from dtrain.config import TaskConfig
from dtrain.errors import UsageError
from dtrain.tasks.base import Task, default_evaluate

__all__ = ["Task", "build_task", "default_evaluate", "is_builtin", "task_recorded_in"]

BUILTIN = {"charlm": "dtrain.tasks.charlm:build", "regression": "dtrain.tasks.regression:build",
           "causal-lm": "dtrain.tasks.causal_lm:build"}


def is_builtin(name: str) -> bool:
    return name in BUILTIN


def build_task(config: TaskConfig, seed: int, search_working_dir: bool = True) -> Task:
    """Imports and builds `config.task`. `search_working_dir=False` for a name that came from a file."""
    target = BUILTIN.get(config.task, config.task)
    module_name, _, function_name = target.partition(":")
    if search_working_dir and not is_builtin(config.task) and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # user tasks usually live next to where the run is started
    try:
        module = _import(module_name, search_working_dir)
    except ImportError as exc:
        hint = "" if search_working_dir else (f"; a task named by a file is not looked up in the working "
                                              f"directory: pass --task {config.task} to import it from here")
        raise UsageError(f"cannot import task module '{module_name}' (task {config.task!r}): {exc}{hint}") from None
    build = getattr(module, function_name, None)
    if not callable(build):
        raise UsageError(f"task {config.task!r}: module '{module_name}' has no function '{function_name}'")
    task = build(config, seed)
    if not isinstance(task, Task):
        raise UsageError(f"task {config.task!r} returned {type(task).__name__}, expected dtrain.tasks.Task")
    return task


def _import(module_name: str, search_working_dir: bool):
    """Imports a module; without `search_working_dir`, with the working directory off the path for the import
    (`python -m` and `python -c` put it first), so a module planted there is never the one imported."""
    if search_working_dir:
        return importlib.import_module(module_name)
    cwd = Path.cwd().resolve()
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != cwd]
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path[:] = saved + [p for p in sys.path if p not in saved]


def task_recorded_in(source: str, recorded: object, named: str | None = None,
                     trust_recorded: bool = False) -> tuple[str, bool]:
    """Which task to rebuild for a checkpoint or export (`source`) that records the task `recorded`, and whether
    the working directory may be searched for it: (name, search_working_dir).

    `named` is the command line's `--task` (imported as in training); a built-in recorded name is used as it
    is; any other recorded name is refused unless `trust_recorded` (`--trust-task`), because whoever could
    write the file chose it."""
    if named:
        return named, True
    if not isinstance(recorded, str) or not recorded:
        raise UsageError(f"{source} does not record a task name; pass --task NAME or package.module:function")
    if is_builtin(recorded):
        return recorded, False
    if trust_recorded:
        return recorded, False
    raise UsageError(f"{source} was trained with the user task {recorded!r}, and dtrain does not import code "
                     f"named by a file: pass --task {recorded} to import it from here, or --trust-task to use "
                     f"the recorded name (never from the working directory)")
