"""Which checkpoints to delete: a pure function of what exists and the policy (no torch, no filesystem).

The kept set is the union of three rules (newest `keep_last`, best `keep_best` by the monitored metric,
milestones whose step is a multiple of `keep_every_steps`) plus the protected checkpoints (newest, best,
the one the run resumed from). With every rule off, nothing is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 0
    keep_best: int = 0
    keep_every_steps: int = 0
    mode: str = "min"  # "min": lower metric is better; "max": higher is better

    @property
    def enabled(self) -> bool:
        return bool(self.keep_last or self.keep_best or self.keep_every_steps)


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    metric: float | None = None  # the monitored eval metric measured at this step, if any
    run_id: str | None = None  # the run (one start or resume) that wrote it; None: not recorded (older dtrain)
    # The runs this checkpoint's run descends from, newest first: (run id, last step taken from that run).
    ancestry: tuple[tuple[str | None, int], ...] = ()


def rank_by_metric(records: Iterable[CheckpointRecord], mode: str) -> list[CheckpointRecord]:
    """Records that have a metric, best first; among equal metrics the newer step ranks first."""
    with_metric = [r for r in records if r.metric is not None and r.metric == r.metric]  # drop NaN
    sign = 1.0 if mode == "min" else -1.0
    return sorted(with_metric, key=lambda r: (sign * r.metric, -r.step))


def best_checkpoint(records: Iterable[CheckpointRecord], mode: str) -> CheckpointRecord | None:
    ranked = rank_by_metric(records, mode)
    return ranked[0] if ranked else None


def checkpoints_to_keep(records: Sequence[CheckpointRecord], policy: RetentionPolicy,
                        protected: Iterable[int] = ()) -> set[int]:
    steps = sorted({r.step for r in records})
    if not policy.enabled:
        return set(steps)
    keep = set(protected) & set(steps)
    if steps:
        keep.add(steps[-1])  # the newest is never deleted
    if policy.keep_last:
        keep.update(steps[-policy.keep_last:])
    ranked = rank_by_metric(records, policy.mode)
    if ranked:
        keep.add(ranked[0].step)  # nor the best
    if policy.keep_best:
        keep.update(r.step for r in ranked[:policy.keep_best])
    if policy.keep_every_steps:
        keep.update(s for s in steps if s % policy.keep_every_steps == 0)
    return keep


def checkpoints_to_delete(records: Sequence[CheckpointRecord], policy: RetentionPolicy,
                          protected: Iterable[int] = ()) -> list[int]:
    """Steps to delete, oldest first."""
    keep = checkpoints_to_keep(records, policy, protected)
    return sorted({r.step for r in records} - keep)
