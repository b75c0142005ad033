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
import re
import stat
from pathlib import Path

MAX_NAME_CHARS = 1024  # far longer than any name Accelerate or torch.distributed.checkpoint writes


_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a file of a checkpoint (a manifest entry, an object key below a prefix), or None."""
    if not isinstance(name, str) or not name:
        return f"the name {name!r} is not a file name"
    if len(name) > MAX_NAME_CHARS:
        return f"the name {name[:40]!r}... is longer than {MAX_NAME_CHARS} characters"
    if _UNSAFE_CHARACTERS.search(name):
        return f"the name {name!r} holds a backslash or a control character"
    if name.startswith("/"):
        return f"the name {name!r} is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return f"the name {name!r} is not a normalized relative path (an empty, '.' or '..' component)"
    return None


class UnsafeFile(ValueError):
    """A listed file that is not a regular file of the checkpoint (the message says why)."""


class LocalFiles:
    """The files of one local checkpoint, each reached with lstat from its root down: every directory on the
    way must be a real directory (each checked once) and the file a regular file, so nothing outside the
    checkpoint is ever stat'ed or opened. For names `name_problem` accepted."""

    def __init__(self, root: Path):
        self.root = os.fspath(root)
        self._directories: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def lstat(self, name: str) -> os.stat_result:
        """The lstat of a regular file of the checkpoint; UnsafeFile when it is anything else or missing."""
        parent, _, _ = name.rpartition("/")
        if parent and parent not in self._directories:
            self._check_directories(name, parent)
        try:
            info = os.lstat(self.path(name))
        except FileNotFoundError:
            raise UnsafeFile(f"{name} is missing") from None
        except OSError as exc:
            raise UnsafeFile(f"{name} cannot be read ({exc.strerror or exc})") from None
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeFile(f"{name} is a symbolic link (a checkpoint holds only regular files)")
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{name} is not a regular file (a directory, device, fifo or socket)")
        return info

    def _check_directories(self, name: str, parent: str) -> None:
        walked = ""
        for part in parent.split("/"):
            walked = f"{walked}/{part}" if walked else part
            if walked in self._directories:
                continue
            try:
                info = os.lstat(self.path(walked))
            except OSError:
                raise UnsafeFile(f"{name} is missing") from None
            if stat.S_ISLNK(info.st_mode):
                raise UnsafeFile(f"{name} is a symbolic link (its directory {walked} is one; a checkpoint "
                                 f"holds only regular files)")
            if not stat.S_ISDIR(info.st_mode):
                raise UnsafeFile(f"{name} is missing ({walked} is not a directory)")
            self._directories.add(walked)


def irregular_entry_problem(root: Path) -> str | None:
    """Why a checkpoint directory holds something besides real directories and regular files (a link, device,
    fifo or socket, listed in its manifest or not: Accelerate opens files by name), or None. Walks the tree
    without following anything; the entries' types come with the listing (no extra system call)."""
    pending = [os.fspath(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif not entry.is_file(follow_symlinks=False):
                    name = os.path.relpath(entry.path, root)
                    kind = "a symbolic link" if entry.is_symlink() else "not a regular file"
                    return f"{name} is {kind} (a checkpoint holds only directories and regular files)"
    return None


def local_file_problem(root: Path, name: str) -> str | None:
    """Why `root/name` is not a regular file of the checkpoint at `root` (see LocalFiles), or None."""
    try:
        LocalFiles(root).lstat(name)
    except UnsafeFile as exc:
        return str(exc)
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
