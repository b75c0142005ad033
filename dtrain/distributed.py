"""Tiny cross-rank agreements built on one all-reduce, and the time limits that keep them from waiting forever.

Every rank must call the agreements at the same points. A peer that died on this machine closes its sockets
and the others' collectives fail at once; a peer that hangs, or a node that vanished without closing its
connections, only shows up as a collective that never completes. So every collective here carries the run's
collective timeout (`--collective-timeout-seconds`, set once per process by `set_collective_timeout`), and
the exit barrier waits at most `EXIT_BARRIER_SECONDS`.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

DEFAULT_COLLECTIVE_TIMEOUT = 600.0  # seconds; Accelerate's NCCL default, a third of torch's gloo default
EXIT_BARRIER_SECONDS = 30.0  # ranks that all reach the end arrive together; longer means a peer is gone

_collective_timeout = DEFAULT_COLLECTIVE_TIMEOUT


def set_collective_timeout(seconds: float) -> None:
    """The limit for collectives of this process: process groups created afterwards and the exit barrier."""
    global _collective_timeout
    _collective_timeout = float(seconds)


def collective_timeout() -> timedelta:
    return timedelta(seconds=_collective_timeout)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_max(values: list[float], device: torch.device | str = "cpu", group=None) -> list[float]:
    """Element-wise maximum over ranks (identity in a single process). `group`: a side group (CPU tensors)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device="cpu" if group is not None else device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def all_ranks_ok(ok: bool, device: torch.device | str = "cpu", group=None) -> bool:
    """True only if every rank reports ok. Doubles as a barrier that cannot hang when a rank failed."""
    return all_reduce_max([0.0 if ok else 1.0], device, group)[0] == 0.0


def run_and_agree(action: Callable[[], Any], run: bool = True, device: torch.device | str = "cpu",
                  group=None) -> tuple[bool, Exception | None]:
    """Runs `action` on this rank (if `run`), then agrees with every rank that it worked everywhere.

    Returns (all ranks ok, this rank's error). The pattern for work that only some ranks do before the others
    go on (rank 0 creating a directory, taking the run lock): an exception there must reach the agreement,
    or the ranks that did not fail would wait for a rank that already left.
    """
    error: Exception | None = None
    if run:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the agreement below
            error = exc
    return all_ranks_ok(error is None, device, group), error


def new_side_group():
    """A separate gloo group for collectives issued from a background thread (never the training group)."""
    return dist.new_group(backend="gloo", timeout=collective_timeout()) if is_distributed() else None


def barrier() -> None:
    """A plain barrier. After work that can fail on some ranks only, use `run_and_agree` instead: a rank that
    raised before the barrier would leave the others waiting until the collective timeout."""
    if is_distributed():
        dist.barrier()


def bounded_barrier(seconds: float) -> bool:
    """A barrier that gives up after `seconds`: True when every rank arrived, False when one did not (or the
    group failed). After False, the pending barrier may never complete: exit without tearing the group down."""
    if not is_distributed():
        return True
    try:
        work = dist.barrier(async_op=True)
        deadline = time.monotonic() + seconds
        while not work.is_completed():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        work.wait()  # raises if the barrier failed (a peer closed its connections)
        return True
    except RuntimeError:
        return False


def exit_barrier_seconds() -> float:
    return min(_collective_timeout, EXIT_BARRIER_SECONDS)


# How gloo, NCCL and the TCP store word a peer that is gone (closed connections) or silent (a timeout).
_LOST_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                       "Broken pipe", "NCCL communicator was aborted", "Watchdog caught collective")


def is_lost_peer(exc: BaseException) -> bool:
    """Whether an exception says a collective failed because another rank is gone or hangs."""
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _LOST_PEER_MESSAGES)


def gather_objects(value, group=None) -> list:
    """Every rank's `value` (small and picklable), in rank order, on every rank; `[value]` in one process."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out
