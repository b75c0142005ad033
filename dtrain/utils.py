"""Small filesystem helpers shared by checkpoints, metrics and pipelines."""

from __future__ import annotations

import importlib
import logging
import os
import secrets
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


# Files dtrain creates: never through a symbolic link someone planted, and with the mode the user's umask
# leaves of 0o666 (never a hard-coded mode that could be wider, or narrower, than what the user asked for).
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_MODE = 0o666


def create_new_file(path: Path) -> int:
    """Opens a file that must not exist yet (a fresh temp name) for writing; returns its descriptor.
    FileExistsError when anything, a planted link included, already has that name."""
    return os.open(path, CREATE_FLAGS, CREATE_MODE)


def fresh_temp_name(path: Path) -> Path:
    """A hidden name beside `path` that nobody can guess in advance (a planted link cannot wait for it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Writes `text` to `path` so that readers see either the old or the new content, never a mix. The temp
    file is created fresh (O_EXCL, O_NOFOLLOW) and renamed over `path`: a symbolic link at `path` is replaced,
    its target never written."""
    path = Path(path)
    tmp = fresh_temp_name(path)
    fd = create_new_file(tmp)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    trash (never a half-deleted directory that still looks like a checkpoint or a stage output).
    A symbolic link in its place is removed itself: nothing is ever deleted through one."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)  # refuses a link put in trash's place; never follows one inside


def remove_owned_tree(path: Path, parent: Path) -> None:
    """Deletes `path`, a directory dtrain made directly below `parent` (which may itself be a link the user
    made, e.g. a staging dir on a fast disk). A symbolic link at `path` is removed itself, its target untouched;
    a `path` whose real location is not directly below `parent`'s is refused with OSError. Errors while
    deleting are ignored (leftovers are never mistaken for checkpoints)."""
    path = Path(path)
    if path.is_symlink():
        path.unlink(missing_ok=True)
        return
    if not os.path.lexists(path):
        return
    if path.resolve().parent != Path(parent).resolve():
        raise OSError(f"refusing to delete {path}: it is not a directory dtrain made in {parent}")
    shutil.rmtree(path, ignore_errors=True)  # refuses a link put in its place; never follows one inside


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A warning printed once per process (a pointer is read several times per resolution): through
    Accelerate's logger (main process only) once its state exists, the standard one before (the `ckpt` tools)."""
    if message in _warned:
        return
    _warned.add(message)
    from accelerate.state import is_initialized

    if is_initialized():  # an Accelerator exists (hence the state Accelerate's logger needs)
        from accelerate.logging import get_logger

        get_logger(__name__).warning(message)
    else:
        logging.getLogger(__name__).warning(message)


def human_size(n: float) -> str:
    """A byte count as people read it: 512 B, 1.5 KB, 3.2 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
