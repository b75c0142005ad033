"""The node-local checkpoint tier: frequent saves to each node's own fast disk (a RAM disk, a local SSD).

Layout. `--local-checkpoint-dir` (formatted per process: `{node_rank}`, `{rank}`) is this node's tier. The ranks
that share one such directory on one host are a "node" of the tier, numbered in the order of their first rank.
Under the tier dir, `node_{i}/` holds node i's checkpoints in the layout of a checkpoints dir (`step_%09d/` with a
manifest, `latest`): a node's own in `node_{own}/`, the copies it keeps for peers (replication.py) in theirs.

What a node's checkpoint holds: what its ranks need to resume. In a full-state (DDP) run every rank holds the
whole model and optimizer state, so each node's first process writes it (model.safetensors, optimizer.bin,
scheduler.bin, ...) with trainer_state.json, and each rank its RNG file: the files `save_state` writes, minus
the other nodes' RNG files (and the objects registered with `register_for_checkpointing`, written by each node's
first process). `Accelerator.load_state` loads it as it is. In a sharded (FSDP2) run each rank holds
only its shards, so each writes them on its own, `shards_rank{R}/` (a DCP directory per model and optimizer that
indexes rank R's chunks only, sharded.py), which rank R alone reads back in a run of the same world size; the
first process writes the rest (scheduler.bin, trainer_state.json). Such a checkpoint is not a persistent one:
promoting it re-saves the state once loaded (tier_recovery.py).

A save is the commit protocol of the persistent tier, per node (every rank calls it; the background thread's own
gloo group): the node's first process makes a fresh `.tmp-step_N`; every rank writes its files there (hashed
while written, fsynced); the first process writes the manifest LAST, renames the temp dir to `step_N` and
replaces `latest`; then the copies go to the next `--local-replicas` nodes (committed there the same way); then
retention keeps the newest 2 of each `node_*` dir. Each phase is agreed by every rank, so a failure anywhere
raises the same CheckpointError everywhere. Asynchronous: the loop is held only for the host copy (snapshot.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

from dtrain import faults
from dtrain.checkpoint.background import BackgroundSave
from dtrain.checkpoint.commit import Phases, SaveReport
from dtrain.checkpoint.layout import TRAINER_STATE, hash_and_sync, parse_step, step_dir_name, step_dirs, temp_dir_name, \
    write_manifest
from dtrain.checkpoint.loading import check_registered_state
from dtrain.checkpoint.snapshot import HostCopier, Snapshot, take_snapshot, writes_node_checkpoints
from dtrain.checkpoint.storage import LocalDirectory
from dtrain.checkpoint.writer import TEXT, write_files
from dtrain.checksum import DEFAULT_CHECKSUM
from dtrain.distributed import gather_objects, new_side_group, run_and_agree
from dtrain.errors import CheckpointError, UsageError
from dtrain.utils import fsync_path, remove_owned_tree, remove_tree

logger = get_logger(__name__)

KEEP = 2  # checkpoints kept per node dir: the newest, and the one before it in case the newest is damaged
NODE_DIR = re.compile(r"node_([0-9]+)")
# The points of a local save, in order (fault injection: dtrain/faults.py); replication.py adds its own.
STAGES = ("local_temp_created", "local_state_written", "local_renamed", "local_replicated", "local_retention_done")


def node_dir_name(node: int) -> str:
    return f"node_{node}"


def node_rank() -> int:
    """The launcher's node rank (torchrun's GROUP_RANK), 0 without one."""
    return int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")) or 0)


def tier_dir(template: str, rank: int) -> Path:
    """This process's local tier directory: `template` with `{node_rank}` and `{rank}` replaced."""
    return Path(template.format(node_rank=node_rank(), rank=rank)).expanduser()


@dataclass(frozen=True)
class Nodes:
    """The nodes of the tier: the ranks that share one local directory on one host."""

    index: int  # this process's node
    members: tuple[tuple[int, ...], ...]  # the ranks of each node, in node order

    @property
    def count(self) -> int:
        return len(self.members)

    def first(self, node: int) -> int:
        return self.members[node][0]

    def is_first(self, rank: int) -> bool:
        return self.first(self.index) == rank


def find_nodes(directory: Path, rank: int) -> Nodes:
    """Every rank's host and local dir, gathered: which ranks form a node, in the order of their first rank."""
    mine = (socket.gethostname(), os.path.abspath(directory))
    keys = gather_objects(mine)
    order: dict[tuple, list[int]] = {}
    for r, key in enumerate(keys):
        order.setdefault(tuple(key), []).append(r)
    members = tuple(tuple(ranks) for ranks in order.values())  # dicts keep insertion order: by first rank
    return Nodes(next(i for i, ranks in enumerate(members) if rank in ranks), members)


class LocalTier:
    """Saves and prunes this node's local checkpoints and the replicas it keeps. Call `save` on every rank."""

    def __init__(self, accelerator: Accelerator, template: str, replicas: int | None = None,
                 checksum: str = DEFAULT_CHECKSUM, async_save: bool = True):
        if not writes_node_checkpoints(accelerator):
            raise UsageError("invalid value for local_checkpoint_dir: the node-local tier needs a run whose state "
                             "dtrain writes itself (no prepared dataloaders or save-state hooks, no "
                             "save_on_each_node); use --checkpoint-dir alone")
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.base = tier_dir(template, self.rank)
        self.nodes = find_nodes(self.base, self.rank)
        wanted = (1 if self.nodes.count > 1 else 0) if replicas is None else replicas
        self.replicas = min(wanted, self.nodes.count - 1)
        if wanted > self.replicas:
            logger.warning(f"--local-replicas {wanted}: only {self.nodes.count - 1} other node(s) can keep a copy")
        self.dir = self.base / node_dir_name(self.nodes.index)  # this node's own checkpoints
        self.checksum = checksum
        self.async_save = async_save
        self.group = new_side_group()  # saves run in a background thread: never on the training loop's group
        self.device = accelerator.device
        self._copier = HostCopier()
        self._background = BackgroundSave()
        self._written: dict = {}
        self.saves_started = 0
        self.last_saved_step: int | None = None

    @property
    def is_first(self) -> bool:
        """Whether this process writes its node's shared files (its lowest rank)."""
        return self.nodes.is_first(self.rank)

    def location(self, step: int) -> Path:
        return self.dir / step_dir_name(step)

    def describe(self) -> str:
        return (f"local tier {self.base} (node {self.nodes.index} of {self.nodes.count}, "
                f"{self.replicas} replica(s) on other nodes)")

    # ----------------------------------------------------------------------------------------- saving

    def save(self, step: int, state: dict[str, Any], wait: bool = False) -> SaveReport | None:
        """Saves this step to the local tier (every rank). Returns at once after the host copy (the report comes
        from `poll`/`wait`), or, with `wait` (or async off), once committed and replicated, with its report.
        Raises CheckpointError when a synchronous save fails; a background failure is kept in `error`."""
        started = time.perf_counter()
        self.wait(raise_error=False)
        self.saves_started += 1
        self.last_saved_step = step
        if not (self.async_save and not wait):
            snapshot = take_snapshot(self.accelerator, None, full_state=self.is_first)
            return self._save(step, state, snapshot, None, started)
        snapshot = take_snapshot(self.accelerator, self._copier, defer=True, full_state=self.is_first)
        self._background.start(lambda copied: self._save(step, state, snapshot, copied, started), started)
        return None

    def before_optimizer_step(self) -> None:
        """Holds the loop until a background save's copy of parameters and optimizer state is done."""
        self._background.before_optimizer_step()

    def poll(self) -> SaveReport | None:
        return self._background.poll()

    def wait(self, raise_error: bool = True) -> SaveReport | None:
        return self._background.wait(raise_error)

    @property
    def error(self) -> BaseException | None:
        return self._background.error

    def clear_error(self) -> BaseException | None:
        error, self._background.error = self._background.error, None
        return error

    def _save(self, step: int, state: dict[str, Any], snapshot: Snapshot, copied: threading.Event | None,
              started: float) -> SaveReport:
        from dtrain.checkpoint.replication import replicate

        temp = self.dir / temp_dir_name(step)
        phases = Phases(self.device, self.group, lambda error: self._failed(step, temp, error))
        if self.saves_started == 1:  # registered objects that weights_only could not read back fail the first save
            phases(lambda: check_registered_state(self.accelerator))
        phases(lambda: self._prepare(temp), self.is_first)
        self._reached("local_temp_created")
        phases(lambda: self._write(temp, state, snapshot, copied))
        node_files: dict[str, Any] = {}
        for rank, written in enumerate(gather_objects(self._written, self.group)):
            if rank in self.nodes.members[self.nodes.index]:
                node_files.update(written)
        size: dict[str, int] = {}
        phases(lambda: size.update(bytes=self._commit(step, temp, node_files)), self.is_first)
        phases(lambda: replicate(self, step))
        self._reached("local_replicated")
        phases(self._apply_retention, self.is_first)
        self._reached("local_retention_done")
        seconds = time.perf_counter() - started
        return SaveReport(step, self.location(step), size.get("bytes", 0), seconds if copied is None else 0.0,
                          seconds)

    def _prepare(self, temp: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(temp):
            remove_tree(temp)
        temp.mkdir()

    def _write(self, temp: Path, state: dict[str, Any], snapshot: Snapshot, copied: threading.Event | None) -> None:
        if copied is not None:
            try:
                self._copier.copy_deferred()
            finally:
                copied.set()  # also on failure: the loop must never wait forever
        files = snapshot.files()
        if self.is_first:
            files.append((TRAINER_STATE, TEXT, json.dumps(state, indent=1, default=str)))
        self._written = write_files(temp, files, self.checksum)
        if snapshot.sharded:  # this rank's shards (FSDP2), indexed on their own: no node holds the others'
            self._written.update(hash_and_sync(temp, snapshot.write_rank_shards(temp), self.checksum))
        self._reached("local_state_written")

    def _commit(self, step: int, temp: Path, written: dict[str, Any]) -> int:
        total = write_manifest(temp, step, written, self.checksum)  # last: the files are all there
        fsync_path(temp)
        final = self.location(step)
        if os.path.lexists(final):  # a re-save of this step (after a resume from it): the new one replaces it
            remove_tree(final)
        os.rename(temp, final)
        fsync_path(self.dir)
        self._reached("local_renamed")
        LocalDirectory(self.dir).write_pointer("latest", final.name)
        return total

    def _failed(self, step: int, temp: Path, error: BaseException | None) -> None:
        if self.is_first:
            try:
                remove_owned_tree(temp, self.dir)
            except OSError:
                pass  # a leftover .tmp- is never a checkpoint; the next start removes it
        reason = f"{type(error).__name__}: {error}" if error else "another rank failed"
        raise CheckpointError(f"local checkpoint {step_dir_name(step)} in {self.dir} failed ({reason}); earlier "
                              f"local checkpoints are unchanged") from error

    def _reached(self, point: str) -> None:
        faults.reached(point, self.rank, self.saves_started)

    # ----------------------------------------------------------------------------------------- upkeep

    def node_dirs(self) -> dict[int, Path]:
        """node -> its directory in this node's tier (its own and the replicas it keeps); never a link."""
        if not self.base.is_dir():
            return {}
        found = {}
        for path in self.base.iterdir():
            match = NODE_DIR.fullmatch(path.name)
            if match and not path.is_symlink() and path.is_dir():
                found[int(match.group(1))] = path
        return found

    def _apply_retention(self) -> None:
        for directory in self.node_dirs().values():
            for old in step_dirs(directory)[:-KEEP]:
                remove_tree(old)

    def forget(self, newer_than: int | None = None) -> None:
        """On every rank: removes the leftovers of crashed saves and, on each node's first process, the local
        checkpoints above `newer_than` (None: all of them). A run that resumed from step S (or started fresh)
        abandons what came after S: retention must not keep those in place of the checkpoints it writes."""
        def tidy() -> None:
            for directory in self.node_dirs().values():
                for path in directory.iterdir():
                    step = parse_step(path.name)
                    stale = path.name.startswith((".tmp-", ".trash-"))
                    if stale or (step is not None and (newer_than is None or step > newer_than)):
                        remove_tree(path)
                latest = LocalDirectory(directory).read_pointer("latest")
                kept = step_dirs(directory)
                if kept and latest != kept[-1].name:
                    LocalDirectory(directory).write_pointer("latest", kept[-1].name)
                elif not kept:
                    LocalDirectory(directory).delete_pointer("latest")

        _, error = run_and_agree(tidy, self.is_first, self.device)
        if error is not None:
            logger.warning(f"could not tidy the local tier {self.base} ({type(error).__name__}: {error})")
