"""What retention, `best` and the lineage know of each checkpoint (step, monitored metric, run ids), read through any
storage: a local directory or an object store."""

from __future__ import annotations

from dtrain.checkpoint.layout import LATEST, parse_step
from dtrain.checkpoint.lineage import lineage_of
from dtrain.checkpoint.location import as_storage
from dtrain.checkpoint.retention import CheckpointRecord


def record_from_state(state: dict, step: int, monitor: str | None = None) -> CheckpointRecord:
    metric = state.get("checkpoint_metric") or {}
    value = metric.get("value") if monitor is None or metric.get("name") == monitor else None
    ancestry = tuple((a.get("run_id"), int(a["step"])) for a in state.get("ancestry") or [])
    return CheckpointRecord(step, value, state.get("run_id"), ancestry)


def checkpoint_records(checkpoints, monitor: str | None = None) -> list[CheckpointRecord]:
    """Records of every checkpoint (directory or object-store prefix) whose trainer state can be read, oldest
    first. `checkpoints`: a checkpoints directory, a URI or a CheckpointStorage."""
    storage, records = as_storage(checkpoints), []
    for name in storage.step_names():
        try:
            records.append(record_from_state(storage.read_trainer_state(name), parse_step(name), monitor))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
    return records


def lineage_head(checkpoints, records: list[CheckpointRecord]) -> int | None:
    """The step whose lineage counts: `latest`'s, else the newest checkpoint. When the pointed checkpoint's
    state cannot be read (damaged), the newest readable one below it stands in for it."""
    pointed = as_storage(checkpoints).read_pointer(LATEST)
    limit = parse_step(pointed) if pointed is not None else None
    steps = [r.step for r in records if limit is None or r.step <= limit]
    return max(steps) if steps else None


def current_lineage(checkpoints, monitor: str | None = None,
                    head_step: int | None = None) -> tuple[list[CheckpointRecord], list[CheckpointRecord]]:
    """(records on the lineage of `head_step`, default the `latest` one; records of other lineages), oldest
    first. Unreadable checkpoints are in neither."""
    storage = as_storage(checkpoints)
    records = checkpoint_records(storage, monitor)
    head = lineage_head(storage, records) if head_step is None else head_step
    on = lineage_of(records, head) if head is not None else []
    steps = {r.step for r in on}
    return on, [r for r in records if r.step not in steps]
