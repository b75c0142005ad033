"""One lineage of checkpoints: which checkpoints the newest one descends from (pure: no torch, no filesystem).

A run that resumes from an older checkpoint abandons what was saved after it: resuming from step_100 while
step_200 and step_300 of an earlier continuation exist starts a second branch. Only the branch of `latest` counts
for retention, `best`, the fallback from a damaged `latest` and pipelines; the other branches are kept until
`dtrain ckpt prune` removes them.

Every checkpoint records the run that wrote it (`run_id`, one per start or resume) and that run's ancestry: for
each earlier run it descends from, newest first, the run id and the last step taken from it (the `parent`'s
step). The lineage of a checkpoint H is H's own run up to H, plus each ancestor run up to its step. It does not
depend on the parent still existing, so retention may delete a parent without cutting the lineage.

Checkpoints written before dtrain recorded lineage have no run id; they all count as one run (their old rule:
every such checkpoint up to the newest one in question).
"""

from __future__ import annotations

from typing import Sequence

from dtrain.checkpoint.retention import CheckpointRecord


def lineage_of(records: Sequence[CheckpointRecord], head_step: int) -> list[CheckpointRecord]:
    """The records on the lineage that ends at `head_step`, oldest first (empty when there is no such record)."""
    head = next((r for r in records if r.step == head_step), None)
    if head is None:
        return []
    segments = [(head.run_id, head.step), *head.ancestry]
    return sorted((r for r in records if any(r.run_id == run and r.step <= until for run, until in segments)),
                  key=lambda r: r.step)


def child_ancestry(parent: CheckpointRecord) -> tuple[tuple[str | None, int], ...]:
    """The ancestry of a run that starts from `parent`: the parent's run up to it, then the parent's ancestry
    (unknown beyond a parent without a run id: the old rule covers everything before it)."""
    if parent.run_id is None:
        return ((None, parent.step),)
    return ((parent.run_id, parent.step), *parent.ancestry)
