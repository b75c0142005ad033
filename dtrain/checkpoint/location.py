"""Where checkpoints live, decided in one place: a run's checkpoints directory or object store, and what a path
or URI that a user gives (`--checkpoint-dir`, `--resume PATH`, `dtrain ckpt ... PATH`) stands for.

A location is a plain path or `file://` URI (a local directory, committed by rename) or an object store URI
(`s3://bucket/prefix`, `gs://...`, `memory://...`, committed by writing the manifest last). Unless
`--checkpoint-dir` says otherwise, a run's checkpoints are in OUTPUT_DIR/checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

from dtrain.checkpoint.layout import TRAINER_STATE, parse_step
from dtrain.checkpoint.storage import CheckpointLocation, CheckpointStorage, LocalDirectory, RemoteStore
from dtrain.errors import UsageError

CHECKPOINTS_DIR = "checkpoints"  # under the output dir, unless --checkpoint-dir names another place


def is_uri(location: str | os.PathLike) -> bool:
    """True for an object store URI (`s3://bucket/prefix`, `gs://...`, `memory://...`); False for a plain path
    or a `file://` URI, which are local directories with the rename commit."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """A plain path or `file://` URI as a local path."""
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def run_checkpoints(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None
                    ) -> CheckpointLocation:
    """Where a run keeps its checkpoints: `checkpoint_dir` (a directory or URI) if given, else OUTPUT_DIR/checkpoints."""
    if checkpoint_dir:
        return str(checkpoint_dir) if is_uri(checkpoint_dir) else local_path(checkpoint_dir)
    return Path(output_dir) / CHECKPOINTS_DIR


def open_storage(location: str | os.PathLike) -> LocalDirectory | RemoteStore:
    """The storage behind a checkpoints location: an object store URI, or a directory (plain path or file://)."""
    return RemoteStore(str(location)) if is_uri(location) else LocalDirectory(local_path(location))


def as_storage(checkpoints: CheckpointStorage | str | os.PathLike) -> CheckpointStorage:
    """A checkpoints location as its storage; a storage as it is."""
    return checkpoints if hasattr(checkpoints, "step_names") else open_storage(checkpoints)


def split_checkpoint_uri(uri: str) -> tuple[RemoteStore, str]:
    """`s3://bucket/prefix/step_000000120` -> (the store of `s3://bucket/prefix`, "step_000000120")."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return RemoteStore(parent), name


def storage_and_name(checkpoint: CheckpointLocation) -> tuple[CheckpointStorage, str]:
    """One checkpoint (a directory, or the URI of an object-store checkpoint) as (its storage, its name)."""
    if is_uri(checkpoint):
        return split_checkpoint_uri(str(checkpoint).rstrip("/"))
    path = local_path(checkpoint)
    return LocalDirectory(path.parent), path.name


def is_one_checkpoint(location: str | os.PathLike) -> bool:
    """Whether a path or URI names one checkpoint (rather than a run or its checkpoints)."""
    if is_uri(location):
        return parse_step(str(location).rstrip("/").rpartition("/")[2]) is not None
    path = local_path(location)
    return (path / TRAINER_STATE).exists() or parse_step(path.name) is not None


def storage_of_run(location: str | os.PathLike) -> CheckpointStorage:
    """The checkpoints of a run given by its output dir, its checkpoints dir, or the URI its checkpoints went to."""
    if is_uri(location):
        return open_storage(str(location))
    path = local_path(location)
    if (path / CHECKPOINTS_DIR).is_dir():
        return LocalDirectory(path / CHECKPOINTS_DIR)
    if path.is_dir():
        return LocalDirectory(path)
    raise UsageError(f"{location} is not a run directory (no {CHECKPOINTS_DIR}/ inside)")
