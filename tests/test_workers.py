"""DataLoader workers: seeds are a pure function of (seed, epoch, rank, worker / micro-batch), so random
augmentation in __getitem__ is the same in a resumed run as in a straight one, and ranks never share seeds."""

from __future__ import annotations

import shutil

import pytest

from conftest import load_weights, same_tensors, train_cmd
from dtrain.data.workers import batch_seed, worker_seed

AUGMENT = ["--task", "tests.helpers.stream_tasks:random_augment", "--batch-size", "16", "--n-layer", "2",
           "--n-embd", "32", "--epochs", "0", "--max-steps", "40", "--save-every-steps", "15", "--keep-last", "0",
           "--eval-every-steps", "0", "--warmup-steps", "5", "--num-workers", "2"]


def test_worker_and_batch_seeds_are_pure_and_distinct():
    assert worker_seed(1, 2, 3, 4) == worker_seed(1, 2, 3, 4)
    seeds = {worker_seed(s, e, r, w) for s in (1, 2) for e in (0, 1) for r in (0, 1) for w in (0, 1)}
    assert len(seeds) == 16
    assert len({batch_seed(1, 0, r, step) for r in (0, 1) for step in range(100)}) == 200


def test_resume_with_workers_gives_every_sample_the_same_augmentation(runner, tmp_path):
    straight = tmp_path / "straight"
    result = runner.run(train_cmd(*AUGMENT, "--output-dir", str(straight)))
    assert result.returncode == 0, result.stdout[-3000:]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_000000015", resumed / "checkpoints" / "step_000000015")
    (resumed / "checkpoints" / "latest").write_text("step_000000015")
    result = runner.run(train_cmd(*AUGMENT, "--output-dir", str(resumed), "--resume", "latest"))
    assert result.returncode == 0, result.stdout[-3000:]
    last = "step_000000040"
    assert same_tensors(load_weights(straight / "checkpoints" / last), load_weights(resumed / "checkpoints" / last))


@pytest.mark.slow
def test_ranks_get_different_worker_seeds(runner, tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    result = runner.run(train_cmd(*AUGMENT, "--max-steps", "4", "--save-every-steps", "0",
                                  "--output-dir", str(tmp_path / "run"), processes=2), DTRAIN_TEST_SEEN_DIR=str(seen))
    assert result.returncode == 0, result.stdout[-3000:]
    seeds: dict[int, set[int]] = {0: set(), 1: set()}
    workers: dict[int, set[int]] = {0: set(), 1: set()}
    for file in seen.glob("seen_rank*_pid*.txt"):
        rank = int(file.name.split("_")[1].removeprefix("rank"))
        for line in file.read_text().splitlines():
            _, seed, worker = line.split()
            seeds[rank].add(int(seed))
            workers[rank].add(int(worker))
    assert workers[0] == workers[1] == {0, 1}, "samples were read in 2 workers per rank"
    # One seed per micro-batch fetched (workers prefetch some beyond the 4 steps).
    assert len(seeds[0]) >= 4 and len(seeds[1]) >= 4
    assert not seeds[0] & seeds[1], "ranks share worker seeds"
