"""Background saves (`--async-save`): at most one save in flight, in a thread, and the loop's view of it.

The loop hands over a save once its state is in host memory; the thread writes and commits it with the same
protocol as a synchronous save. Parameters and optimizer state may still be copying while the next forward and
backward run: `before_optimizer_step()` holds the loop only if that copy is not done by the next optimizer step.
A failure is kept (`error`) until every rank has heard of it at an agreed point of the loop.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from dtrain.checkpoint.commit import SaveReport


class BackgroundSave:
    def __init__(self):
        self._thread: threading.Thread | None = None
        self._copied: threading.Event | None = None  # set once the in-flight save's deferred copy is done
        self._result: SaveReport | BaseException | None = None
        self._blocking = 0.0  # how long the in-flight save has held the loop
        self.error: BaseException | None = None  # a failed background save, once collected

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def start(self, work: Callable[[threading.Event], SaveReport], started: float) -> None:
        """Runs `work(copied)` in a thread; `work` sets `copied` once the loop may change the state again (it is
        set anyway when `work` ends, so the loop never waits forever). `started`: perf_counter of the save."""
        copied = threading.Event()

        def run() -> None:
            try:
                self._result = work(copied)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._result = exc
            finally:
                copied.set()  # whatever failed before the copy ran: before_optimizer_step() must never wait forever

        self._copied = copied
        self._thread = threading.Thread(target=run, name="dtrain-async-save", daemon=True)
        self._thread.start()
        self._blocking = time.perf_counter() - started  # after start(): the thread's launch holds us too

    @property
    def blocking_seconds(self) -> float:
        return self._blocking

    def before_optimizer_step(self) -> None:
        """Waits until the in-flight save's copy of the parameters and optimizer state is complete (usually it
        long is), so the step cannot change them under it."""
        copied = self._copied
        if copied is None:
            return
        started = time.perf_counter()
        while not copied.wait(0.1):  # short waits keep signal handlers responsive
            pass
        self._copied = None
        self._blocking += time.perf_counter() - started  # the loop was held for the save

    def poll(self) -> SaveReport | None:
        """The report of a save that has finished since the last call (non-blocking), else None."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self._collect(raise_error=False)

    def wait(self, raise_error: bool = True) -> SaveReport | None:
        """Waits for the save in flight, if any; returns its report or raises its error."""
        if self._thread is None:
            return None
        while self._thread.is_alive():
            self._thread.join(0.1)  # short joins keep signal handlers (a second Ctrl+C) responsive
        return self._collect(raise_error)

    def _collect(self, raise_error: bool) -> SaveReport | None:
        self._thread, self._copied, result, self._result = None, None, self._result, None
        if isinstance(result, BaseException):
            self.error = result
            if raise_error:
                raise result
            return None
        if result is not None:
            result.blocking_seconds = self._blocking
        return result
