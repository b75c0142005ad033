"""The CheckpointManager: the commit protocol, the same for every storage, and loading.

A save (docs/checkpoints.md), on every rank:
  1. a fresh staging dir (`Commit.prepare`); agreement
  2. every rank writes its files there: the files `Accelerator.save_state` writes, written by dtrain's one-pass
     writer from the same listing (snapshot.py; through `save_state` itself where that listing does not cover
     everything, e.g. sharded state or registered objects), hashed while written; rank 0 adds
     `trainer_state.json`; agreement. With `--async-save` this runs in a background thread from a host copy.
  3. the commit (`Commit.commit`: rename in a local directory, manifest-last in an object store), then the
     `latest` (and `best`) pointers; agreement
  4. rank 0 applies retention to the lineage of `latest` (lineage.py); agreement.
Each "agreement" is an all-reduce of an ok flag, so a rank that failed never leaves the others waiting in a
barrier, and every rank raises the same CheckpointError. Where the commit happens is the `Commit`'s business
(commit.py): this module has no branch on the kind of storage.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

from dtrain import faults, rng
from dtrain.checkpoint.background import BackgroundSave
from dtrain.checksum import DEFAULT_CHECKSUM, check_algorithm
from dtrain.checkpoint.commit import Commit, Phases, SaveReport
from dtrain.checkpoint.layout import BEST, LATEST, TRAINER_STATE, parse_step, read_trainer_state, step_dir_name
from dtrain.checkpoint.lineage import child_ancestry
from dtrain.checkpoint.loading import check_registered_state, load_prepared_state
from dtrain.checkpoint.local_commit import LocalCommit
from dtrain.checkpoint.location import is_uri, local_path, open_storage, storage_and_name
from dtrain.checkpoint.records import current_lineage, record_from_state
from dtrain.checkpoint.retention import CheckpointRecord, RetentionPolicy, best_checkpoint, checkpoints_to_delete
from dtrain.checkpoint.sharded import check_sharded, is_sharded
from dtrain.checkpoint.snapshot import HostCopier, Snapshot, supports_snapshot, take_snapshot, writes_like_save_state
from dtrain.checkpoint.storage import CheckpointLocation, CheckpointStorage
from dtrain.checkpoint.store_commit import STAGING_DIR, StoreCommit, download_for_node
from dtrain.checkpoint.writer import TEXT, write_files
from dtrain.distributed import new_side_group, run_and_agree
from dtrain.errors import CheckpointError

logger = get_logger(__name__)

__all__ = ["CheckpointManager", "SaveReport", "STAGING_DIR"]


def open_commit(storage: CheckpointStorage, accelerator: Accelerator, staging: Path, reached,
                checksum: str = DEFAULT_CHECKSUM) -> Commit:
    """The Commit for a storage: the rename commit for a directory, manifest-last for an object store."""
    if storage.is_remote:
        return StoreCommit(storage, accelerator, staging, reached, checksum)
    return LocalCommit(storage, accelerator, reached, checksum)


class CheckpointManager:
    """Saves, loads and prunes the checkpoints of one run. Call `save`/`load` on every rank."""

    def __init__(self, accelerator: Accelerator, checkpoints_dir: str | Path,
                 policy: RetentionPolicy = RetentionPolicy(), monitor: str = "val_loss",
                 verify_checksums: bool = True, async_save: bool = False, staging_dir: str | Path | None = None,
                 checksum: str = DEFAULT_CHECKSUM):
        """`checkpoints_dir`: a directory, or an object store URI (`s3://bucket/prefix`); then `staging_dir`
        (default `./.staging`) is where each node keeps its local copies while saving and loading."""
        self.accelerator = accelerator
        self.storage = open_storage(checkpoints_dir)
        self.storage.remember_trainer_states()  # this run holds the lock: nobody else changes its checkpoints
        self.dir: Path | None = None if self.storage.is_remote else self.storage.dir  # the directory, if local
        self.staging = Path(staging_dir or STAGING_DIR)
        check_algorithm(checksum)
        self.checksum = checksum  # the manifest's per-file checksum (checksum.py)
        self.commit = open_commit(self.storage, accelerator, self.staging, lambda point: self._reached(point),
                                  checksum)
        self.policy = policy
        self.monitor = monitor
        self.verify_checksums = verify_checksums
        self.resumed_from: int | None = None
        # The lineage (lineage.py) every checkpoint of this run records: a fresh id, the checkpoint the run
        # started from and the runs that one descends from (set by `load`).
        self.run_id = uuid.uuid4().hex[:12]
        self.parent: str | None = None
        self.ancestry: tuple[tuple[str | None, int], ...] = ()
        self.last_saved_step: int | None = None
        self._saves_started = 0  # for fault injection (DTRAIN_FAULT_AFTER_SAVES)
        self._registered_checked = False  # registered objects' state loads with weights_only (loading.py)
        self._last_bytes = 0  # size of the last committed checkpoint, to recognise a full disk
        self.async_save = async_save and supports_snapshot(accelerator)
        if async_save and not self.async_save:
            logger.warning(f"--async-save is not supported with {accelerator.distributed_type}: saving synchronously")
        self._copier = HostCopier()
        self._background = BackgroundSave()
        self._written: dict = {}  # name -> size and checksum of the files this rank wrote for the save in progress
        # Background threads agree over their own gloo group, never over the training loop's (TorchTitan does
        # the same): collectives of two threads on one group could interleave or deadlock.
        self._side_group = new_side_group() if self.async_save else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def background_error(self) -> BaseException | None:
        """A background save that failed on this rank (check it at an agreed point on every rank)."""
        return self._background.error

    # ----------------------------------------------------------------------------------------- start-up

    def clean_stale(self) -> None:
        """Removes what crashed saves left behind (temp and trash dirs, unfinished uploads, staging copies)."""
        self.commit.clean_stale()

    def restore_replaced(self) -> None:
        """Puts back a checkpoint that a crash caught while a new save of its step was replacing it."""
        self.commit.restore_replaced()

    def discard_all(self) -> int:
        """For `--overwrite`: moves every checkpoint and pointer out of the way (rank 0). Returns how many."""
        existing = self.storage.step_names()

        def discard() -> None:
            for pointer in (LATEST, BEST):
                self.storage.delete_pointer(pointer)
            for name in existing:
                self.storage.delete(name)  # in an object store, the manifest first

        ok, error = run_and_agree(discard, self.is_main, self.accelerator.device)
        if not ok:  # every rank raises, so none waits for rank 0 at the next collective
            reason = f"{type(error).__name__}: {error}" if error else "it failed on the main process"
            raise CheckpointError(f"--overwrite could not delete the old checkpoints in {self.storage.url()} "
                                  f"({reason})")
        return len(existing)

    def location(self, step: int) -> Path | str:
        """Where the checkpoint of `step` is (or will be): a directory, or an object store URI."""
        return self.storage.location(step_dir_name(step))

    # ----------------------------------------------------------------------------------------- saving

    def save(self, step: int, trainer_state: dict[str, Any], metric: float | None = None) -> SaveReport:
        """Commits a checkpoint of the prepared objects at `step` (call on every rank).

        Synchronous: returns once committed. With `async_save`: returns once the state is copied to host
        memory; files are written and committed in the background with the same protocol (see `poll`/`wait`).
        Raises CheckpointError on any rank's failure, the previous background save's included.
        """
        started = time.perf_counter()
        self.wait()  # at most one save in flight; waiting for it counts as blocking
        temp = self.commit.staging_dir(step)
        self._saves_started += 1
        state = self.checkpoint_state(trainer_state, metric)
        phases = self._phases(step, temp, None)
        if not self._registered_checked:  # once: a checkpoint they would make unloadable fails the first save
            phases(lambda: check_registered_state(self.accelerator))
            self._registered_checked = True
        phases(lambda: self._prepare(temp))
        if not self.async_save:
            self._write_files(temp, state, phases)
            return self._commit_and_prune(step, temp, started, phases)
        # Parameters and optimizer state are copied by the background thread while the loop runs the next
        # forward/backward; before_optimizer_step() holds the loop only if that copy is not done by then.
        snapshot = take_snapshot(self.accelerator, self._copier, defer=True)
        self.last_saved_step = step
        self._background.start(lambda copied: self._save_in_background(step, temp, state, snapshot, copied,
                                                                       started), started)
        return SaveReport(step, self.location(step), 0, self._background.blocking_seconds, float("nan"))

    def checkpoint_state(self, trainer_state: dict[str, Any], metric: float | None) -> dict[str, Any]:
        """The trainer_state.json of a checkpoint of this run: the trainer's state, the monitored metric and
        the lineage (also what the node-local tier writes, so that a promoted local checkpoint fits in)."""
        return {**trainer_state, "checkpoint_metric": {"name": self.monitor, "value": metric},
                "run_id": self.run_id, "parent": self.parent,
                "ancestry": [{"run_id": run, "step": until} for run, until in self.ancestry]}

    def commit_copy(self, step: int, source: Path, names: list[str]) -> SaveReport:
        """Commits, with the same protocol as a save, a checkpoint whose files exist elsewhere (a node-local one
        being promoted): every rank copies `names` (the files it would have written) from its own `source`
        directory into the staging dir. Call on every rank."""
        def copy(temp: Path) -> None:
            for name in names:
                (temp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, temp / name)
            self._written = {}  # hashed (and fsynced) by the commit, from what was copied

        return self._commit_now(step, lambda temp, phases: phases(lambda: copy(temp)))

    def commit_loaded(self, step: int, trainer_state: dict[str, Any]) -> SaveReport:
        """Commits, synchronously, the state this run has just loaded, under the trainer state it was loaded with
        (its lineage included): a sharded node-local checkpoint being promoted. Call on every rank."""
        return self._commit_now(step, lambda temp, phases: self._write_files(temp, trainer_state, phases))

    def _commit_now(self, step: int, write) -> SaveReport:
        """A synchronous commit of `step` whose files `write(temp, phases)` puts in the staging dir, in phases
        (every rank)."""
        started = time.perf_counter()
        self.wait()
        temp = self.commit.staging_dir(step)
        phases = self._phases(step, temp, None)
        phases(lambda: self._prepare(temp))
        write(temp, phases)
        return self._commit_and_prune(step, temp, started, phases)

    def before_optimizer_step(self) -> None:
        """Call right before every optimizer.step(): waits until an async save's copy of the parameters and
        optimizer state is complete (usually it long is), so the step cannot change them under it."""
        self._background.before_optimizer_step()

    def poll(self) -> SaveReport | None:
        """The report of a background save that has finished since the last call (non-blocking), else None.
        A failed one is kept in `background_error`."""
        return self._background.poll()

    def wait(self, raise_error: bool = True) -> SaveReport | None:
        """Waits for the background save in flight, if any; returns its report or raises its error."""
        return self._background.wait(raise_error)

    def _save_in_background(self, step: int, temp: Path, state: dict[str, Any], snapshot: Snapshot,
                            copied: threading.Event, started: float) -> SaveReport:
        def copy() -> None:
            try:
                self._copier.copy_deferred()
            finally:
                copied.set()  # also on failure: the loop must not wait forever (the error comes with the report)
            self._reached("host_copied")

        phases = self._phases(step, temp, self._side_group)
        phases(copy)
        self._write_files(temp, state, phases, snapshot)
        return self._commit_and_prune(step, temp, started, phases, blocking=0.0)

    def _prepare(self, temp: Path) -> None:
        self.commit.prepare(temp)
        self._reached("temp_created")

    def _write_files(self, temp: Path, state: dict[str, Any], phases: Phases, snapshot: Snapshot | None = None) -> None:
        """Writes this rank's files in one pass (hashed while written, fsynced: the commit need not re-read
        them) when a snapshot covers what save_state writes; otherwise through save_state itself.

        The snapshot (taken here unless given) and the writing are agreed phases of their own: the shards' write
        is collective, and a rank that failed before it must tell the others, or they would wait inside DCP's
        write until the collective timeout."""
        if snapshot is None and writes_like_save_state(self.accelerator):
            taken: list[Snapshot] = []

            def take() -> None:
                taken.append(take_snapshot(self.accelerator, None))  # references: the loop waits for this save
                self._reached("host_copied")

            phases(take)
            snapshot = taken[0]
        phases(lambda: self._write_snapshot(temp, state, snapshot))

    def _write_snapshot(self, temp: Path, state: dict[str, Any], snapshot: Snapshot | None) -> None:
        files: list[tuple[str, str, Any]] = []
        if snapshot is None:
            self.accelerator.save_state(str(temp))
        else:
            if snapshot.sharded:  # every rank's shards, over the background thread's own group
                snapshot.write_sharded(temp, self._side_group)
            files = snapshot.files()
        if self.is_main:
            files.append((TRAINER_STATE, TEXT, json.dumps(state, indent=1, default=str)))
        self._written = write_files(temp, files, self.checksum, fsync=self.commit.durable_staging,
                                    on_file_written=getattr(self.commit, "file_written", None))
        self._reached("state_written")

    def _commit_and_prune(self, step: int, temp: Path, started: float, phases: Phases,
                          blocking: float | None = None) -> SaveReport:
        self._last_bytes = self.commit.commit(step, temp, self._written, phases, lambda: self._write_pointers(step))
        deleted: list[str] = []
        self._after_commit(step, lambda: deleted.extend(self._apply_retention() if self.is_main else []),
                           phases.group)
        self.last_saved_step = step
        self.commit.finished(temp)
        seconds = time.perf_counter() - started
        return SaveReport(step, self.location(step), self._last_bytes,
                          seconds if blocking is None else blocking, seconds, deleted)

    def _write_pointers(self, step: int) -> None:
        self.storage.write_pointer(LATEST, step_dir_name(step))
        best = best_checkpoint(self.lineage(step), self.policy.mode)
        if best is not None:
            self.storage.write_pointer(BEST, step_dir_name(best.step))
        else:  # no checkpoint of this lineage has the metric: a `best` of another lineage must not count
            self.storage.delete_pointer(BEST)
        self._reached("pointers_written")

    def _apply_retention(self) -> list[str]:
        """Deletes what the policy does not keep. Runs after the commit, so a failure here loses nothing."""
        latest = self.storage.read_pointer(LATEST)
        latest_step = parse_step(latest) if latest is not None else None
        protected = {latest_step} if latest_step is not None else set()
        if self.resumed_from is not None and (self.last_saved_step or -1) <= self.resumed_from:
            protected.add(self.resumed_from)  # until this run has committed a newer one
        deleted = []
        # Only the lineage of `latest`: other lineages' checkpoints are left to `dtrain ckpt prune`.
        lineage = self.lineage(latest_step) if latest_step is not None else []
        for step in checkpoints_to_delete(lineage, self.policy, protected):
            try:
                self.storage.delete(step_dir_name(step))  # an object store's manifest goes first
                deleted.append(step_dir_name(step))
            except OSError as exc:
                logger.warning(f"retention could not delete {step_dir_name(step)}: {exc}")
        return deleted

    def _phases(self, step: int, temp: Path, group) -> Phases:
        """The agreed phases of the save of `step`: a failure anywhere cleans up and raises on every rank."""
        def failed(error: BaseException | None) -> None:
            self.commit.discard(temp)
            reason = f"{type(error).__name__}: {error}" if error else "another rank failed"
            raise CheckpointError(f"saving checkpoint {step_dir_name(step)} failed ({reason}){self._disk_hint()}; "
                                  f"earlier checkpoints and pointers are unchanged") from error

        return Phases(self.accelerator.device, group, failed)

    def _after_commit(self, step: int, action, group) -> None:
        """Post-commit work (retention) inside an agreement, like every phase before it: an exception on rank 0
        here reaches every rank as the same CheckpointError instead of leaving them waiting for rank 0."""
        def work() -> None:
            action()
            self._reached("retention_done")

        ok, error = run_and_agree(work, True, self.accelerator.device, group)
        if not ok:
            reason = f"{type(error).__name__}: {error}" if error else "it failed on another rank"
            raise CheckpointError(f"checkpoint {step_dir_name(step)} was committed, but the work after the "
                                  f"commit (retention) failed ({reason})") from error

    def _disk_hint(self) -> str:
        """Names a full disk, which torch.save reports only as an obscure 'unexpected pos' error."""
        local = self.commit.disk()
        try:
            free = shutil.disk_usage(local).free
        except OSError:
            return ""
        if free >= max(self._last_bytes, 1 << 20):
            return ""
        return f"; the disk holding {local} is probably full ({free / 2**20:.1f} MiB free)"

    def _reached(self, point: str) -> None:
        faults.reached(point, self.accelerator.process_index, self._saves_started)

    # ----------------------------------------------------------------------------------------- reading

    def lineage(self, head_step: int) -> list[CheckpointRecord]:
        """The checkpoints `head_step` descends from (itself included), with the monitored metric."""
        return current_lineage(self.storage, self.monitor, head_step)[0]

    def fetch(self, location: CheckpointLocation) -> Path:
        """A checkpoint as a local directory that every rank can load from (call on every rank): a directory as
        it is; an object-store checkpoint downloaded by each node's first process (checksums checked)."""
        if is_uri(location):
            return download_for_node(str(location), self.accelerator, self.staging)
        return local_path(location)

    def load(self, path: str | Path, trainer_state: dict[str, Any] | None = None,
             fallback_seed: int = 0) -> dict[str, Any]:
        """Restores the prepared objects and this rank's RNG from a checkpoint; returns its trainer state
        (`trainer_state`: as the caller already read it, else read here). Nothing is unpickled beyond plain
        data (loading.py); a file that cannot be loaded raises (the caller's `agreed_load` tells every rank)."""
        path = Path(path)
        state = read_trainer_state(path) if trainer_state is None else trainer_state
        if is_sharded(path):
            check_sharded(path)  # DCP unpickles its index and values: refuse crafted ones before it reads them
        load_prepared_state(self.accelerator, path)  # load_state, with registered objects read weights_only
        rng.restore(path, self.accelerator.process_index, fallback_seed=fallback_seed + int(state.get("global_step", 0)))
        self.resumed_from = self.last_saved_step = int(state.get("global_step", parse_step(path.name) or 0))
        self.parent = path.name
        self.ancestry = child_ancestry(record_from_state(state, self.resumed_from))
        return state

    def verify(self, path: str | Path, checksums: bool | None = None):
        """Verifies a checkpoint directory or object-store checkpoint URI."""
        checksums = self.verify_checksums if checksums is None else checksums
        storage, name = storage_and_name(path)
        return storage.verify(name, checksums)
