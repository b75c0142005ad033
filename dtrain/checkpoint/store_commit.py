"""Committing a checkpoint in an object store, where nothing can be renamed and no rank sees another's disk.

  1. every rank creates a fresh local staging dir of its own (OUTPUT_DIR/.staging/step_N.rank_R); rank 0 deletes
     whatever an earlier attempt at step N left in the store
  2. every rank writes its files there (the manager's job)
  3. every rank uploads the files it wrote under `step_N/` (a file several ranks wrote, by the lowest of them),
     hashing them as they go. Rank 0 owns every file it writes, so it starts uploading each one as soon as it is
     written, while the next is still being serialised (`file_written`): the staging copy costs little more
     than the upload itself. Rank 0 gathers every rank's names, sizes and checksums, checks the sizes in the store
     and writes `manifest.json` LAST, create-only: that single write is the commit. Then the `latest`/`best`
     pointer objects (hints).
Retention deletes a checkpoint's manifest first, then its other objects (object_store.py). Resume downloads a
checkpoint to each node's local staging dir, checksums checked (`download_for_node`).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

from accelerate import Accelerator
from accelerate.logging import get_logger

from dtrain.checksum import DEFAULT_CHECKSUM
from dtrain.checkpoint.commit import Phases
from dtrain.checkpoint.layout import TRAINER_STATE, step_dir_name
from dtrain.checkpoint.location import split_checkpoint_uri
from dtrain.checkpoint.names import regular_files
from dtrain.checkpoint.storage import RemoteStore
from dtrain.distributed import all_ranks_ok, gather_objects, run_and_agree
from dtrain.errors import UsageError
from dtrain.utils import remove_owned_tree

logger = get_logger(__name__)

EARLY_UPLOADS = 4  # rank 0's files uploaded at the same time while the save is still writing
STAGING_DIR = ".staging"  # under the output dir: local copies of object-store checkpoints being saved or loaded
# The entries dtrain makes in a staging dir (a save's `step_N.rankR`, a resume's `restore.nodeN`): the only ones
# it ever deletes there, so a staging dir that is a link to a fast disk (or anywhere) loses nothing else.
STAGING_ENTRY = re.compile(r"step_[0-9]{9}\.rank[0-9]+|restore\.node[0-9]+")
# The points of an object-store save, in order (fault injection: dtrain/faults.py): after a rank's first uploaded
# file, after all of them, after the manifest (the commit).
STAGES = ("temp_created", "state_written", "upload_started", "uploaded", "manifest_written", "pointers_written",
          "retention_done")


class StoreCommit:
    """The manifest-last commit into an object store (see the module docstring)."""

    stages = STAGES
    durable_staging = False  # the local copy only feeds the upload: the manifest in the store is the commit

    def __init__(self, storage: RemoteStore, accelerator: Accelerator, staging: Path,
                 reached: Callable[[str], None], checksum: str = DEFAULT_CHECKSUM):
        self.storage = storage
        self.accelerator = accelerator
        self.staging = staging
        self._reached = reached
        self.checksum = checksum  # the manifest's algorithm (checksum.py), computed while uploading
        self._temp: Path | None = None  # the staging dir of the save in progress
        self._early: dict[str, Future] = {}  # rank 0's uploads started as each file was written
        self._uploads: ThreadPoolExecutor | None = None  # created at the first early upload
        self._upload_started = threading.Event()
        # Step prefixes that may hold objects: listed once, then every step this process tried to save. A step
        # outside it has nothing to delete before its save (the start removed unfinished uploads).
        self._may_hold: set[str] | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ----------------------------------------------------------------------------------------- saving

    def staging_dir(self, step: int) -> Path:
        """A local dir per rank, so each rank knows which files it wrote and no rank needs another's disk."""
        return self.staging / f"{step_dir_name(step)}.rank{self.accelerator.process_index}"

    def prepare(self, temp: Path) -> None:
        remove_owned_tree(temp, self.staging)
        temp.mkdir(parents=True)
        self._temp, self._early = temp, {}
        self._upload_started.clear()
        if self.is_main:  # an earlier attempt at this step (uncommitted, or committed and now re-saved)
            name = temp.name.split(".")[0]
            if self._may_hold is None:
                self._may_hold = set(self.storage.step_names())
            if name in self._may_hold:
                self.storage.delete(name)
            self._may_hold.add(name)

    def file_written(self, file: str) -> None:
        """Called as each file this rank writes is complete: rank 0 starts its upload right away (any rank's
        upload of a file rank 0 also wrote would be skipped: the lowest rank uploads a shared file)."""
        if not self.is_main or self._temp is None:
            return
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(EARLY_UPLOADS, thread_name_prefix="dtrain-upload")
        self._early[file] = self._uploads.submit(self._upload_one, self._temp, file)

    def commit(self, step: int, temp: Path, written: Mapping[str, Any], phases: Phases,
               write_pointers: Callable[[], None]) -> int:
        name = step_dir_name(step)
        group = phases.group
        # A file that several ranks wrote (scaler.pt) is uploaded once, by the lowest of them.
        files = regular_files(temp)
        owners: dict[str, int] = {}
        for rank, names in enumerate(gather_objects(files, group)):
            for file in names:
                owners.setdefault(file, rank)
        mine = [f for f in files if owners[f] == self.accelerator.process_index]
        uploaded: dict[str, dict] = {}
        phases(lambda: uploaded.update(self._upload(temp, name, mine)))
        everything: dict[str, dict] = {}
        for part in gather_objects(uploaded, group):
            everything.update(part)
        outcome: dict[str, int] = {}

        def write_manifest() -> None:
            if TRAINER_STATE not in everything:
                raise OSError(f"{TRAINER_STATE} was not uploaded")
            self.storage.check_uploaded(name, everything)
            outcome["bytes"] = self.storage.commit(name, step, everything)  # the manifest: the commit
            self._reached("manifest_written")
            write_pointers()

        phases(write_manifest, self.is_main)
        return outcome.get("bytes", 0)

    def _upload(self, temp: Path, name: str, files: list[str]) -> dict[str, dict]:
        early = {file: self._early[file] for file in files if file in self._early}
        rest = [file for file in files if file not in early]
        uploaded = self.storage.upload(temp, name, rest, progress=self.is_main, on_file_done=self._file_uploaded,
                                       algorithm=self.checksum) if rest else {}
        for file, future in early.items():
            uploaded[file] = future.result()  # an early upload's error fails this phase, on every rank
        self._reached("uploaded")
        return uploaded

    def _upload_one(self, temp: Path, file: str) -> dict:
        meta = self.storage.upload_file(temp, temp.name.split(".")[0], file, self.checksum)
        self._file_uploaded(file)
        return meta

    def _file_uploaded(self, _file: str) -> None:
        if not self._upload_started.is_set():
            self._upload_started.set()
            self._reached("upload_started")

    def _wait_for_early_uploads(self) -> None:
        for future in self._early.values():  # none may still read a staging file that is being removed
            future.exception()
        self._early = {}

    def discard(self, temp: Path) -> None:
        self._wait_for_early_uploads()
        remove_owned_tree(temp, self.staging)  # every rank has a staging dir of its own

    def finished(self, temp: Path) -> None:
        self._wait_for_early_uploads()
        remove_owned_tree(temp, self.staging)  # committed in the store: the local copy has done its job

    def disk(self) -> Path:
        return self.staging

    # ----------------------------------------------------------------------------------------- start-up

    def clean_stale(self) -> None:
        """Removes each node's local staging copies and the prefixes without a manifest (uploads a crash cut
        short). A failure only warns: leftovers are never checkpoints."""
        all_ranks_ok(True, self.accelerator.device)  # every rank has loaded what it resumed from out of staging
        if self.accelerator.is_local_main_process and self.staging.is_dir():
            for path in self.staging.iterdir():  # other nodes sharing this dir may be removing them too
                if STAGING_ENTRY.fullmatch(path.name):  # only what dtrain made; a link: the link itself
                    remove_owned_tree(path, self.staging)

        def remove_unfinished_uploads() -> None:
            for name in self.storage.step_names():
                if not self.storage.has_manifest(name):
                    self.storage.delete_objects(name)

        _, error = run_and_agree(remove_unfinished_uploads, self.is_main, self.accelerator.device)
        if error is not None:
            logger.warning(f"could not remove unfinished uploads in {self.storage.url()} ({type(error).__name__}: "
                           f"{error}); they are never used as checkpoints")

    def restore_replaced(self) -> None:
        pass  # a re-save deletes the old checkpoint first: nothing is ever moved aside


def download_for_node(uri: str, accelerator: Accelerator, staging: Path) -> Path:
    """An object-store checkpoint as a local directory every rank can load from (call on every rank): each node's
    first process downloads the files its ranks need into its staging dir, every file's checksum checked against
    the manifest. Raises UsageError on every rank when any download failed."""
    store, name = split_checkpoint_uri(uri)
    acc = accelerator
    node = acc.process_index - acc.local_process_index  # the first rank of this node names its copy
    node_ranks = {rank for first, rank in gather_objects((node, acc.process_index)) if first == node}
    dest = staging / f"restore.node{node}" / name

    def wanted(file: str) -> bool:
        match = re.fullmatch(r"random_states_(\d+)\.pkl", file)
        return match is None or int(match.group(1)) in node_ranks

    def download() -> None:
        remove_owned_tree(dest, dest.parent)
        store.download(name, dest, wanted, progress=True)

    ok, error = run_and_agree(download, acc.is_local_main_process, acc.device)
    if not ok:
        reason = f"{type(error).__name__}: {error}" if error else "the download failed on another node"
        raise UsageError(f"--resume: cannot download {uri} ({reason}); resume from an older checkpoint "
                         f"with --resume PATH")
    return dest
