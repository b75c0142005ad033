"""Small filesystem helpers shared by checkpoints, metrics and pipelines."""

from __future__ import annotations

import importlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

# The launcher's pid, read when dtrain is first imported (dtrain/__init__ imports this module before anything
# heavy): the parent watch (training/interrupt.py) notices a launcher that died while torch was still loading.
PARENT_PID_AT_START = os.getppid()


def fsync_path(path: Path) -> None:
    """Flushes a file or directory to disk, so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Writes `text` to `path` so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` importing each exported name from its module on first use (keeps imports light)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def remove_tree(path: Path) -> None:
    """Deletes a directory by first renaming it to a `.trash-` dot-name, so a crash mid-delete leaves only
    trash (never a half-deleted directory that still looks like a checkpoint or a stage output)."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def human_size(n: float) -> str:
    """A byte count as people read it: 512 B, 1.5 KB, 3.2 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
