"""Which checkpoint a name means, decided in one place: `--resume none|latest|best|auto|PATH` (training), `--which
best|latest` of a run (`dtrain ckpt`, `eval`, `export`) and a pipeline stage's `init_from: STAGE:best|latest`.

Every answer is one verified checkpoint: a directory, or the URI of an object-store checkpoint. `latest` is a hint
that is checked: when its checkpoint is damaged, the next older complete one of its lineage stands in for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from dtrain.checkpoint.layout import BEST, LATEST, parse_step
from dtrain.checkpoint.lineage import lineage_of
from dtrain.checkpoint.location import (CHECKPOINTS_DIR, as_storage, is_one_checkpoint, is_uri, local_path,
                                        open_storage, storage_and_name, storage_of_run)
from dtrain.checkpoint.records import checkpoint_records, lineage_head
from dtrain.checkpoint.storage import CheckpointLocation, CheckpointStorage, LocalDirectory
from dtrain.errors import UsageError


@dataclass
class Resolution:
    path: CheckpointLocation | None  # a checkpoint directory, or the URI of an object-store checkpoint
    skipped: list[str] = field(default_factory=list)  # "step_...: why" for each damaged checkpoint passed over


def resolve_resume(spec: str, checkpoints: CheckpointStorage | str | Path, checksums: bool = False) -> Resolution:
    """Returns the checkpoint to resume from (None for a fresh start) or raises UsageError. `checkpoints`: the
    run's checkpoint storage (or its directory / URI)."""
    storage = as_storage(checkpoints)
    if spec == "none":
        return Resolution(None)
    if spec in ("latest", "auto"):
        resolution = find_latest(storage, checksums)
        if resolution.path is None and (spec == "latest" or resolution.skipped):
            why = "; ".join(resolution.skipped) or "there is none"
            raise UsageError(f"--resume {spec}: no usable checkpoint in {storage.url()} ({why})")
        return resolution
    if spec == "best":
        name = storage.read_pointer(BEST)
        if name is None:
            raise UsageError(f"--resume best: {storage.url(BEST)} does not exist "
                             f"(no checkpoint was saved with a value of the monitored metric)")
        return Resolution(_verified(storage, name, checksums, "--resume best"))
    if is_uri(spec):
        return Resolution(_remote_checkpoint(spec, checksums))
    path = _checkpoint_in(local_path(spec))
    return Resolution(_verified(*storage_and_name(path), checksums, "--resume"))


def find_latest(checkpoints: CheckpointStorage | str | Path, checksums: bool = False,
                passed_over: Collection[str] = ()) -> Resolution:
    """The `latest` pointer's checkpoint, or, if it is damaged, the next older complete one of its lineage.
    The pointer is a hint: the candidates are the listed checkpoints (directories or prefixes), each verified.

    Checkpoints of other lineages (saved after the checkpoint a later run resumed from) are never chosen.
    Those whose trainer state cannot be read are tried in their place and reported as skipped. `passed_over`:
    names already found unusable (complete, but their contents did not load): never chosen, never reported."""
    storage = as_storage(checkpoints)
    records = checkpoint_records(storage)
    head = lineage_head(storage, records)
    on_lineage = {r.step for r in lineage_of(records, head)} if head is not None else set()
    readable = {r.step for r in records}
    pointed = storage.read_pointer(LATEST)
    limit = parse_step(pointed) if pointed is not None else None
    candidates = [n for n in reversed(storage.step_names())
                  if n not in passed_over and (parse_step(n) in on_lineage or (
                      parse_step(n) not in readable and (limit is None or parse_step(n) <= limit)))]
    skipped = []
    for name in candidates:
        check = storage.verify(name, checksums)
        if check.ok:
            return Resolution(storage.location(name), skipped)
        skipped.append(f"{name}: {check.reason}")
    return Resolution(None, skipped)


def select_checkpoint(location: str | os.PathLike, which: str | None = None, verify: bool = True,
                      prefer: str = "best") -> CheckpointLocation:
    """A checkpoint as given, or the `best`/`latest` one of a run given by its output dir, checkpoints dir or URI
    (`which=None`: `prefer`, the latest when the run has no best). With `verify`, a checkpoint that is not
    complete (sizes and checksums) is refused with the reason. Raises UsageError."""
    if is_one_checkpoint(location):
        if which is not None:
            raise UsageError(f"--which {which} picks a checkpoint of a run; {location} already is one (drop --which)")
        storage, name = storage_and_name(location)
    else:
        storage = storage_of_run(location)
        best = storage.read_pointer(BEST)
        if which == "best" and best is None:
            raise UsageError(f"invalid value for --which: 'best': {storage.url()} has no best checkpoint "
                             f"(no eval measured the monitor); accepted here: latest")
        if best is not None and (which or prefer) == "best":
            name = best
        else:
            latest = find_latest(storage).path
            if latest is None:
                raise UsageError(f"{storage.url()} holds no complete checkpoint")
            name = storage_and_name(latest)[1]
    chosen = storage.location(name)
    if not storage.is_remote and not chosen.is_dir():
        raise UsageError(f"{chosen} does not exist")
    if verify:
        check = storage.verify(name, checksums=True)
        if not check.ok:
            raise UsageError(f"{chosen} is not a complete checkpoint ({check.reason})")
    return chosen


def best_checkpoint_metric(checkpoints: CheckpointStorage | str | Path) -> dict[str, Any] | None:
    """The `best` checkpoint of a run with its monitored metric ({metric, value, step, checkpoint}), if it has one."""
    storage = as_storage(checkpoints)
    name = storage.read_pointer(BEST)
    if name is None:
        return None
    try:
        state = storage.read_trainer_state(name)
    except (OSError, ValueError):
        return None
    metric = state.get("checkpoint_metric") or {}
    return {"metric": metric.get("name"), "value": metric.get("value"),
            "step": state.get("global_step", parse_step(name)), "checkpoint": str(storage.location(name))}


def _remote_checkpoint(uri: str, checksums: bool) -> str:
    """`--resume s3://bucket/prefix/step_N` (that checkpoint) or `s3://bucket/prefix` (its latest)."""
    uri = uri.rstrip("/")
    if parse_step(uri.rpartition("/")[2]) is None:
        latest = find_latest(open_storage(uri), checksums)
        if latest.path is None:
            why = "; ".join(latest.skipped) or "there is none"
            raise UsageError(f"--resume: no usable checkpoint in {uri} ({why})")
        return latest.path
    return _verified(*storage_and_name(uri), checksums, "--resume")


def _checkpoint_in(path: Path) -> Path:
    """Accepts a checkpoint dir, a run's checkpoints dir or a run's output dir (then its latest)."""
    for checkpoints_dir in (path, path / CHECKPOINTS_DIR):
        if parse_step(path.name) is None and (checkpoints_dir / LATEST).exists():
            latest = find_latest(LocalDirectory(checkpoints_dir)).path
            if latest is not None:
                return latest
    return path


def _verified(storage: CheckpointStorage, name: str, checksums: bool, what: str) -> CheckpointLocation:
    location = storage.location(name)
    if not storage.is_remote and not location.exists():
        raise UsageError(f"{what}: {location} does not exist")
    check = storage.verify(name, checksums)
    if not check.ok:
        raise UsageError(f"{what}: {storage.url(name)} is not a usable checkpoint ({check.reason})")
    return location
