"""The loop's features that need no extra process: early stopping, precision, trackers, warnings, best pointer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from conftest import FAST
from dtrain.commands.train import main


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_ends_the_run_with_exit_0_and_an_event(tmp_path):
    # With mode max, a falling val_loss never improves after the first eval: patience 2 stops at the third.
    out = tmp_path / "run"
    assert main([*FAST, "--max-steps", "500", "--eval-every-steps", "10", "--mode", "max",
                 "--early-stopping-patience", "2", "--output-dir", str(out)]) == 0
    rs = records(out)
    stop = [r for r in rs if r.get("event") == "early_stop"]
    assert len(stop) == 1 and stop[0]["step"] == 30 and stop[0]["best_step"] == 10
    assert [r for r in rs if r.get("event") == "end"][0]["reason"] == "early_stop"
    state = json.loads((out / "checkpoints" / "step_000000030" / "trainer_state.json").read_text())
    assert state["evals_without_improvement"] == 2 and state["stopped_early"] is True


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    assert main([*FAST, "--max-steps", "4", "--mixed-precision", "bf16", "--output-dir", str(tmp_path)]) == 0


def test_missing_tracker_package_is_a_usage_error(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        import pytest

        pytest.skip("wandb is installed here")
    assert main([*FAST, "--max-steps", "2", "--log-with", "wandb", "--output-dir", str(tmp_path)]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_slow_save_warns_once_about_the_signal_grace_budget(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert main([*FAST, "--max-steps", "6", "--save-every-steps", "2", "--signal-grace-seconds", "0.000001",
                 "--output-dir", str(tmp_path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "--signal-grace-seconds" in r.getMessage()]
    assert len(warnings) == 1 and "longer than" in warnings[0]


def test_best_pointer_follows_the_monitored_metric(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--max-steps", "60", "--eval-every-steps", "10", "--save-every-steps", "10",
                 "--keep-last", "1", "--keep-best", "1", "--output-dir", str(out)]) == 0
    evals = {r["step"]: r["val_loss"] for r in records(out) if "val_loss" in r}
    best_step = min(evals, key=lambda s: (evals[s], -s))
    best = (out / "checkpoints" / "best").read_text().strip()
    assert best == f"step_{best_step:09d}"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == sorted({best, "step_000000060"})


def test_resolved_config_is_written_and_accepted_back(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--max-steps", "2", "--lr", "0.002", "--output-dir", str(out)]) == 0
    again = tmp_path / "again"
    assert main(["--config", str(out / "config.yaml"), "--output-dir", str(again)]) == 0
    import yaml

    assert yaml.safe_load((again / "config.yaml").read_text())["train"]["lr"] == 0.002


def test_save_every_epochs_saves_at_each_epoch_end(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--epochs", "2", "--max-steps", "0", "--save-every-epochs", "1", "--keep-last", "0",
                 "--output-dir", str(out)]) == 0
    saved = [r["step"] for r in records(out) if r.get("event") == "checkpoint"]
    assert saved == [128, 256]  # 2048 samples / batch 16; the final save is the second epoch's


def test_save_every_seconds_saves_on_the_main_process_clock(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--epochs", "0", "--max-steps", "600", "--save-every-seconds", "0.5", "--keep-last", "0",
                 "--output-dir", str(out)]) == 0
    saved = [r["step"] for r in records(out) if r.get("event") == "checkpoint"]
    assert len(saved) >= 2 and saved[-1] == 600 and saved == sorted(set(saved))


def test_charlm_trains_on_a_user_folder_and_a_changed_corpus_is_reported_on_resume(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    (corpus / "b.md").write_text("pack my box with five dozen liquor jugs\n" * 200)
    out = tmp_path / "run"
    quick = ["--quick", "--data", str(corpus), "--max-steps", "6", "--eval-every-steps", "3"]
    assert main([*quick, "--output-dir", str(out)]) == 0
    assert (out / "samples" / "step_000000006.txt").read_text().startswith("def ")  # the sample prompt
    (corpus / "b.md").write_text("sphinx of black quartz judge my vow\n" * 200)
    caplog.set_level(logging.WARNING)
    assert main([*quick, "--max-steps", "8", "--output-dir", str(out), "--resume", "latest"]) == 0
    assert any("training data changed" in r.getMessage() for r in caplog.records)


def test_missing_data_path_is_a_usage_error(tmp_path, capsys):
    assert main(["--quick", "--data", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "invalid value for data" in capsys.readouterr().err


def test_tensorboard_continues_at_the_resume_step(tmp_path):
    import pytest

    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    args = [*FAST, "--epochs", "0", "--log-with", "tensorboard", "--save-every-steps", "20", "--output-dir", str(out)]
    assert main([*args, "--max-steps", "30"]) == 0
    assert main([*args, "--max-steps", "50", "--resume", str(out / "checkpoints" / "step_000000020")]) == 0
    logs = event_accumulator.EventAccumulator(str(out / "regression"))
    logs.Reload()
    steps = [e.step for e in logs.Scalars("train/loss")]
    assert steps == list(range(5, 55, 5)), "one continuous curve: the first run's steps 25 and 30 are purged"
