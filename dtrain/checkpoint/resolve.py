"""Turning `--resume none|latest|best|auto|PATH` into one verified checkpoint (a directory or an object-store URI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dtrain.checkpoint.layout import BEST, LATEST, checkpoint_records, lineage_head, parse_step, verify_checkpoint
from dtrain.checkpoint.lineage import lineage_of
from dtrain.checkpoint.object_store import is_uri, local_path
from dtrain.checkpoint.storage import CheckpointLocation, CheckpointStorage, LocalDirectory, open_storage
from dtrain.errors import UsageError


@dataclass
class Resolution:
    path: CheckpointLocation | None  # a checkpoint directory, or the URI of an object-store checkpoint
    skipped: list[str] = field(default_factory=list)  # "step_...: why" for each damaged checkpoint passed over


def _storage(checkpoints: CheckpointStorage | str | Path) -> CheckpointStorage:
    return checkpoints if hasattr(checkpoints, "step_names") else open_storage(checkpoints)


def resolve_resume(spec: str, checkpoints: CheckpointStorage | str | Path, checksums: bool = False) -> Resolution:
    """Returns the checkpoint to resume from (None for a fresh start) or raises UsageError. `checkpoints`: the
    run's checkpoint storage (or its directory / URI)."""
    storage = _storage(checkpoints)
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
    return Resolution(_verified_dir(_checkpoint_in(local_path(spec)), checksums, "--resume"))


def find_latest(checkpoints: CheckpointStorage | str | Path, checksums: bool = False) -> Resolution:
    """The `latest` pointer's checkpoint, or, if it is damaged, the next older complete one of its lineage.
    The pointer is a hint: the candidates are the listed checkpoints (directories or prefixes), each verified.

    Checkpoints of other lineages (saved after the checkpoint a later run resumed from) are never chosen.
    Those whose trainer state cannot be read are tried in their place and reported as skipped."""
    storage = _storage(checkpoints)
    records = checkpoint_records(storage)
    head = lineage_head(storage, records)
    on_lineage = {r.step for r in lineage_of(records, head)} if head is not None else set()
    readable = {r.step for r in records}
    pointed = storage.read_pointer(LATEST)
    limit = parse_step(pointed) if pointed is not None else None
    candidates = [n for n in reversed(storage.step_names())
                  if parse_step(n) in on_lineage
                  or (parse_step(n) not in readable and (limit is None or parse_step(n) <= limit))]
    skipped = []
    for name in candidates:
        check = storage.verify(name, checksums)
        if check.ok:
            return Resolution(storage.location(name), skipped)
        skipped.append(f"{name}: {check.reason}")
    return Resolution(None, skipped)


def _remote_checkpoint(uri: str, checksums: bool) -> str:
    """`--resume s3://bucket/prefix/step_N` (that checkpoint) or `s3://bucket/prefix` (its latest)."""
    uri = uri.rstrip("/")
    parent, _, name = uri.rpartition("/")
    if parse_step(name) is None:
        latest = find_latest(open_storage(uri), checksums)
        if latest.path is None:
            why = "; ".join(latest.skipped) or "there is none"
            raise UsageError(f"--resume: no usable checkpoint in {uri} ({why})")
        return latest.path
    return _verified(open_storage(parent), name, checksums, "--resume")


def _checkpoint_in(path: Path) -> Path:
    """Accepts a checkpoint dir, a run's `checkpoints/` dir or a run's output dir (then its latest)."""
    for checkpoints_dir in (path, path / "checkpoints"):
        if parse_step(path.name) is None and (checkpoints_dir / LATEST).exists():
            latest = find_latest(LocalDirectory(checkpoints_dir)).path
            if latest is not None:
                return latest
    return path


def _verified(storage: CheckpointStorage, name: str, checksums: bool, what: str) -> CheckpointLocation:
    if not storage.is_remote:
        return _verified_dir(storage.location(name), checksums, what)
    check = storage.verify(name, checksums)
    if not check.ok:
        raise UsageError(f"{what}: {storage.url(name)} is not a usable checkpoint ({check.reason})")
    return storage.location(name)


def _verified_dir(path: Path, checksums: bool, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what}: {path} does not exist")
    check = verify_checkpoint(path, checksums)
    if not check.ok:
        raise UsageError(f"{what}: {path} is not a usable checkpoint ({check.reason})")
    return path

