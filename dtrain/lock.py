"""One run per output directory: two trainers writing the same checkpoints would undo each other's saves."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dtrain.distributed import all_ranks_ok
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
        holder = ""
        if self.accelerator.is_main_process:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
        if not all_ranks_ok(not holder, self.accelerator.device):  # every rank refuses together
            raise UsageError(f"another dtrain run (pid {holder or '?'}) is using {self.path.parent}; "
                             f"wait for it to stop, or choose another --output-dir")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
