"""Streams (IterableDataset): training with --max-steps, exact resume (from state or by replay), each rank
reading its own part, and a world-size change refused unless accepted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import load_weights, same_tensors, train_cmd

# 512 samples at batch size 16: 32 micro-batches per epoch on one process. 80 steps end in epoch 2; the
# checkpoint at step 50 is in the middle of epoch 1.
STREAM = ["--batch-size", "16", "--n-layer", "2", "--n-embd", "32", "--dropout", "0.1", "--epochs", "0",
          "--max-steps", "80", "--save-every-steps", "25", "--keep-last", "0", "--eval-every-steps", "0",
          "--log-every-steps", "10", "--warmup-steps", "5"]


def task(name: str) -> list[str]:
    return ["--task", f"tests.helpers.stream_tasks:{name}"]


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def seen_ids(folder: Path) -> dict[int, list[int]]:
    by_rank: dict[int, list[int]] = {}
    for file in folder.glob("seen_rank*_pid*.txt"):
        rank = int(file.name.split("_")[1].removeprefix("rank"))
        by_rank.setdefault(rank, []).extend(int(line.split()[0]) for line in file.read_text().split())
    return by_rank


def resume_from_a_copy(runner, straight: Path, step: int, out: Path, *args: str):
    """Puts the straight run's checkpoint at `step` into a fresh output dir and resumes with --resume latest."""
    name = f"step_{step:09d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / name, out / "checkpoints" / name)
    (out / "checkpoints" / "latest").write_text(name)
    return runner.run(train_cmd(*args, "--output-dir", str(out), "--resume", "latest"))


@pytest.mark.parametrize("name, resume", [("hf_stream", "state"), ("hf_stream_shuffled", "replay"),
                                          ("torch_stream", "replay"), ("stateful_stream", "state")])
def test_stream_resumed_mid_epoch_ends_bit_identical_to_a_straight_run(runner, tmp_path, name, resume):
    straight = tmp_path / "straight"
    result = runner.run(train_cmd(*task(name), *STREAM, "--output-dir", str(straight)))
    assert result.returncode == 0, result.stdout[-3000:]
    saved = trainer_state(straight / "checkpoints" / "step_000000050")
    assert saved["epoch"] == 1 and saved["data_position"]["resume"] == resume, saved["data_position"]
    assert saved["data_position"]["ranks"][0]["micro_batches"] == 50 - 32

    resumed = tmp_path / "resumed"
    result = resume_from_a_copy(runner, straight, 50, resumed, *task(name), *STREAM)
    assert result.returncode == 0, result.stdout[-3000:]
    assert ("by replay" in result.stdout) == (resume == "replay"), result.stdout[-3000:]
    last = "step_000000080"
    assert same_tensors(load_weights(straight / "checkpoints" / last), load_weights(resumed / "checkpoints" / last))
    ends = trainer_state(straight / "checkpoints" / last), trainer_state(resumed / "checkpoints" / last)
    assert ends[0]["epoch"] == ends[1]["epoch"] == 2
    if name == "hf_stream":  # evaluated on a stream too
        assert ends[0]["last_eval"]["val_loss"] == ends[1]["last_eval"]["val_loss"] > 0


def test_stream_without_max_steps_is_a_usage_error(runner, tmp_path):
    result = runner.run(train_cmd(*task("torch_stream"), *STREAM, "--max-steps", "0", "--epochs", "2",
                                  "--output-dir", str(tmp_path / "run")))
    assert result.returncode == 2, result.stdout[-3000:]
    assert "dtrain: error: invalid value for max_steps" in result.stdout
    assert "Traceback" not in result.stdout


def test_a_stream_shorter_than_one_step_is_a_usage_error(runner, tmp_path):
    result = runner.run(train_cmd(*task("tiny_stream"), *STREAM, "--output-dir", str(tmp_path / "run")))
    assert result.returncode == 2, result.stdout[-3000:]
    assert "dtrain: error: the training stream gave no optimizer step's worth of data in epoch 0" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_stream", "torch_stream"])
def test_two_ranks_read_disjoint_parts_and_a_world_size_change_is_refused_unless_accepted(runner, tmp_path, name):
    # One epoch on 2 ranks is 16 steps of 2 x 16 samples.
    seen = tmp_path / "seen"
    seen.mkdir()
    out = tmp_path / "run"
    args = [*task(name), *STREAM, "--max-steps", "16", "--save-every-steps", "10"]
    result = runner.run(train_cmd(*args, "--output-dir", str(out), processes=2), DTRAIN_TEST_SEEN_DIR=str(seen))
    assert result.returncode == 0, result.stdout[-3000:]
    by_rank = {rank: [i for i in ids if i >= 0] for rank, ids in seen_ids(seen).items()}  # < 0: eval samples
    assert sorted(by_rank) == [0, 1]
    assert not set(by_rank[0]) & set(by_rank[1]), "ranks read overlapping samples"
    assert len(by_rank[0]) == len(set(by_rank[0])) == 16 * 16
    assert sorted(by_rank[0] + by_rank[1]) == list(range(512)), "one epoch on 2 ranks reads every sample once"
    position = trainer_state(out / "checkpoints" / "step_000000010")["data_position"]
    assert position["world_size"] == 2 and len(position["ranks"]) == 2

    one = tmp_path / "one"
    refused = resume_from_a_copy(runner, out, 10, one, *args)
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "dtrain: error: --resume" in refused.stdout and "--allow-inexact-resume" in refused.stdout
    assert sorted(p.name for p in (one / "checkpoints").iterdir()) == ["latest", "step_000000010"], "nothing changed"
    accepted = runner.run(train_cmd(*args, "--output-dir", str(one), "--resume", "latest", "--allow-inexact-resume"))
    assert accepted.returncode == 0, accepted.stdout[-3000:]
    assert (one / "checkpoints" / "step_000000016").is_dir()
