"""The one small interface between the commit protocol (manager.py) and where checkpoints are committed.

The CheckpointManager runs the same protocol whatever the storage: a fresh staging dir, every rank writes its
files there, the commit, the pointers, retention; each phase agreed by all ranks. What "staging dir" and
"commit" mean is a `Commit`'s job:

- `LocalCommit` (local_commit.py): one temp dir that all ranks share, renamed into place (POSIX directories);
- `StoreCommit` (store_commit.py): a local staging dir per rank, uploaded, with the manifest written last
  (object stores, where nothing can be renamed and no rank sees another's disk).

A new kind (a node-local tier, a sharded backend) is a new class with these methods, chosen in
`manager.open_commit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from dtrain.checkpoint.storage import CheckpointStorage
from dtrain.distributed import run_and_agree



class Phases:
    """Runs the phases of one save: `phases(action, here)` runs `action` on this rank (when `here`), then agrees
    with every rank that it worked everywhere; when it failed anywhere, `on_failure(this rank's error or None)`
    raises on every rank, so no rank is left waiting for one that already gave up."""

    def __init__(self, device, group, on_failure: Callable[[BaseException | None], None]):
        self.device = device
        self.group = group  # None: the training loop's group; a side group for a save in a background thread
        self._on_failure = on_failure

    def __call__(self, action: Callable[[], Any], here: bool = True) -> None:
        ok, error = run_and_agree(action, here, self.device, self.group)
        if not ok:
            self._on_failure(error)


class Commit(Protocol):
    storage: CheckpointStorage
    stages: tuple[str, ...]  # the points of a save where tests inject faults (dtrain/faults.py), in order
    durable_staging: bool  # whether the staging files must reach the disk (False: a copy on its way elsewhere)

    def staging_dir(self, step: int) -> Path:
        """Where this rank writes the files of the checkpoint of `step`."""

    def prepare(self, temp: Path) -> None:
        """Makes the staging dir empty and ready (every rank)."""

    def commit(self, step: int, temp: Path, written: Mapping[str, Any], phases: Phases,
               write_pointers: Callable[[], None]) -> int:
        """Commits what every rank wrote (every rank calls it, inside `phase`s); returns the checkpoint's bytes.
        `written`: size and checksum of the files this rank wrote; `write_pointers` updates `latest`/`best`
        (rank 0, once the checkpoint is committed). Every step that can fail runs inside `phases`."""

    def discard(self, temp: Path) -> None:
        """Removes what a failed save left in staging (every rank)."""

    def finished(self, temp: Path) -> None:
        """After a committed save (every rank)."""

    def clean_stale(self) -> None:
        """Removes what crashed saves left behind (every rank calls it; may agree)."""

    def restore_replaced(self) -> None:
        """Puts back a checkpoint that a crash caught being replaced by a new save of its step."""

    def disk(self) -> Path:
        """The local directory whose disk the save fills (to recognise a full one)."""


@dataclass
class SaveReport:
    """What one committed save cost and did."""

    step: int
    path: Path | str  # a directory, or the URI of an object-store checkpoint
    bytes: int
    blocking_seconds: float  # how long the training loop was held
    total_seconds: float
    deleted: list[str] = field(default_factory=list)  # checkpoints retention removed after it
