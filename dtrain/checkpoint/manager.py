"""The CheckpointManager: atomic, verified checkpoints through Accelerate's save_state/load_state.

The commit protocol (docs/checkpoints.md):
  1. rank 0 creates a fresh `.tmp-step_N` (one deterministic name shared by all ranks); agreement
  2. every rank calls `save_state` into it (or, with async saves, writes its host snapshot of the same state
     from a background thread); rank 0 adds `trainer_state.json`; agreement
  3. rank 0 hashes and fsyncs every file, writes `manifest.json` last, renames the temp dir to `step_N`,
     fsyncs `checkpoints/` and replaces the `latest` (and `best`) pointers atomically; agreement
  4. rank 0 applies retention to the lineage of `latest` (see lineage.py): rename to a `.trash-` name, then remove.
Each "agreement" is an all-reduce of an ok flag, so a rank that failed never leaves the others waiting in a
barrier, and every rank raises the same CheckpointError. A directory without a leading dot is always complete.

In an object store (`--checkpoint-dir s3://...`, storage.py) nothing can be renamed, and no rank's disk is seen
by the others, so steps 1-3 become:
  1. every rank creates a fresh local staging dir of its own (OUTPUT_DIR/.staging/step_N.rank_R); rank 0 deletes
     whatever an earlier attempt at step N left in the store; agreement
  2. every rank writes its `save_state` files there (rank 0 adds `trainer_state.json`); agreement
  3. every rank uploads the files it wrote under `step_N/` (a file several ranks wrote, by the lowest of them),
     hashing them as they go; agreement. Rank 0 gathers every rank's names, sizes and sha256, checks the sizes
     in the store and writes `manifest.json` LAST, create-only: that single write is the commit. Then the
     `latest`/`best` pointer objects (hints); agreement
  4. retention deletes a checkpoint's manifest first, then its other objects.
Resume downloads the checkpoint to each node's local staging dir (sha256 checked) and loads from there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from accelerate.logging import get_logger

from dtrain import rng
from dtrain.checkpoint.layout import (BEST, LATEST, TRAINER_STATE, current_lineage, parse_step, record_from_state,
                                      read_trainer_state, step_dir_name, temp_dir_name, verify_checkpoint,
                                      write_manifest)
from dtrain.checkpoint.lineage import child_ancestry
from dtrain.checkpoint.retention import CheckpointRecord, RetentionPolicy, best_checkpoint, checkpoints_to_delete
from dtrain.checkpoint.object_store import is_uri, local_path
from dtrain.checkpoint.snapshot import HostCopier, Snapshot, supports_snapshot, take_snapshot, writes_like_save_state
from dtrain.checkpoint.storage import CheckpointLocation, open_storage, split_checkpoint_uri
from dtrain.checkpoint.writer import TEXT, write_files
from dtrain.distributed import all_ranks_ok, gather_objects, new_side_group, run_and_agree
from dtrain.errors import CheckpointError, UsageError
from dtrain.utils import fsync_path, remove_tree

logger = get_logger(__name__)

# A checkpoint being replaced by a new save of its step waits under `.trash-step_N` + this until the new one is in.
REPLACED_SUFFIX = "-replaced"

# Points of the protocol after which tests inject faults (see `_reached`).
STAGES = ("temp_created", "state_written", "manifest_written", "renamed", "pointers_written", "retention_done")
# In an object store (no rename): after a rank's first uploaded file, and after all of them.
UPLOAD_STAGES = ("upload_started", "uploaded")
STAGING_DIR = ".staging"  # under the output dir: local copies of object-store checkpoints being saved or loaded
# Reached only by a save of a step whose directory exists: between moving the old one aside and renaming in the new.
RESAVE_STAGES = ("old_moved_aside",)


@dataclass
class SaveReport:
    step: int
    path: Path | str  # a directory, or the URI of an object-store checkpoint
    bytes: int
    blocking_seconds: float
    total_seconds: float
    deleted: list[str] = field(default_factory=list)


class CheckpointManager:
    """Saves, loads and prunes the checkpoints of one run directory. Call `save`/`load` on every rank."""

    def __init__(self, accelerator: Accelerator, checkpoints_dir: str | Path,
                 policy: RetentionPolicy = RetentionPolicy(), monitor: str = "val_loss",
                 verify_checksums: bool = False, async_save: bool = False, staging_dir: str | Path | None = None):
        """`checkpoints_dir`: a directory, or an object store URI (`s3://bucket/prefix`); then `staging_dir`
        (default `./.staging`) is where each node keeps its local copies while saving and loading."""
        self.accelerator = accelerator
        self.storage = open_storage(checkpoints_dir)
        self.remote = self.storage.is_remote
        self.dir: Path | None = None if self.remote else self.storage.dir  # the checkpoints directory, if local
        self.staging = Path(staging_dir or STAGING_DIR)
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
        self._last_bytes = 0  # size of the last committed checkpoint, to recognise a full disk
        self.async_save = async_save and supports_snapshot(accelerator)
        if async_save and not self.async_save:
            logger.warning(f"--async-save is not supported with {accelerator.distributed_type}: saving synchronously")
        self._copier = HostCopier()
        self._in_flight: threading.Thread | None = None
        self._copied: threading.Event | None = None  # set once an async save's deferred copy is done
        self._result: SaveReport | BaseException | None = None
        self._written: dict = {}  # name -> size and sha256 of the files this rank wrote for the save in progress
        self.background_error: BaseException | None = None
        # Background threads agree over their own gloo group, never over the training loop's (TorchTitan does
        # the same): collectives of two threads on one group could interleave or deadlock.
        self._side_group = new_side_group() if self.async_save else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ----------------------------------------------------------------------------------------- start-up

    def clean_stale(self) -> None:
        """Removes temp and trash directories (and half-written pointer files, `.latest.tmp-PID`) that a crash
        left behind (rank 0), then waits for it. A checkpoint an interrupted re-save had moved aside is put
        back first (see `restore_replaced`). In an object store: the prefixes without a manifest (uploads a
        crash cut short) and each node's local staging copies. A failure only warns: leftovers are never
        checkpoints."""
        if self.remote:
            self._clean_stale_remote()
            return

        def remove_leftovers() -> None:
            if not self.dir.is_dir():
                return
            self._restore_replaced_here()
            for path in self.dir.iterdir():
                if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
                    remove_tree(path)
                elif path.name.startswith(".") and ".tmp-" in path.name and not path.is_dir():
                    path.unlink(missing_ok=True)

        _, error = run_and_agree(remove_leftovers, self.is_main, self.accelerator.device)
        if error is not None:
            logger.warning(f"could not remove unfinished saves in {self.dir} ({type(error).__name__}: {error}); "
                           f"they are never used as checkpoints")

    def _clean_stale_remote(self) -> None:
        all_ranks_ok(True, self.accelerator.device)  # every rank has loaded what it resumed from out of staging
        if self.accelerator.is_local_main_process and self.staging.is_dir():
            for path in self.staging.iterdir():  # other nodes sharing this dir may be removing them too
                shutil.rmtree(path, ignore_errors=True)

        def remove_unfinished_uploads() -> None:
            for name in self.storage.step_names():
                if not self.storage.has_manifest(name):
                    self.storage.delete_objects(name)

        _, error = run_and_agree(remove_unfinished_uploads, self.is_main, self.accelerator.device)
        if error is not None:
            logger.warning(f"could not remove unfinished uploads in {self.storage.url()} ({type(error).__name__}: "
                           f"{error}); they are never used as checkpoints")

    def restore_replaced(self) -> None:
        """Puts back, as it was, a checkpoint that a crash caught while a new save of its step was replacing it
        (moved aside, the new one not yet renamed in): that save never committed (rank 0; then waits).
        Nothing to do in an object store, where a re-save deletes the old checkpoint first."""
        if self.remote:
            return
        _, error = run_and_agree(lambda: self.dir.is_dir() and self._restore_replaced_here(), self.is_main,
                                 self.accelerator.device)
        if error is not None:
            raise CheckpointError(f"could not put back a checkpoint moved aside by an interrupted re-save in "
                                  f"{self.dir}: {error}")

    def _restore_replaced_here(self) -> None:
        for aside in self.dir.glob(f".trash-step_*{REPLACED_SUFFIX}"):
            final = self.dir / aside.name[len(".trash-"):-len(REPLACED_SUFFIX)]
            if parse_step(final.name) is not None and not final.exists() and aside.is_dir():
                os.rename(aside, final)
                fsync_path(self.dir)
                logger.warning(f"a save of {final.name} was interrupted while replacing the previous "
                               f"{final.name}: that one is back, as it was")

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
        temp = self._staging_dir(step)
        self._saves_started += 1
        state = {**trainer_state, "checkpoint_metric": {"name": self.monitor, "value": metric},
                 "run_id": self.run_id, "parent": self.parent,
                 "ancestry": [{"run_id": run, "step": until} for run, until in self.ancestry]}
        self._on_all_ranks(step, temp, lambda: self._fresh_temp_dir(temp))
        if not self.async_save:
            self._on_all_ranks(step, temp, lambda: self._write_files(temp, state, None))
            return self._commit_and_prune(step, temp, started, blocking=None)
        # Parameters and optimizer state are copied by the background thread while the loop runs the next
        # forward/backward; before_optimizer_step() holds the loop only if that copy is not done by then.
        snapshot = take_snapshot(self.accelerator, self._copier, defer=True)
        self.last_saved_step = step
        timing = self._timing = {"started": started}
        self._copied = threading.Event()
        self._in_flight = threading.Thread(target=self._commit_in_background, name="dtrain-async-save",
                                           args=(step, temp, state, snapshot, timing, self._copied), daemon=True)
        self._in_flight.start()
        timing["blocking"] = time.perf_counter() - started  # after start(): the thread's launch holds us too
        return SaveReport(step, self.location(step), 0, timing["blocking"], float("nan"))

    def before_optimizer_step(self) -> None:
        """Call right before every optimizer.step(): waits until an async save's copy of the parameters and
        optimizer state is complete (usually it long is), so the step cannot change them under it."""
        copied = self._copied
        if copied is None:
            return
        started = time.perf_counter()
        while not copied.wait(0.1):  # short waits keep signal handlers responsive
            pass
        self._copied = None
        self._timing["blocking"] += time.perf_counter() - started  # the loop was held for the save

    def poll(self) -> SaveReport | None:
        """The report of a background save that has finished since the last call (non-blocking), else None.
        A failed one is kept in `background_error` (check it at an agreed point on every rank)."""
        if self._in_flight is None or self._in_flight.is_alive():
            return None
        return self._collect(raise_error=False)

    def wait(self, raise_error: bool = True) -> SaveReport | None:
        """Waits for the background save in flight, if any; returns its report or raises its error."""
        if self._in_flight is None:
            return None
        while self._in_flight.is_alive():
            self._in_flight.join(0.1)  # short joins keep signal handlers (a second Ctrl+C) responsive
        return self._collect(raise_error)

    def _collect(self, raise_error: bool) -> SaveReport | None:
        self._in_flight, result, self._result = None, self._result, None
        if isinstance(result, SaveReport):
            result.blocking_seconds = self._timing["blocking"]  # measured by save() on this thread
        if isinstance(result, BaseException):
            self.background_error = result
            if raise_error:
                raise result
            return None
        return result

    def _commit_in_background(self, step: int, temp: Path, state: dict[str, Any], snapshot: Snapshot,
                              timing: dict[str, float], copied: threading.Event) -> None:
        def copy_and_write() -> None:
            try:
                self._copier.copy_deferred()
            finally:
                copied.set()  # also on failure: the loop must not wait forever (the error comes with the report)
            self._write_files(temp, state, snapshot)

        try:
            self._on_all_ranks(step, temp, copy_and_write, self._side_group)
            self._result = self._commit_and_prune(step, temp, timing["started"], 0.0, self._side_group)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._result = exc
        finally:
            copied.set()  # whatever failed before the copy ran: before_optimizer_step() must never wait forever

    def _commit_and_prune(self, step: int, temp: Path, started: float, blocking: float | None,
                          group=None) -> SaveReport:
        outcome: dict[str, Any] = {}
        if self.remote:
            self._upload_and_commit(step, temp, outcome, group)
        else:
            self._on_all_ranks(step, temp, lambda: outcome.update(self._commit(temp, step)) if self.is_main else None,
                               group)
        deleted: list[str] = []
        self._after_commit(step, lambda: deleted.extend(self._apply_retention() if self.is_main else []), group)
        self.last_saved_step = step
        self._last_bytes = int(outcome.get("bytes", 0))
        if self.remote:
            shutil.rmtree(temp, ignore_errors=True)  # committed in the store: the local copy has done its job
        seconds = time.perf_counter() - started
        return SaveReport(step, self.location(step), self._last_bytes,
                          seconds if blocking is None else blocking, seconds, deleted)

    def _staging_dir(self, step: int) -> Path:
        """Where `save_state` writes: one temp dir that all ranks share, or, for an object store, a local
        staging dir per rank (so each rank knows which files it wrote, and no rank needs another's disk)."""
        if self.remote:
            return self.staging / f"{step_dir_name(step)}.rank{self.accelerator.process_index}"
        return self.dir / temp_dir_name(step)

    def _fresh_temp_dir(self, temp: Path) -> None:
        if self.remote:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
            if self.is_main:  # an earlier attempt at this step (uncommitted, or committed and now re-saved)
                self.storage.delete(temp.name.split(".")[0])
        elif self.is_main:
            if temp.exists():
                remove_tree(temp)
            temp.mkdir(parents=True)
        self._reached("temp_created")

    def _write_files(self, temp: Path, state: dict[str, Any], snapshot: Snapshot | None) -> None:
        """Writes this rank's files in one pass (hashed while written, fsynced: the commit need not re-read
        them) when a snapshot covers what save_state writes; otherwise through save_state itself."""
        files: list[tuple[str, str, Any]] = []
        if snapshot is None and writes_like_save_state(self.accelerator):
            snapshot = take_snapshot(self.accelerator, None)  # references: the loop waits for this save
        if snapshot is None:
            self.accelerator.save_state(str(temp))
        else:
            files = snapshot.files()
        if self.is_main:
            files.append((TRAINER_STATE, TEXT, json.dumps(state, indent=1, default=str)))
        self._written = write_files(temp, files)
        self._reached("state_written")

    def _commit(self, temp: Path, step: int) -> dict[str, Any]:
        total = write_manifest(temp, step, self._written)
        fsync_path(temp)
        self._reached("manifest_written")
        final = self.dir / step_dir_name(step)
        aside = None
        if final.exists():  # a re-save of this step (a damaged one that resume skipped, or another lineage's)
            # Moved aside, not deleted, until the new one is in: a crash in between leaves the old one to
            # put back (clean_stale), never neither.
            aside = self.dir / f".trash-{final.name}{REPLACED_SUFFIX}"
            if aside.exists():
                remove_tree(aside)
            os.rename(final, aside)
            self._reached("old_moved_aside")
        os.rename(temp, final)
        fsync_path(self.dir)
        self._reached("renamed")
        if aside is not None:
            remove_tree(aside)
        self._write_pointers(step)
        return {"bytes": total}

    def _write_pointers(self, step: int) -> None:
        self.storage.write_pointer(LATEST, step_dir_name(step))
        best = best_checkpoint(self.lineage(step), self.policy.mode)
        if best is not None:
            self.storage.write_pointer(BEST, step_dir_name(best.step))
        else:  # no checkpoint of this lineage has the metric: a `best` of another lineage must not count
            self.storage.delete_pointer(BEST)
        self._reached("pointers_written")

    # ----------------------------------------------------------------------------------------- object store

    def _upload_and_commit(self, step: int, temp: Path, outcome: dict[str, Any], group) -> None:
        """Step 3 in an object store: every rank uploads what it wrote, rank 0 commits with the manifest."""
        name = step_dir_name(step)
        # A file that several ranks wrote (scaler.pt) is uploaded once, by the lowest of them.
        written = sorted(str(p.relative_to(temp)) for p in temp.rglob("*") if p.is_file())
        owners: dict[str, int] = {}
        for rank, names in enumerate(gather_objects(written, group)):
            for file in names:
                owners.setdefault(file, rank)
        mine = [f for f in written if owners[f] == self.accelerator.process_index]
        uploaded: dict[str, dict] = {}

        def upload() -> None:
            started = threading.Event()

            def file_done(_name: str) -> None:
                if not started.is_set():
                    started.set()
                    self._reached("upload_started")

            uploaded.update(self.storage.upload(temp, name, mine, progress=self.is_main, on_file_done=file_done))
            self._reached("uploaded")

        self._on_all_ranks(step, temp, upload, group)
        everything: dict[str, dict] = {}
        for files in gather_objects(uploaded, group):
            everything.update(files)

        def commit() -> None:
            if TRAINER_STATE not in everything:
                raise OSError(f"{TRAINER_STATE} was not uploaded")
            self.storage.check_uploaded(name, everything)
            outcome["bytes"] = self.storage.commit(name, step, everything)  # the manifest: the commit
            self._reached("manifest_written")
            self._write_pointers(step)

        self._on_all_ranks(step, temp, commit if self.is_main else lambda: None, group)

    def fetch(self, location: CheckpointLocation) -> Path:
        """A checkpoint as a local directory that every rank can load from (call on every rank): a directory as
        it is; an object-store checkpoint downloaded by each node's first process into its staging dir (only the
        files its ranks need), every file's sha256 checked against the manifest. Raises UsageError."""
        if not is_uri(location):
            return local_path(location)
        store, name = split_checkpoint_uri(location)
        acc = self.accelerator
        node = acc.process_index - acc.local_process_index  # the first rank of this node names its copy
        node_ranks = {rank for first, rank in gather_objects((node, acc.process_index)) if first == node}
        dest = self.staging / f"restore.node{node}" / name

        def wanted(file: str) -> bool:
            match = re.fullmatch(r"random_states_(\d+)\.pkl", file)
            return match is None or int(match.group(1)) in node_ranks

        error: Exception | None = None
        if acc.is_local_main_process:
            try:
                shutil.rmtree(dest, ignore_errors=True)
                store.download(name, dest, wanted, progress=True)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                error = exc
        if not all_ranks_ok(error is None, acc.device):
            reason = f"{type(error).__name__}: {error}" if error else "the download failed on another node"
            raise UsageError(f"--resume: cannot download {location} ({reason}); resume from an older checkpoint "
                             f"with --resume PATH")
        return dest

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

    def _on_all_ranks(self, step: int, temp: Path, action: Callable[[], Any], group=None) -> None:
        """Runs one protocol phase on this rank, then agrees with all ranks that it worked everywhere."""
        error: BaseException | None = None
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the agreement below
            error = exc
        if all_ranks_ok(error is None, self.accelerator.device, group):
            return
        if (self.is_main or self.remote) and temp.exists():  # a remote save's staging dirs are per rank
            shutil.rmtree(temp, ignore_errors=True)
        reason = f"{type(error).__name__}: {error}" if error else "another rank failed"
        raise CheckpointError(f"saving checkpoint {step_dir_name(step)} failed ({reason}){self._disk_hint()}; "
                              f"earlier checkpoints and pointers are unchanged") from error

    def _after_commit(self, step: int, action: Callable[[], Any], group=None) -> None:
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
        local = self.staging if self.remote else self.dir
        try:
            free = shutil.disk_usage(local).free
        except OSError:
            return ""
        if free >= max(self._last_bytes, 1 << 20):
            return ""
        return f"; the disk holding {local} is probably full ({free / 2**20:.1f} MiB free)"

    def _reached(self, stage: str) -> None:
        """Fault injection for tests: DTRAIN_FAULT_AT=<stage> makes this process die there with SIGKILL
        (`<stage>:raise` raises an OSError instead, `<stage>:sleep=S` pauses S seconds),
        in the first save after DTRAIN_FAULT_AFTER_SAVES (default 0) saves of this process, on every rank or
        on rank DTRAIN_FAULT_RANK only."""
        fault = os.environ.get("DTRAIN_FAULT_AT", "")
        fault_rank = os.environ.get("DTRAIN_FAULT_RANK")  # only this rank (default: every rank)
        if (fault.split(":")[0] == stage
                and (fault_rank is None or int(fault_rank) == self.accelerator.process_index)
                and self._saves_started > int(os.environ.get("DTRAIN_FAULT_AFTER_SAVES", "0"))):
            if fault.endswith(":raise"):
                raise OSError(f"injected fault at {stage}")
            if ":sleep=" in fault:  # hold the save here, e.g. to signal a process in the middle of one
                time.sleep(float(fault.split(":sleep=")[1]))
                return
            os.kill(os.getpid(), 9)

    # ----------------------------------------------------------------------------------------- reading

    def lineage(self, head_step: int) -> list[CheckpointRecord]:
        """The checkpoints `head_step` descends from (itself included), with the monitored metric."""
        return current_lineage(self.storage, self.monitor, head_step)[0]

    def load(self, path: str | Path, fallback_seed: int = 0) -> dict[str, Any]:
        """Restores the prepared objects and this rank's RNG from a checkpoint; returns its trainer state."""
        path = Path(path)
        state = read_trainer_state(path)
        self.accelerator.load_state(str(path))
        rng.restore(path, self.accelerator.process_index, fallback_seed=fallback_seed + int(state.get("global_step", 0)))
        self.resumed_from = self.last_saved_step = int(state.get("global_step", parse_step(path.name) or 0))
        self.parent = path.name
        self.ancestry = child_ancestry(record_from_state(state, self.resumed_from))
        return state

    def verify(self, path: str | Path, checksums: bool | None = None):
        """Verifies a checkpoint directory or object-store checkpoint URI."""
        checksums = self.verify_checksums if checksums is None else checksums
        if is_uri(path):
            store, name = split_checkpoint_uri(str(path))
            return store.verify(name, checksums)
        return verify_checkpoint(Path(path), checksums)



