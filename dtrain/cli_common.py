"""What every dtrain command shares: argument errors as `dtrain: error:` lines and exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from dtrain.errors import CheckpointError, Interrupted, UsageError


class DtrainArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one clear line
        raise UsageError(message)


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_main(action: Callable[[], Any]) -> int:
    """Runs a command and maps its outcome to CONTRACT exit codes (0, 1, 2, 128+N)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file INFO lines drown ours
    every_rank_here = False  # True when all ranks are known to end here together (finished, agreed interrupt)
    try:
        action()
        every_rank_here = True
        return 0
    except UsageError as exc:
        if is_rank_zero():
            print(f"dtrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except CheckpointError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        every_rank_here = True
        return exc.exit_code
    finally:
        _close_process_group(every_rank_here)


def _close_process_group(every_rank_here: bool) -> None:
    if "torch.distributed" not in sys.modules:  # never imported: nothing to close, and no import cost
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if every_rank_here:
            # Nobody tears the group down while a peer may still be talking to it (a gloo rank whose peer
            # closed its sockets first was seen to abort at exit). Skipped after errors: a barrier could hang.
            dist.barrier()
        dist.destroy_process_group()
