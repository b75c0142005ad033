"""Which names a checkpoint may hold, decided in one place: every reader of a manifest or a listing asks here.

Whoever can write a checkpoint directory or bucket writes its manifest too, so a name is untrusted input. An
object store keeps keys such as `step_N/../../x` or `step_N//abs` literally, and a pathlib join would carry them
outside the checkpoint; a local directory can hold a symlink, a fifo or a device (`/dev/zero` never ends).
A name is acceptable when it is relative and normalized (no `..`, `.`, empty or absolute component, no
backslash, NUL or other control character); a file read from a local directory must also be a regular file
reached through real directories (checked with lstat, never by following a link).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_NAME_CHARS = 1024  # far longer than any name Accelerate or torch.distributed.checkpoint writes


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a file of a checkpoint (a manifest entry, an object key below a prefix), or None."""
    if not isinstance(name, str) or not name:
        return f"the name {name!r} is not a file name"
    if len(name) > MAX_NAME_CHARS:
        return f"the name {name[:40]!r}... is longer than {MAX_NAME_CHARS} characters"
    if any(ord(c) < 32 or c == "\x7f" for c in name) or "\\" in name:
        return f"the name {name!r} holds a backslash or a control character"
    if name.startswith("/"):
        return f"the name {name!r} is an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"the name {name!r} is not a normalized relative path (an empty, '.' or '..' component)"
    return None


def local_file_problem(root: Path, name: str) -> str | None:
    """Why `root/name` is not a regular file of the checkpoint at `root` (a name `name_problem` accepted), or None.

    Every directory on the way must be a real directory and the file a regular file, each checked with lstat
    from `root` down, so nothing outside the checkpoint is ever stat'ed or opened."""
    path = Path(root)
    parts = name.split("/")
    for index, part in enumerate(parts):
        path = path / part
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        last = index == len(parts) - 1
        if stat.S_ISLNK(info.st_mode):
            return f"{name} is a symbolic link (a checkpoint holds only regular files)"
        if not last and not stat.S_ISDIR(info.st_mode):
            return f"{name} is missing ({'/'.join(parts[:index + 1])} is not a directory)"
        if last and not stat.S_ISREG(info.st_mode):
            return f"{name} is not a regular file (a directory, device, fifo or socket)"
    return None


def symlink_problem(path: Path) -> str | None:
    """Why a checkpoint directory itself cannot be used: it is a symbolic link (dtrain never makes one, and
    whoever can write the checkpoints dir could point it anywhere), or None."""
    if Path(path).is_symlink():
        return (f"{Path(path).name} is a symbolic link, not a checkpoint this run wrote; pass the directory it "
                f"points to if you trust it")
    return None


def regular_files(root: Path) -> list[str]:
    """Names (relative, '/'-separated) of the regular files below `root`, never descending into a symbolic link
    nor listing one."""
    root = Path(root)
    if root.is_symlink():
        return []
    found = []
    for directory, subdirs, files in os.walk(root):  # os.walk does not follow links to directories
        base = Path(directory)
        subdirs[:] = [d for d in subdirs if not (base / d).is_symlink()]
        for file in files:
            if stat.S_ISREG(os.lstat(base / file).st_mode):
                found.append((base / file).relative_to(root).as_posix())
    return sorted(found)


def inside(path: Path, parent: Path) -> Path:
    """`path` after resolving every link, checked to lie below `parent` (resolved too); raises OSError if not.
    For files dtrain is about to write under a directory of its own (a download's staging dir)."""
    resolved, base = Path(path).resolve(), Path(parent).resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise OSError(f"{path} resolves to {resolved}, outside {base}")
    return resolved
