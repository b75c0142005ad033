"""Committing a checkpoint in a local directory that every rank sees: a shared temp dir, renamed into place.

  1. rank 0 creates a fresh `.tmp-step_N` (one deterministic name shared by all ranks)
  2. every rank writes its files into it (the manager's job)
  3. rank 0 hashes and fsyncs what it did not write itself, writes `manifest.json` last, renames the temp dir to
     `step_N`, fsyncs the checkpoints dir and replaces the `latest` (and `best`) pointers atomically.
A directory without a leading dot is therefore always complete. A re-save of a step whose directory exists moves
the old one aside (`.trash-step_N-replaced`) until the new one is in: a crash in between leaves the old one to put
back (`restore_replaced`), never neither.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from accelerate import Accelerator
from accelerate.logging import get_logger

from dtrain.checkpoint.commit import Phases
from dtrain.checksum import DEFAULT_CHECKSUM
from dtrain.checkpoint.layout import (checkpoint_files, file_owner, hash_and_sync, parse_step, step_dir_name,
                                     temp_dir_name, write_manifest)
from dtrain.checkpoint.storage import LocalDirectory
from dtrain.distributed import gather_objects, run_and_agree
from dtrain.errors import CheckpointError
from dtrain.utils import fsync_path, remove_owned_tree, remove_tree

logger = get_logger(__name__)

# A checkpoint being replaced by a new save of its step waits under `.trash-step_N` + this until the new one is in.
REPLACED_SUFFIX = "-replaced"
# The points of a local save, in order (fault injection: dtrain/faults.py). `old_moved_aside` is reached only by a
# save of a step whose directory exists, between moving the old one aside and renaming in the new one.
STAGES = ("temp_created", "state_written", "manifest_written", "renamed", "pointers_written", "retention_done")
RESAVE_STAGES = ("old_moved_aside",)


class LocalCommit:
    """The rename commit into `storage.dir` (see the module docstring)."""

    stages = STAGES + RESAVE_STAGES
    durable_staging = True  # the staging dir becomes the checkpoint

    def __init__(self, storage: LocalDirectory, accelerator: Accelerator, reached: Callable[[str], None],
                 checksum: str = DEFAULT_CHECKSUM):
        self.storage = storage
        self.dir = storage.dir
        self.accelerator = accelerator
        self._reached = reached
        self.checksum = checksum  # the manifest's algorithm (checksum.py)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ----------------------------------------------------------------------------------------- saving

    def staging_dir(self, step: int) -> Path:
        return self.dir / temp_dir_name(step)

    def prepare(self, temp: Path) -> None:
        if self.is_main:
            if os.path.lexists(temp):  # a link left in its place is removed itself, never followed
                remove_tree(temp)
            temp.mkdir(parents=True)

    def commit(self, step: int, temp: Path, written: Mapping[str, Any], phases: Phases,
               write_pointers: Callable[[], None]) -> int:
        # Every rank hashes (and fsyncs) the files it wrote itself, at once, instead of rank 0 reading them all.
        mine: dict[str, Any] = {}
        phases(lambda: mine.update(self._hash_own_files(temp, written)))
        everything: dict[str, Any] = {}
        for part in gather_objects(mine, phases.group):
            everything.update(part)
        outcome: dict[str, int] = {}
        phases(lambda: outcome.update(bytes=self._rename_into_place(step, temp, everything, write_pointers)),
              self.is_main)
        return outcome.get("bytes", 0)

    def _hash_own_files(self, temp: Path, written: Mapping[str, Any]) -> dict[str, Any]:
        rank = self.accelerator.process_index
        own = [name for name in checkpoint_files(temp) if file_owner(name) == rank and name not in written]
        return {**written, **hash_and_sync(temp, own, self.checksum)}

    def _rename_into_place(self, step: int, temp: Path, written: Mapping[str, Any], write_pointers) -> int:
        total = write_manifest(temp, step, written, self.checksum)
        fsync_path(temp)
        self._reached("manifest_written")
        final = self.dir / step_dir_name(step)
        aside = None
        if os.path.lexists(final):  # a re-save of this step (a damaged one resume skipped, another lineage's)
            aside = self.dir / f".trash-{final.name}{REPLACED_SUFFIX}"
            if os.path.lexists(aside):
                remove_tree(aside)
            os.rename(final, aside)
            self._reached("old_moved_aside")
        os.rename(temp, final)
        fsync_path(self.dir)
        self._reached("renamed")
        if aside is not None:
            remove_tree(aside)
        write_pointers()
        return total

    def discard(self, temp: Path) -> None:
        if self.is_main:
            remove_owned_tree(temp, self.dir)

    def finished(self, temp: Path) -> None:
        pass  # the temp dir is now the checkpoint

    def disk(self) -> Path:
        return self.dir

    # ----------------------------------------------------------------------------------------- start-up

    def clean_stale(self) -> None:
        """Removes temp and trash directories (and half-written pointer files, `.latest.tmp-PID`) that a crash
        left behind (rank 0), after putting back a checkpoint an interrupted re-save had moved aside. A failure
        only warns: leftovers are never checkpoints."""
        def remove_leftovers() -> None:
            if not self.dir.is_dir():
                return
            self._restore_replaced_here()
            for path in self.dir.iterdir():  # a link among them is removed itself, its target untouched
                if path.name.startswith((".tmp-", ".trash-")) and (path.is_symlink() or path.is_dir()):
                    remove_tree(path)
                elif path.name.startswith(".") and ".tmp-" in path.name and not path.is_dir():
                    path.unlink(missing_ok=True)

        _, error = run_and_agree(remove_leftovers, self.is_main, self.accelerator.device)
        if error is not None:
            logger.warning(f"could not remove unfinished saves in {self.dir} ({type(error).__name__}: {error}); "
                           f"they are never used as checkpoints")

    def restore_replaced(self) -> None:
        """Puts back, as it was, a checkpoint that a crash caught while a new save of its step was replacing it
        (moved aside, the new one not yet renamed in): that save never committed (rank 0; then waits)."""
        _, error = run_and_agree(lambda: self.dir.is_dir() and self._restore_replaced_here(), self.is_main,
                                 self.accelerator.device)
        if error is not None:
            raise CheckpointError(f"could not put back a checkpoint moved aside by an interrupted re-save in "
                                  f"{self.dir}: {error}")

    def _restore_replaced_here(self) -> None:
        for aside in self.dir.glob(f".trash-step_*{REPLACED_SUFFIX}"):
            final = self.dir / aside.name[len(".trash-"):-len(REPLACED_SUFFIX)]
            if parse_step(final.name) is not None and not os.path.lexists(final) and not aside.is_symlink() \
                    and aside.is_dir():
                os.rename(aside, final)
                fsync_path(self.dir)
                logger.warning(f"a save of {final.name} was interrupted while replacing the previous "
                               f"{final.name}: that one is back, as it was")
