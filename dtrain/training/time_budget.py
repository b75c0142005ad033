"""`--max-time`: stop with an agreed save before the wall-clock budget of this invocation runs out (exit 124).

Like Lightning's `max_time`, but a job under a hard limit must not lose its tail, so the stop comes early enough
for the save: after an optimizer step, the run stops when what is left of the budget would not cover the longest
stretch between two of the ranks' agreements (steps, evaluations) plus the longest save seen so far, with a
margin. Rank 0's clock decides, and the decision travels in the same all-reduce as the interrupt flag.

The budget counts from the start of the invocation: the process's own start for a `dtrain` command run as a
program (interpreter and imports included, as a scheduler's limit counts them), the call for a command run
inside a Python process that already ran one (tests, notebooks).
"""

from __future__ import annotations

import os
import time

SAFETY_SECONDS = 2.0  # beyond the measured estimate: process exit, a slow last fsync
SAFETY_FACTOR = 1.5  # on the measured step and save durations, which vary from one to the next

def _process_start() -> float:
    """When this process started, on the monotonic clock (Linux: from /proc; elsewhere: when dtrain loaded)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(age, 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


_invocation_started = _process_start()
_invocations = 0


def begin_invocation() -> None:
    """Called as each dtrain command starts: the first in a process counts from the process's start."""
    global _invocation_started, _invocations
    _invocations += 1
    if _invocations > 1:
        _invocation_started = time.monotonic()


class TimeBudget:
    """The wall-clock budget of one invocation and the durations that decide when to stop within it."""

    def __init__(self, seconds: float, started: float | None = None):
        self.seconds = seconds
        self.started = _invocation_started if started is None else started
        self._last_check = time.monotonic()
        self.longest_stretch = 0.0  # seconds between two checks (steps, evaluations, logging)
        self.longest_save = 0.0

    def note_save(self, seconds: float) -> None:
        self.longest_save = max(self.longest_save, seconds)

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def running_out(self, steps_until_next_check: int = 1) -> bool:
        """True when the budget left would not cover `steps_until_next_check` more stretches and a save."""
        now = time.monotonic()
        self.longest_stretch = max(self.longest_stretch, now - self._last_check)
        self._last_check = now
        needed = SAFETY_FACTOR * (self.longest_stretch * steps_until_next_check + self.longest_save) + SAFETY_SECONDS
        return self.remaining() <= needed
