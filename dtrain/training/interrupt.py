"""Interrupts: signal handlers that only record a request, and the cross-rank agreement on stopping.

A handler never saves, logs or talks to other ranks (Lightning users hit deadlocks doing that in handlers).
The training loop asks `agree()` at step boundaries; it is one all-reduce, so every rank stops after the
same optimizer step even when only one of them received the signal.

When the launcher dies (SIGKILL, the OOM killer), nobody forwards a signal: a thread that watches the parent
pid turns its death into a SIGTERM of this process, so the ranks agree, save and exit as on any SIGTERM. Nobody
would SIGKILL a rank that cannot finish that either (a peer is gone or hangs), so the watcher enforces the
launcher's grace period itself: `exit_grace_seconds` after the launcher's death the process exits (code 1)
without waiting further; an unfinished save stays a `.tmp-` directory, removed at the next start.

A second Ctrl+C aborts at once, without saving. Signals that arrive within `abort_window` seconds of the
first one are the same request (a terminal's Ctrl+C reaches the launcher and every rank, and torchrun then
forwards a signal of its own), so only a deliberate second press aborts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from dtrain.distributed import all_reduce_max
from dtrain.utils import PARENT_PID_AT_START

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def launched_by_launcher() -> bool:
    """True under `accelerate launch` or torchrun, whose death should stop (and save) this trainer."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ


class InterruptHandler:
    def __init__(self, abort_window: float = 1.0, watch_parent: bool | None = None, poll_seconds: float = 0.5,
                 exit_grace_seconds: float = 30.0):
        self.abort_window = abort_window
        self.watch_parent = launched_by_launcher() if watch_parent is None else watch_parent
        self.poll_seconds = poll_seconds
        self.exit_grace_seconds = exit_grace_seconds
        self.requested = 0  # the first signal received, 0 if none
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._stop_watching = threading.Event()

    def install(self) -> "InterruptHandler":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; the caller keeps its own
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.watch_parent:
            threading.Thread(target=self._watch_parent, args=(PARENT_PID_AT_START,), daemon=True,
                             name="dtrain-parent-watch").start()
        return self

    def uninstall(self) -> None:
        self._stop_watching.set()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "InterruptHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def request(self, signum: int) -> None:
        """Records a stop request as a signal would (used by `fit(stop_at_step=...)` and verify-resume)."""
        if not self.requested:
            self.requested, self._first_at = signum, time.monotonic()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first_at = signum, now
        elif signum == signal.SIGINT and now - self._first_at > self.abort_window:
            os.write(2, b"\ndtrain: second Ctrl+C: aborting now without saving. Committed checkpoints and "
                        b"'latest' are intact; an unfinished save stays a .tmp- directory.\n")
            os._exit(128 + signal.SIGINT)

    def _watch_parent(self, parent: int) -> None:
        # The single-process `accelerate launch` does not forward SIGTERM: when it dies we are re-parented.
        while True:
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                self._exit_after_grace()
                return
            if self._stop_watching.wait(self.poll_seconds):
                return

    def _exit_after_grace(self) -> None:
        # Not cancelled by uninstall(): with the launcher gone, this process has nothing left to do but exit.
        time.sleep(self.exit_grace_seconds)
        os.write(2, f"\ndtrain: the launcher is gone and this rank did not stop within {self.exit_grace_seconds:g}s "
                    f"(--signal-grace-seconds; a peer may be gone or hang): exiting without waiting further. "
                    f"Committed checkpoints and 'latest' are intact.\n".encode())
        os._exit(1)

    def agree(self, device="cpu", *flags: float) -> tuple[int, list[float]]:
        """All ranks learn whether any rank was interrupted (and by which signal), plus the max of each flag."""
        requested, *flags = all_reduce_max([float(self.requested), *map(float, flags)], device)
        return int(requested), flags
