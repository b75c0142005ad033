"""--max-time: a run stops with a committed checkpoint before its wall-clock budget runs out, exits 124, and
resumes like any interrupted run."""

from __future__ import annotations

import json
import sys
import time

import pytest

from dtrain.durations import parse_duration
from dtrain.errors import UsageError
from dtrain.training.time_budget import SAFETY_SECONDS, TimeBudget
from tests.conftest import train_cmd


@pytest.mark.parametrize("text, seconds", [("00:00:05", 5), ("01:30:00", 5400), ("2:00:00:01", 172801),
                                           (" 10:00:00 ", 36000)])
def test_durations_are_read_as_lightning_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90", "1:60:00", "00:00:00", "-1:00:00", "1h", ""])
def test_a_bad_duration_names_the_field_and_the_format(text):
    with pytest.raises(UsageError, match="max_time.*HH:MM:SS"):
        parse_duration(text)


def test_the_budget_keeps_room_for_the_longest_stretch_and_save_seen():
    budget = TimeBudget(100.0, started=time.monotonic())
    assert not budget.running_out()
    budget.note_save(30.0)  # 1.5 x 30 + the margin fits in the 50 s left, not in 45
    budget.started -= 50
    assert not budget.running_out()
    budget.started -= 5
    assert budget.running_out()
    quick = TimeBudget(100.0, started=time.monotonic() - 100 + 2 * SAFETY_SECONDS)
    assert not quick.running_out()
    quick.started -= SAFETY_SECONDS
    assert quick.running_out()


def test_a_bad_max_time_flag_is_a_usage_error(runner, tmp_path):
    result = runner.run(train_cmd("--task", "regression", "--output-dir", str(tmp_path / "run"), "--max-time", "5m"),
                        timeout=120)
    assert result.returncode == 2
    assert "dtrain: error: invalid value for max_time: '5m'" in result.stdout and "Traceback" not in result.stdout


@pytest.mark.slow
def test_max_time_stops_with_a_checkpoint_exit_124_and_resumes(runner, tmp_path):
    out = tmp_path / "run"
    args = ("--task", "regression", "--output-dir", str(out), "--max-steps", "100000000", "--epochs", "0",
            "--save-every-seconds", "0", "--eval-every-steps", "0", "--log-every-steps", "1000")
    started = time.monotonic()
    stopped = runner.run(train_cmd(*args, "--max-time", "00:00:12"), timeout=120)
    elapsed = time.monotonic() - started
    assert stopped.returncode == 124, stopped.stdout[-3000:]
    assert elapsed < 60, "the budget was not enforced"
    assert "Stopped by --max-time at step" in stopped.stdout and "Resume with:" in stopped.stdout
    status = json.loads((out / "exit_status.json").read_text())
    assert (status["reason"], status["exit_code"], status["signal"]) == ("interrupted", 124, None)
    step = status["step"]
    assert step > 0 and status["checkpoint"] == f"step_{step:09d}"
    assert (out / "checkpoints" / status["checkpoint"] / "manifest.json").is_file()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "interrupt" and e.get("reason") == "max_time" for e in events)

    resumed = runner.run(train_cmd(*args[:5], str(step + 3), *args[6:], "--resume", "latest"), timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout and json.loads((out / "exit_status.json").read_text())["step"] == step + 3


def test_the_entry_point_knows_max_time(runner):
    helped = runner.run([sys.executable, "-m", "dtrain.cli", "train", "--help"], timeout=60)
    assert "--max-time" in helped.stdout
