"""A resumed run continues bit-for-bit like one that never stopped (and stays correct when it cannot)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.utils import load as safe_load

from conftest import FAST, REPO, assert_same_end, final_checkpoint, train_cmd
from dtrain.data import ResumableBatchSampler

# 2 epochs of 128 steps; checkpoints every 40 steps; dropout on, so RNG restore matters.
EXACT = [*FAST, "--epochs", "2", "--max-steps", "0", "--dropout", "0.1", "--save-every-steps", "40",
         "--keep-last", "0"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import Runner

    runner = Runner()
    try:
        out = tmp_path_factory.mktemp("straight")
        result = runner.run(train_cmd(*EXACT, "--output-dir", str(out)))
        assert result.returncode == 0, result.stdout[-3000:]
        yield out
    finally:
        runner.cleanup()


@pytest.mark.parametrize("step", [80, 200], ids=["mid-epoch-0", "mid-epoch-1"])
def test_resume_from_mid_epoch_checkpoint_is_bit_identical(runner, straight, tmp_path, step):
    resumed = tmp_path / "resumed"
    result = runner.run(train_cmd(*EXACT, "--output-dir", str(resumed),
                                  "--resume", str(straight / "checkpoints" / f"step_{step:09d}")))
    assert result.returncode == 0, result.stdout[-3000:]
    assert_same_end(straight, resumed)


def test_resume_after_real_sigterm_is_bit_identical(runner, straight, tmp_path):
    import signal

    from conftest import wait_for

    out = tmp_path / "signalled"
    proc = runner.start(train_cmd(*EXACT, "--output-dir", str(out)))
    wait_for(lambda: (out / "checkpoints" / "step_000000040").exists(), what="first checkpoint")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output[-3000:]
    resumed = runner.run(train_cmd(*EXACT, "--output-dir", str(out), "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_end(straight, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    interrupt = next(r for r in records if r.get("event") == "interrupt")
    resume = next(r for r in records if r.get("event") == "resume")
    assert resume["step"] == interrupt["step"] and resume["world_size"] == 1
    steps = [r["step"] for r in records if r.get("kind") == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "metrics read as one continuous run"


def test_resume_with_gradient_accumulation_is_bit_identical(runner, tmp_path):
    args = [*EXACT, "--grad-accum", "2", "--epochs", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert runner.run(train_cmd(*args, "--output-dir", str(straight))).returncode == 0
    result = runner.run(train_cmd(*args, "--output-dir", str(resumed),
                                  "--resume", str(straight / "checkpoints" / "step_000000040")))
    assert result.returncode == 0, result.stdout[-3000:]
    assert_same_end(straight, resumed)


def test_two_process_resume_is_bit_identical(runner, tmp_path):
    args = [*EXACT, "--epochs", "0", "--max-steps", "100"]  # 64 steps per epoch with 2 ranks: resume in epoch 1
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = runner.run(train_cmd(*args, "--output-dir", str(straight), processes=2))
    assert first.returncode == 0, first.stdout[-3000:]
    result = runner.run(train_cmd(*args, "--output-dir", str(resumed), "--resume",
                                  str(straight / "checkpoints" / "step_000000080"), processes=2))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resume certificate of step_000000080 matches" in result.stdout  # both ranks' digests agreed
    assert_same_end(straight, resumed)
    for rank in (0, 1):
        a = safe_load(final_checkpoint(straight) / f"random_states_{rank}.pkl")["torch_manual_seed"]
        b = safe_load(final_checkpoint(resumed) / f"random_states_{rank}.pkl")["torch_manual_seed"]
        assert torch.equal(a, b), f"rank {rank} RNG"


def seen_indices(directory: Path) -> list[int]:
    return [int(line) for f in sorted(directory.glob("seen_*.txt")) for line in f.read_text().split()]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_world_size_change_sees_every_sample_of_the_epoch_once(runner, tmp_path, before, after):
    task = ["--task", "tests.helpers.tasks:recording_regression", *FAST[2:], "--epochs", "1", "--max-steps", "0",
            "--eval-every-steps", "0", "--save-every-steps", "10"]
    out = tmp_path / "run"
    seen_before, seen_after = tmp_path / "before", tmp_path / "after"
    seen_before.mkdir(), seen_after.mkdir()
    first = runner.run(train_cmd(*task, "--max-steps", "20", "--output-dir", str(out), processes=before),
                       cwd=REPO, DTRAIN_TEST_SEEN_DIR=str(seen_before))
    assert first.returncode == 0, first.stdout[-3000:]
    second = runner.run(train_cmd(*task, "--output-dir", str(out), "--resume", "latest", processes=after),
                        cwd=REPO, DTRAIN_TEST_SEEN_DIR=str(seen_after))
    assert second.returncode == 0, second.stdout[-3000:]
    assert "world size changed" in second.stdout
    a, b = seen_indices(seen_before), seen_indices(seen_after)
    assert len(a) == len(set(a)) and len(b) == len(set(b)) and not set(a) & set(b), "a sample was seen twice"
    # Everything of the epoch was seen, except the tail that no full step of the new world size could take.
    order = ResumableBatchSampler(2048, 16, 0, 1, seed=1234).epoch_order(0).tolist()
    consumed = 20 * 16 * before
    covered = consumed + ((2048 - consumed) // (16 * after)) * 16 * after
    assert set(a) | set(b) == set(order[:covered])


def test_changed_model_shape_is_refused_and_other_changes_are_listed(runner, tmp_path):
    out = tmp_path / "run"
    assert runner.run(train_cmd(*FAST, "--max-steps", "10", "--output-dir", str(out))).returncode == 0
    refused = runner.run(train_cmd(*FAST, "--n-embd", "48", "--max-steps", "20", "--output-dir", str(out),
                                   "--resume", "latest"))
    assert refused.returncode == 2
    assert "dtrain: error:" in refused.stdout and "n_embd" in refused.stdout and "Traceback" not in refused.stdout
    warned = runner.run(train_cmd(*FAST, "--max-steps", "20", "--lr", "0.001", "--output-dir", str(out),
                                  "--resume", "latest"))
    assert warned.returncode == 0, warned.stdout[-3000:]
    assert "config changed" in warned.stdout and "lr: 0.003 -> 0.001" in warned.stdout
    assert "max_steps: 10 -> 20" in warned.stdout


def test_checkpoint_whose_tensors_do_not_fit_names_the_keys(runner, tmp_path):
    out = tmp_path / "run"
    assert runner.run(train_cmd(*FAST, "--max-steps", "5", "--output-dir", str(out))).returncode == 0
    result = runner.run(train_cmd(*FAST, "--n-embd", "48", "--allow-config-change", "--max-steps", "10",
                                  "--output-dir", str(out), "--resume", "latest"))
    assert result.returncode == 2
    assert "does not fit the model" in result.stdout and "0.weight" in result.stdout


def test_checkpoint_of_another_task_is_refused(runner, tmp_path):
    out = tmp_path / "run"
    assert runner.run(train_cmd("--quick", "--max-steps", "3", "--output-dir", str(out))).returncode == 0
    result = runner.run(train_cmd(*FAST, "--output-dir", str(tmp_path / "other"), "--resume", str(out)))
    assert result.returncode == 2 and "task 'charlm'" in result.stdout


def test_verify_resume_command_reports_identical(runner, tmp_path):
    import sys

    result = runner.run([sys.executable, "-m", "dtrain.cli", "verify-resume", *FAST, "--verify-steps", "30",
                         "--eval-every-steps", "10", "--dropout", "0.1", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "RESULT: identical" in result.stdout and "DIVERGED" not in result.stdout


def test_verify_resume_names_the_state_that_diverged(tmp_path):
    from dtrain.commands.verify_resume import compare_checkpoints

    a, b = tmp_path / "a", tmp_path / "b"
    from dtrain.commands.train import main

    assert main([*FAST, "--max-steps", "4", "--output-dir", str(a)]) == 0
    shutil.copytree(a, b)
    ckpt_b = final_checkpoint(b)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt_b / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, str(ckpt_b / "model.safetensors"))
    rows = {name: ok for name, ok, _ in compare_checkpoints(final_checkpoint(a), ckpt_b)}
    assert rows["model weights"] is False and rows["optimizer state"] is True
