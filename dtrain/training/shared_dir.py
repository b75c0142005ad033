"""Every node must see the same checkpoint directory: checked at start-up, because otherwise each node would
resume from whatever its own disk holds and the ranks would silently train from different checkpoints.

Only what must be shared is checked: the output dir when the checkpoints live in it (the default), the
checkpoint dir when it is elsewhere, nothing when checkpoints go to an object store (every node then keeps only
local staging copies, and logs stay on rank 0's disk).

Rank 0 writes a marker with a fresh random token; the first process of every node reads it back. A node that
does not find the token is looking at another directory (a node-local disk, another mount), and the run is
refused on every rank with one error that names the hosts.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

from dtrain.errors import UsageError
from dtrain.utils import atomic_write_text

MARKER = ".dtrain-shared-check"


def directory_every_node_must_see(output_dir: Path, checkpoints_dir: Path | None) -> Path | None:
    """The directory the start-up check is about; None (nothing) for checkpoints in an object store."""
    if checkpoints_dir is None:
        return None
    output_dir, checkpoints_dir = Path(output_dir).absolute(), Path(checkpoints_dir).absolute()
    return output_dir if checkpoints_dir.is_relative_to(output_dir) else checkpoints_dir


def check_every_node_sees(directory: Path, accelerator) -> None:
    """Call on every rank, after rank 0 created `directory`. A no-op in a single process."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    from dtrain.distributed import run_and_agree

    token = secrets.token_hex(16)
    written, error = run_and_agree(lambda: atomic_write_text(directory / MARKER, token), accelerator.is_main_process,
                                   accelerator.device)
    if not written:
        raise UsageError(f"cannot write to {directory}: {error or 'failed on rank 0'}")
    token = broadcast_object_list([token], from_process=0)[0]
    sees = True
    if accelerator.is_local_main_process:  # ranks of one node share its filesystem
        try:
            sees = (directory / MARKER).read_text() == token
        except OSError:
            sees = False
    blind = sorted({host for host, ok in gather_object([(socket.gethostname(), sees)]) if not ok})
    if blind:
        raise UsageError(f"{directory} is not the same directory on every node: the node(s) {', '.join(blind)} "
                         f"do not see what rank 0 wrote there; put it on a filesystem that every node mounts at the "
                         f"same path, or --checkpoint-dir in an object store (s3://bucket/prefix)")
