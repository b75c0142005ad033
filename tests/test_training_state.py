"""State a checkpoint stores does not drift: the epoch roll-over, the learning-rate plan, a grad_accum change."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import FAST, reset_accelerate

from dtrain.checkpoint.layout import read_trainer_state, step_dir_name, step_dirs
from dtrain.training.metrics import read_records
from dtrain.pipeline.state import is_final
from dtrain.training.schedule import LRPlan, plan_change
from dtrain.commands.train import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# Batch size 64: the regression task's 2048 samples make 32 optimizer steps per epoch.
BASE = [*FAST, "--batch-size", "64", "--save-every-seconds", "0"]


def train(out: Path, *extra: str) -> int:
    reset_accelerate()
    code = main([*BASE, "--output-dir", str(out), *extra])
    reset_accelerate()
    return code


def state_of(out: Path, step: int) -> dict:
    return read_trainer_state(out / "checkpoints" / step_dir_name(step))


def test_a_save_on_the_last_step_of_an_epoch_stores_the_rolled_over_position(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--epochs", "2", "--max-steps", "0", "--save-every-steps", "32") == 0
    assert [p.name for p in step_dirs(out / "checkpoints")] == [step_dir_name(32), step_dir_name(64)]
    for step, epoch in ((32, 1), (64, 2)):
        state = state_of(out, step)
        assert (state["epoch"], state["step_in_epoch"], state["epoch_samples_seen"]) == (epoch, 0, 0), state
    assert is_final(state_of(out, 64)), "a finished run's last checkpoint must say it is finished"
    saves = [r["step"] for r in read_records(out / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert saves == [32, 64]

    # Resuming the finished run does nothing more; resuming from the end of epoch 1 trains epoch 2 only.
    assert train(out, "--epochs", "2", "--max-steps", "0", "--resume", "latest") == 0
    assert state_of(out, 64)["epoch"] == 2


def test_an_epoch_save_at_the_epochs_end_happens_once_with_the_new_epoch(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--epochs", "2", "--max-steps", "0", "--save-every-epochs", "1", "--save-every-steps", "32") == 0
    saves = [r["step"] for r in read_records(out / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert saves == [32, 64]
    assert state_of(out, 32)["epoch"] == 1


def test_the_checkpoint_stores_the_lr_plan_and_a_longer_resume_says_how_it_continues(tmp_path, caplog):
    out = tmp_path / "run"
    assert train(out, "--max-steps", "20", "--save-every-steps", "10") == 0
    state = state_of(out, 20)
    assert state["lr_plan"] == {"total_steps": 20, "warmup_steps": 5, "min_lr_ratio": 0.1}
    assert state["grad_accum"] == 1

    with caplog.at_level(logging.WARNING):
        assert train(out, "--max-steps", "40", "--resume", str(out / "checkpoints" / step_dir_name(10))) == 0
    lines = [r.getMessage() for r in caplog.records if "learning-rate plan changed" in r.getMessage()]
    assert len(lines) == 1 and "total steps 20 -> 40" in lines[0] and "from step 10" in lines[0], lines
    assert state_of(out, 40)["lr_plan"]["total_steps"] == 40
    # The first step after the resume already uses the new plan's lr (not the old plan's, loaded with the optimizer).
    plan = LRPlan(40, 5, 0.1)
    logged = {r["step"]: r["lr"] for r in read_records(out / "metrics.jsonl") if "lr" in r}
    assert logged[15] == pytest.approx(3e-3 * plan.factor()(15), rel=1e-6)


def test_resuming_with_the_same_plan_says_nothing_about_the_schedule(tmp_path, caplog):
    out = tmp_path / "run"
    assert train(out, "--max-steps", "20", "--save-every-steps", "10") == 0
    with caplog.at_level(logging.WARNING):
        assert train(out, "--max-steps", "20", "--resume", str(out / "checkpoints" / step_dir_name(10))) == 0
    assert not [r for r in caplog.records if "learning-rate plan" in r.getMessage()]


def test_plan_change_names_what_changed_and_the_lr_now():
    line = plan_change(LRPlan(100, 10, 0.1), LRPlan(200, 10, 0.1), 50, 1.0)
    assert "total steps 100 -> 200" in line and "warm-up" not in line and "step 200" in line
    assert plan_change(LRPlan(100, 10, 0.1), LRPlan(100, 10, 0.1), 50, 1.0) is None
    assert LRPlan.from_dict(None) is None and LRPlan.from_dict({"total_steps": 3}) is None


def test_a_grad_accum_change_keeps_whole_optimizer_steps(tmp_path, caplog):
    out = tmp_path / "run"
    assert train(out, "--max-steps", "10", "--save-every-steps", "10", "--grad-accum", "2") == 0
    before = state_of(out, 10)
    assert before["samples_seen"] == 10 * 2 * 64
    with caplog.at_level(logging.WARNING):
        assert train(out, "--max-steps", "15", "--grad-accum", "3", "--resume", "latest") == 0
    assert any("grad_accum changed from 2 to 3" in r.getMessage() for r in caplog.records)
    after = state_of(out, 15)
    # Five optimizer steps of three micro-batches each: Accelerate's micro-step counter restarted in step.
    assert after["samples_seen"] - before["samples_seen"] == 5 * 3 * 64
    assert after["grad_accum"] == 3
