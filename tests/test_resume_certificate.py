"""The resume certificate: the next step's inputs recorded at save time and compared after a resume."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from conftest import FAST

from dtrain.training import certificate
from dtrain.commands.train import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
BASE = [*FAST, "--save-every-steps", "10", "--max-steps", "30"]


def entry(batch: str = "b", lrs=(0.1,)) -> dict[str, str]:
    return certificate.local_entry(batch, list(lrs))


def test_matching_entries_show_no_difference():
    saved = certificate.gather_certificate(entry(), world_size=1)
    assert certificate.differences(saved, entry(), rank=0, world_size=1) == []


def test_each_kind_of_difference_is_named():
    saved = certificate.gather_certificate(entry(), world_size=1)
    assert certificate.differences(saved, entry(batch="other"), 0, 1) == ["next_batch"]
    assert certificate.differences(saved, entry(lrs=(0.2,)), 0, 1) == ["lr"]
    random.random()  # any draw moves the generator state
    assert certificate.differences(saved, entry(), 0, 1) == ["rng"]
    assert certificate.differences(saved, entry(), 0, 2) == ["world_size"]


def test_checkpoint_without_a_certificate_is_not_compared():
    assert certificate.differences(None, entry(), 0, 1) == []
    assert certificate.differences({"format": "something else"}, entry(), 0, 1) == []


def test_learning_rate_is_the_plan_in_force_whatever_the_restored_optimizer_holds():
    from dtrain.training.schedule import LearningRate, LRPlan

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    old_optimizer = optimizer()
    old = LearningRate(old_optimizer, LRPlan(100, 2, 0.1))
    old.apply(10)
    new_optimizer = optimizer()
    new_optimizer.load_state_dict(old_optimizer.state_dict())  # what a resume does: the old rate comes back
    new = LearningRate(new_optimizer, LRPlan(50, 2, 0.1))
    assert new_optimizer.param_groups[0]["lr"] == old_optimizer.param_groups[0]["lr"]
    assert new.planned(10) != old.planned(10)  # the certificate sees the new plan before training does
    new.apply(10)
    assert new_optimizer.param_groups[0]["lr"] == new.at(10)[0] != old.at(10)[0]
    assert "learning-rate plan changed" in new.load_state_dict(old.state_dict(), 10)
    assert old.load_state_dict(old.state_dict(), 10) is None


def saved_certificate(out: Path, step: int) -> dict:
    state = json.loads((out / "checkpoints" / f"step_{step:09d}" / "trainer_state.json").read_text())
    return state["resume_certificate"]


def test_every_checkpoint_records_a_certificate_and_an_unchanged_resume_matches(tmp_path, caplog):
    out = tmp_path / "run"
    assert main([*BASE, "--output-dir", str(out)]) == 0
    cert = saved_certificate(out, 20)
    assert cert["world_size"] == 1 and set(cert["ranks"][0]) == {"next_batch", "rng", "lr"}
    with caplog.at_level(logging.INFO):
        assert main([*BASE, "--output-dir", str(out), "--resume", str(out / "checkpoints" / "step_000000020"),
                     "--strict-resume"]) == 0
    assert "resume certificate of step_000000020 matches" in caplog.text


def test_changed_data_order_is_a_warning_naming_the_batch(tmp_path, caplog):
    out = tmp_path / "run"
    assert main([*BASE, "--output-dir", str(out)]) == 0
    with caplog.at_level(logging.WARNING):
        assert main([*BASE, "--output-dir", str(out), "--resume", "latest", "--max-steps", "30",
                     "--seed", "99"]) == 0
    assert "does not match: the samples of the next micro-batch" in caplog.text


def test_strict_resume_refuses_a_changed_schedule_with_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--output-dir", str(out)]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    metrics = (out / "metrics.jsonl").read_text()
    assert main([*BASE, "--output-dir", str(out), "--resume", str(out / "checkpoints" / "step_000000020"),
                 "--max-steps", "60", "--strict-resume"]) == 2
    err = capsys.readouterr().err
    assert "dtrain: error: --strict-resume" in err and "learning rates" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing deleted or written
    assert (out / "metrics.jsonl").read_text() == metrics
