"""What every dtrain command shares: argument errors as `dtrain: error:` lines and exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any, Callable

from dtrain import faults, redact
from dtrain.errors import CheckpointError, Interrupted, UsageError


class DtrainArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one clear line
        raise UsageError(message)


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def print_error(message: str) -> None:
    """One `dtrain: error:` line, written with a single write: the ranks share the launcher's pipe, and
    `print` writes the text and its newline separately, so two ranks' errors could run together on one line."""
    sys.stderr.write(f"dtrain: error: {redact.redact_uri(message)}\n")
    sys.stderr.flush()


def run_main(action: Callable[[], Any], on_exit: Callable[[int], None] | None = None) -> int:
    """Runs a command and maps its outcome to exit codes (0, 1, 2, 128+N); `on_exit(code)` runs last, on
    every path (an unexpected exception counts as 1).

    Leaving never waits without a bound: the ranks meet once more at a barrier of at most
    `exit_barrier_seconds()` (only when all of them are known to end here together); a rank that cannot
    confirm its peers leaves at once with `os._exit`, since tearing down a group with a pending collective, or
    the interpreter's own shutdown, could wait for a peer that will never answer.
    """
    from dtrain.training.time_budget import begin_invocation

    begin_invocation()  # --max-time counts from here (the first command of a process: from its start)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file INFO lines drown ours
    redact.install()  # log lines and tracebacks never show a URI's credentials
    every_rank_here = False  # True when all ranks are known to end here together (finished, agreed interrupt)
    code = 1
    try:
        action()
        every_rank_here, code = True, 0
    except UsageError as exc:
        if is_rank_zero():
            print_error(str(exc))
        code = exc.exit_code
    except CheckpointError as exc:
        print_error(str(exc))
        code = exc.exit_code
    except Interrupted as exc:
        every_rank_here, code = True, exc.exit_code
    except Exception as exc:
        if not _in_process_group():
            raise  # a single process: the interpreter prints the traceback and exits 1
        # In a group the traceback is printed here, because leaving may have to skip the interpreter's exit.
        sys.stderr.write(redact.redact_uri(traceback.format_exc()))
        if _is_lost_peer(exc):
            first_line = (str(exc).splitlines() or [""])[0][:300]
            print_error(f"rank {os.environ.get('RANK', '?')} lost contact with another rank ({type(exc).__name__}: "
                        f"{first_line}); stopping without saving: committed checkpoints are intact, resume with "
                        f"--resume latest")
    finally:
        if on_exit is not None:
            on_exit(code)  # before leaving: a rank whose peer is gone leaves with os._exit below
        if not _close_process_group(every_rank_here):
            _leave_now(code)
    return code


def _in_process_group() -> bool:
    if "torch.distributed" not in sys.modules:  # never imported: no group, and no import cost
        return False
    from dtrain.distributed import is_distributed

    return is_distributed()


def _is_lost_peer(exc: BaseException) -> bool:
    from dtrain.distributed import is_lost_peer

    return is_lost_peer(exc)


def _close_process_group(every_rank_here: bool) -> bool:
    """Tears the process group down; False when a peer may be gone and this process should leave at once."""
    if "torch.distributed" not in sys.modules:
        return True
    import torch.distributed as dist

    from dtrain.distributed import bounded_barrier, exit_barrier_seconds, is_distributed

    if not (dist.is_available() and dist.is_initialized()):
        return True
    if is_distributed():
        # After an error a peer may be anywhere (in a training collective, or gone): a barrier could pair
        # with another collective, so skip it and leave without a teardown that might wait for that peer.
        if not every_rank_here:
            return False
        faults.reached("exit_barrier", dist.get_rank())  # tests: a peer that hangs or whose node vanished
        # Nobody tears the group down while a peer may still be talking to it (a gloo rank whose peer closed
        # its sockets first was seen to abort at exit); a peer that does not come within the bound is gone.
        if not bounded_barrier(exit_barrier_seconds()):
            sys.stderr.write(f"dtrain: rank {dist.get_rank()}: another rank did not reach the end within "
                             f"{exit_barrier_seconds():.0f}s; leaving without waiting for it\n")  # one write
            return False
    dist.destroy_process_group()
    return True


def _leave_now(code: int) -> None:
    """Exits with `code` without the interpreter's shutdown, which can block on a process group whose peer is
    gone. Output is flushed first; the run lock is an flock that the kernel drops with the process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
