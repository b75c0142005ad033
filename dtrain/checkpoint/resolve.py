"""Turning `--resume none|latest|best|auto|PATH` into one verified checkpoint directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dtrain.checkpoint.layout import (BEST, LATEST, checkpoint_records, lineage_head, parse_step, read_pointer,
                                     step_dirs, verify_checkpoint)
from dtrain.checkpoint.lineage import lineage_of
from dtrain.errors import UsageError


@dataclass
class Resolution:
    path: Path | None
    skipped: list[str] = field(default_factory=list)  # "step_...: why" for each damaged checkpoint passed over


def resolve_resume(spec: str, checkpoints_dir: Path, checksums: bool = False) -> Resolution:
    """Returns the checkpoint to resume from (None for a fresh start) or raises UsageError."""
    if spec == "none":
        return Resolution(None)
    if spec in ("latest", "auto"):
        resolution = find_latest(checkpoints_dir, checksums)
        if resolution.path is None and (spec == "latest" or resolution.skipped):
            why = "; ".join(resolution.skipped) or "there is none"
            raise UsageError(f"--resume {spec}: no usable checkpoint in {checkpoints_dir} ({why})")
        return resolution
    if spec == "best":
        name = read_pointer(checkpoints_dir, BEST)
        if name is None:
            raise UsageError(f"--resume best: {checkpoints_dir / BEST} does not exist "
                             f"(no checkpoint was saved with a value of the monitored metric)")
        return Resolution(_verified(checkpoints_dir / name, checksums, "--resume best"))
    return Resolution(_verified(_checkpoint_in(Path(spec)), checksums, "--resume"))


def find_latest(checkpoints_dir: Path, checksums: bool = False) -> Resolution:
    """The `latest` pointer's checkpoint, or, if it is damaged, the next older complete one of its lineage.

    Checkpoints of other lineages (saved after the checkpoint a later run resumed from) are never chosen.
    Those whose trainer state cannot be read are tried in their place and reported as skipped."""
    records = checkpoint_records(checkpoints_dir)
    head = lineage_head(checkpoints_dir, records)
    on_lineage = {r.step for r in lineage_of(records, head)} if head is not None else set()
    readable = {r.step for r in records}
    pointed = read_pointer(checkpoints_dir, LATEST)
    limit = parse_step(pointed) if pointed is not None else None
    candidates = [p for p in reversed(step_dirs(checkpoints_dir))
                  if parse_step(p.name) in on_lineage
                  or (parse_step(p.name) not in readable and (limit is None or parse_step(p.name) <= limit))]
    skipped = []
    for path in candidates:
        check = verify_checkpoint(path, checksums)
        if check.ok:
            return Resolution(path, skipped)
        skipped.append(f"{path.name}: {check.reason}")
    return Resolution(None, skipped)


def _checkpoint_in(path: Path) -> Path:
    """Accepts a checkpoint dir, a run's `checkpoints/` dir or a run's output dir (then its latest)."""
    for checkpoints_dir in (path, path / "checkpoints"):
        if parse_step(path.name) is None and (checkpoints_dir / LATEST).exists():
            latest = find_latest(checkpoints_dir).path
            if latest is not None:
                return latest
    return path


def _verified(path: Path, checksums: bool, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what}: {path} does not exist")
    check = verify_checkpoint(path, checksums)
    if not check.ok:
        raise UsageError(f"{what}: {path} is not a usable checkpoint ({check.reason})")
    return path
