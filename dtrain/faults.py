"""Fault injection for tests: make a process die, raise or pause at a named point of a save or of the exit.

    DTRAIN_FAULT_AT=<point>           SIGKILL this process there
    DTRAIN_FAULT_AT=<point>:raise     raise an OSError there instead
    DTRAIN_FAULT_AT=<point>:sleep=S   pause S seconds there (e.g. to signal a process in the middle of a save)
    DTRAIN_FAULT_RANK=R               only on rank R (default: every rank)
    DTRAIN_FAULT_AFTER_SAVES=N        save points only: in the first save after N saves of this process

The points of a save are listed by each commit (local_commit.STAGES, store_commit.STAGES), after `host_copied`
(a save's snapshot of the state is taken, before any file is written); `exit_barrier` is reached just before the
ranks' last barrier. Unset, every check is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    point: str
    action: str  # "kill", "raise" or "sleep"
    seconds: float = 0.0
    rank: int | None = None
    after_saves: int = 0


def planned_fault() -> Fault | None:
    """The fault the environment asks for, if any."""
    spec = os.environ.get("DTRAIN_FAULT_AT", "")
    if not spec:
        return None
    point, _, how = spec.partition(":")
    action, seconds = "kill", 0.0
    if how == "raise":
        action = "raise"
    elif how.startswith("sleep="):
        action, seconds = "sleep", float(how[len("sleep="):])
    rank = os.environ.get("DTRAIN_FAULT_RANK")
    return Fault(point, action, seconds, int(rank) if rank is not None else None,
                 int(os.environ.get("DTRAIN_FAULT_AFTER_SAVES", "0")))


def reached(point: str, rank: int, saves_started: int | None = None) -> None:
    """Acts out the planned fault if it is for this point and rank (and, for a save, this save)."""
    fault = planned_fault()
    if fault is None or fault.point != point or fault.rank not in (None, rank):
        return
    if saves_started is not None and saves_started <= fault.after_saves:
        return
    if fault.action == "raise":
        raise OSError(f"injected fault at {point}")
    if fault.action == "sleep":
        time.sleep(fault.seconds)
        return
    os.kill(os.getpid(), signal.SIGKILL)
