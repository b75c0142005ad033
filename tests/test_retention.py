"""The retention policy is a pure function: which checkpoints to keep and delete, tested without torch."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest

from dtrain.checkpoint.retention import (CheckpointRecord, RetentionPolicy, best_checkpoint, checkpoints_to_delete,
                                         checkpoints_to_keep, rank_by_metric)

RETENTION_PY = Path(__file__).resolve().parents[1] / "dtrain" / "checkpoint" / "retention.py"
NAN = math.nan


def recs(*pairs) -> list[CheckpointRecord]:
    """recs(10, (20, 0.5), 30) -> records for steps 10, 20 (metric 0.5) and 30."""
    return [CheckpointRecord(*p) if isinstance(p, tuple) else CheckpointRecord(p) for p in pairs]


CASES = [
    # (id, records, policy, protected, expected kept steps)
    ("empty_inputs", [], RetentionPolicy(keep_last=2, keep_best=1, keep_every_steps=10), (), set()),
    ("empty_with_protected", [], RetentionPolicy(keep_last=1), (5,), set()),
    ("all_rules_off_keeps_all", recs(1, 2, 3, 4), RetentionPolicy(), (), {1, 2, 3, 4}),
    ("all_rules_off_keeps_all_with_metrics", recs((1, 0.3), (2, 0.1), (3, 0.9)), RetentionPolicy(), (), {1, 2, 3}),
    ("keep_last_1", recs(1, 2, 3, 4), RetentionPolicy(keep_last=1), (), {4}),
    ("keep_last_2", recs(1, 2, 3, 4), RetentionPolicy(keep_last=2), (), {3, 4}),
    ("keep_last_more_than_exist", recs(1, 2), RetentionPolicy(keep_last=5), (), {1, 2}),
    ("keep_last_unsorted_input", recs(30, 10, 40, 20), RetentionPolicy(keep_last=2), (), {30, 40}),
    ("keep_best_min", recs((1, 0.5), (2, 0.2), (3, 0.4), (4, 0.9)), RetentionPolicy(keep_last=1, keep_best=2),
     (), {2, 3, 4}),
    ("keep_best_max", recs((1, 0.5), (2, 0.2), (3, 0.4), (4, 0.9), (5, 0.1)),
     RetentionPolicy(keep_last=1, keep_best=2, mode="max"), (), {1, 4, 5}),
    ("keep_every_steps_milestones", recs(5, 10, 15, 20, 25, 30, 35), RetentionPolicy(keep_last=1, keep_every_steps=10),
     (), {10, 20, 30, 35}),
    ("union_of_all_rules", recs((5, 0.9), (10, 0.8), (15, 0.1), (20, 0.7), (25, 0.6), (30, 0.5), (35, 0.4)),
     RetentionPolicy(keep_last=2, keep_best=1, keep_every_steps=20), (), {15, 20, 30, 35}),
    ("protected_step_kept", recs(1, 2, 3, 4), RetentionPolicy(keep_last=1), (2,), {2, 4}),
    ("protected_step_not_present_is_ignored", recs(1, 2, 3), RetentionPolicy(keep_last=1), (99,), {3}),
    # The newest and the best survive even when no rule asks for them.
    ("newest_never_deleted", recs(5, 10, 15), RetentionPolicy(keep_every_steps=10), (), {10, 15}),
    ("best_never_deleted_min", recs((1, 0.1), (2, 0.5), (3, 0.6)), RetentionPolicy(keep_last=1), (), {1, 3}),
    ("best_never_deleted_max", recs((1, 0.1), (2, 0.5), (3, 0.6), (4, 0.2)), RetentionPolicy(keep_last=1, mode="max"),
     (), {3, 4}),
    # Among equal metrics the newer step ranks first.
    ("tie_prefers_newer", recs((1, 0.5), (2, 0.5), (3, 0.9)), RetentionPolicy(keep_last=1, keep_best=1), (), {2, 3}),
    ("tie_keep_best_2", recs((1, 0.5), (2, 0.5), (3, 0.5), (4, 0.9)), RetentionPolicy(keep_last=1, keep_best=2),
     (), {2, 3, 4}),
    # NaN never counts as best, in either mode.
    ("nan_is_never_best_min", recs((1, NAN), (2, 0.5), (3, 0.7)), RetentionPolicy(keep_last=1, keep_best=1),
     (), {2, 3}),
    ("nan_is_never_best_max", recs((1, NAN), (2, 0.5), (3, 0.7), (4, 0.1)),
     RetentionPolicy(keep_last=1, keep_best=1, mode="max"), (), {3, 4}),
    ("all_nan_only_newest", recs((1, NAN), (2, NAN), (3, NAN)), RetentionPolicy(keep_last=1, keep_best=2), (), {3}),
    ("missing_metrics_ignored_by_keep_best", recs(1, (2, 0.3), 3, 4), RetentionPolicy(keep_last=1, keep_best=3),
     (), {2, 4}),
    ("single_checkpoint_kept", recs((7, 1.0)), RetentionPolicy(keep_last=1, keep_best=1, keep_every_steps=3), (), {7}),
]


@pytest.mark.parametrize("records, policy, protected, expected",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kept_set_is_union_of_rules_plus_newest_best_and_protected(records, policy, protected, expected):
    kept = checkpoints_to_keep(records, policy, protected)
    deleted = checkpoints_to_delete(records, policy, protected)
    steps = {r.step for r in records}
    assert kept == expected
    assert deleted == sorted(steps - expected)  # oldest first, never a step that does not exist
    assert set(deleted).isdisjoint(kept)
    assert set(deleted) | kept == steps


@pytest.mark.parametrize("policy", [RetentionPolicy(keep_last=1), RetentionPolicy(keep_best=1),
                                    RetentionPolicy(keep_every_steps=1000),
                                    RetentionPolicy(keep_last=1, keep_best=1, keep_every_steps=7, mode="max")])
@pytest.mark.parametrize("seed", range(5))
def test_newest_and_best_are_never_deleted_for_any_history(policy, seed):
    import random

    rnd = random.Random(seed)
    records = [CheckpointRecord(step, rnd.choice([None, NAN, rnd.random(), 0.5]))
               for step in rnd.sample(range(1, 500), 25)]
    deleted = set(checkpoints_to_delete(records, policy))
    newest = max(r.step for r in records)
    assert newest not in deleted
    best = best_checkpoint(records, policy.mode)
    if best is not None:
        assert best.step not in deleted


def test_retention_applied_save_by_save_ends_with_the_policy_of_the_whole_history():
    """What the trainer does (prune after every save) keeps the same set as one prune at the end."""
    rnd_metrics = [0.9, 0.7, 0.8, 0.3, 0.6, 0.65, 0.2, 0.5, 0.4, 0.45, 0.35, 0.25]
    policy = RetentionPolicy(keep_last=2, keep_best=2, keep_every_steps=20)
    history = [CheckpointRecord(5 * (i + 1), m) for i, m in enumerate(rnd_metrics)]
    existing: list[CheckpointRecord] = []
    for record in history:
        existing.append(record)
        gone = set(checkpoints_to_delete(existing, policy, protected={record.step}))
        existing = [r for r in existing if r.step not in gone]
    assert {r.step for r in existing} == checkpoints_to_keep(history, policy)


def test_rank_by_metric_orders_best_first_and_drops_missing_and_nan():
    records = recs((1, 0.5), (2, None), (3, NAN), (4, 0.1), (5, 0.5))
    assert [r.step for r in rank_by_metric(records, "min")] == [4, 5, 1]
    assert [r.step for r in rank_by_metric(records, "max")] == [5, 1, 4]
    assert best_checkpoint(recs(1, 2), "min") is None
    assert best_checkpoint([], "max") is None


def test_policy_enabled_only_when_a_rule_is_on():
    assert not RetentionPolicy().enabled
    assert RetentionPolicy(keep_last=1).enabled
    assert RetentionPolicy(keep_best=1).enabled
    assert RetentionPolicy(keep_every_steps=1).enabled


def test_retention_module_source_imports_no_torch():
    tree = ast.parse(RETENTION_PY.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "dataclasses", "typing", "math", "itertools", "functools"}, imported


def test_retention_module_runs_without_torch_loaded(runner):
    code = """
import sys
from dtrain.checkpoint.retention import CheckpointRecord, RetentionPolicy, checkpoints_to_delete
records = [CheckpointRecord(s, 1.0 / s) for s in (1, 2, 3)]
assert checkpoints_to_delete(records, RetentionPolicy(keep_last=1, mode="max")) == [2]
print("torch loaded:", "torch" in sys.modules)
"""
    result = runner.run([sys.executable, "-c", code], timeout=60)
    assert result.returncode == 0, result.stdout
    assert "torch loaded: False" in result.stdout, result.stdout
