"""Evaluation runs on every rank with equal batch counts: padding keeps forward passes in step (FSDP, ZeRO-3),
and padded samples are never counted."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
from conftest import FAST, train_cmd

from dtrain.data import ShardedEvalSampler
from dtrain.training.metrics import read_records

COMBOS = [(n, world, batch, max_batches)
          for n in (0, 1, 2, 3, 5, 7, 16, 17, 33, 100)
          for world in (1, 2, 3, 4, 8)
          for batch in (1, 2, 3, 8)
          for max_batches in (0, 1, 2, 5)]


@pytest.mark.parametrize("n, world, batch, max_batches", COMBOS)
def test_every_rank_gets_the_same_number_of_batches_and_real_samples_are_counted_once(n, world, batch, max_batches):
    samplers = [ShardedEvalSampler(n, batch, rank, world, max_batches) for rank in range(world)]
    counts = {len(s) for s in samplers}
    assert len(counts) == 1, f"unequal batch counts {[len(s) for s in samplers]}"
    expected_batches = math.ceil(math.ceil(n / world) / batch)
    if max_batches:
        expected_batches = min(expected_batches, max_batches)
    assert counts == {expected_batches}
    real = [i for s in samplers for b in list(s)[:s.real_batches] for i in b]
    assert len(real) == len(set(real)), "a sample counted twice"
    assert set(real) <= set(range(n))
    if not max_batches:
        assert sorted(real) == list(range(n)), "every sample is evaluated"
    for rank, s in enumerate(samplers):
        batches = list(s)
        assert all(len(b) <= batch for b in batches[:s.real_batches])
        assert all(i % world == rank for b in batches[:s.real_batches] for i in b)
        assert all(b == batches[-1] and len(b) == 1 for b in batches[s.real_batches:]), "padding is one sample"
        assert all(0 <= i < max(n, 1) for b in batches for i in b)


def test_a_capped_eval_takes_the_first_batches_of_each_shard():
    s = ShardedEvalSampler(20, 3, 1, 2, max_batches=2)
    assert list(s) == [[1, 3, 5], [7, 9, 11]] and s.real_batches == 2


def eval_of(out: Path) -> list[dict]:
    return [r for r in read_records(out / "metrics.jsonl") if "val_loss" in r]


# lr 1e-30: the weights stay at their (seeded) init, so 1 and 2 ranks evaluate the same model.
ARGS = [*FAST, "--task", "tests.helpers.tasks:counting_eval_regression", "--lr", "1e-30", "--max-steps", "2",
        "--eval-every-steps", "2", "--eval-max-batches", "0", "--batch-size", "4", "--save-every-seconds", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("eval_samples", [33, 1])  # 33: shards of 17 and 16 make 5 and 4 batches of 4
def test_two_ranks_measure_the_metric_of_one_rank_with_equal_forward_passes(runner, tmp_path, eval_samples):
    results = {}
    for processes in (1, 2):
        out, seen = tmp_path / f"p{processes}", tmp_path / f"seen{processes}"
        seen.mkdir()
        done = runner.run(train_cmd(*ARGS, "--output-dir", str(out), processes=processes), timeout=180,
                          DTRAIN_TEST_SEEN_DIR=str(seen), DTRAIN_TEST_EVAL_SAMPLES=str(eval_samples))
        assert done.returncode == 0, done.stdout[-4000:]
        results[processes] = eval_of(out)
        calls = {p.name: Counter(p.read_text().splitlines()) for p in seen.glob("eval_calls_rank*.txt")}
        assert len(calls) == processes
        per_rank = [sum(c.values()) for c in calls.values()]
        assert len(set(per_rank)) == 1, f"ranks ran different numbers of eval forward passes: {calls}"
        assert all(c["sample"] == 1 for c in calls.values()), "every rank runs the sample at each eval"
    one, two = results[1], results[2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2]
    for a, b in zip(one, two):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert (tmp_path / "p2" / "samples" / "step_000000002.txt").read_text() == \
        (tmp_path / "p1" / "samples" / "step_000000002.txt").read_text()
