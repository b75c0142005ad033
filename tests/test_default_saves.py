"""The default job saves periodically (every 10 minutes, plus the end): a crash never loses a whole run."""

from __future__ import annotations

import itertools

import pytest
from conftest import FAST, reset_accelerate, train_cmd

from dtrain.config import Config
from dtrain.training.metrics import read_records
from dtrain.commands.train import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_the_default_config_saves_every_600_seconds_and_help_says_so(runner):
    assert Config().checkpoint.save_every_seconds == 600
    helped = runner.run(train_cmd("--help"), timeout=120)
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    entry = text.split("--save-every-seconds FLOAT ")[-1][:200]  # the option's help, after the usage line
    assert "(default: 600.0)" in entry, entry


def test_a_run_without_save_flags_saves_on_the_clock(tmp_path, monkeypatch):
    import dtrain.training.trainer

    # A clock that advances 100 s each time the trainer reads it: the default 600 s interval comes every few steps.
    ticks = itertools.count()
    monkeypatch.setattr(dtrain.training.trainer.time, "monotonic", lambda: 100.0 * next(ticks))
    out = tmp_path / "run"
    reset_accelerate()
    assert main([*FAST, "--max-steps", "40", "--keep-last", "0", "--output-dir", str(out)]) == 0
    saves = [r["step"] for r in read_records(out / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert len(saves) >= 4 and saves[-1] == 40, saves
    assert len(set(saves)) == len(saves)
