"""One run per output directory: two trainers writing the same checkpoints would undo each other's saves."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from dtrain.distributed import run_and_agree
from dtrain.errors import UsageError

LOCK_FILE = ".dtrain.lock"


class RunLock:
    """An exclusive flock on OUTPUT_DIR/.dtrain.lock held by rank 0 for the run; the kernel drops it when the
    process dies, even by SIGKILL, so a crashed run never leaves a stale lock."""

    def __init__(self, output_dir: Path, accelerator):
        self.path = Path(output_dir) / LOCK_FILE
        self.accelerator = accelerator
        self._fd: int | None = None

    def acquire(self) -> None:
        # Every rank refuses together, also when rank 0 could not even open the lock file: a rank-0 error
        # before the agreement would leave the others waiting for it.
        ok, error = run_and_agree(self._take, self.accelerator.is_main_process, self.accelerator.device)
        if ok:
            return
        if isinstance(error, _Held):
            raise UsageError(f"another dtrain run (pid {error.pid}) is using {self.path.parent}; wait for it to "
                             f"stop, or choose another --output-dir")
        if error is None:  # a rank that only heard of rank 0's failure (rank 0 prints the reason)
            raise UsageError(f"the main process could not take the run lock {self.path}")
        raise UsageError(f"cannot take the run lock {self.path}: {getattr(error, 'strerror', None) or error}")

    def _take(self) -> None:
        fd = open_lock_file(self.path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _Held(os.pread(fd, 32, 0).decode(errors="replace").strip() or "?") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def open_lock_file(path: Path) -> int:
    """Opens (creating it, with the user's umask) the lock file for reading and writing, never through a
    symbolic link: whoever planted one would have dtrain truncate its target. OSError with a reason otherwise."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link (dtrain never writes through one; remove "
                                       f"it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file (remove it)")
    return fd


class _Held(Exception):
    """The lock is held by another run (its pid, as that run wrote it)."""

    def __init__(self, pid: str):
        super().__init__(f"held by pid {pid}")
        self.pid = pid
