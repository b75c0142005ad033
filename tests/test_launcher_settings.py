"""The launcher's settings (accelerate launch flags or its config file) apply unless dtrain's own flag says otherwise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO, TRAIN

from dtrain.training.runtime import launcher_settings, resolve_device, resolve_precision

SHORT = [*FAST, "--max-steps", "4", "--eval-every-steps", "4"]


def accelerate_launch(*launch_flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", *launch_flags]


def recorded_precision(out: Path) -> tuple[str, str]:
    config = yaml.safe_load((out / "config.yaml").read_text())
    state = json.loads((out / "checkpoints" / "step_000000004" / "trainer_state.json").read_text())
    return config["train"]["mixed_precision"], state["mixed_precision"]


def test_precision_unset_by_dtrain_follows_the_launcher(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision(None) == ("bf16", None)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_precision(None) == ("no", None)


def test_dtrains_own_precision_wins_and_a_conflict_is_named(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    precision, conflict = resolve_precision("no")
    assert precision == "no" and "bf16" in conflict and "wins" in conflict
    assert resolve_precision("bf16") == ("bf16", None)


def test_launcher_cpu_flag_makes_auto_device_the_cpu(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert launcher_settings()["device"] == "cpu" and resolve_device("auto") == "cpu"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    assert "device" not in launcher_settings()


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_flag_is_used_and_recorded(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.run([*accelerate_launch("--cpu", "--mixed_precision", "bf16"), TRAIN, *SHORT,
                         "--output-dir", str(out)], timeout=180)
    assert result.returncode == 0, result.stdout[-3000:]
    assert recorded_precision(out) == ("bf16", "bf16")


@pytest.mark.slow
def test_dtrain_flag_overrides_the_launch_config_file_with_one_warning(runner, tmp_path):
    launch_config = yaml.safe_load((REPO / "launch_configs" / "cpu.yaml").read_text())
    launch_config["mixed_precision"] = "bf16"
    config_file = tmp_path / "bf16.yaml"
    config_file.write_text(yaml.safe_dump(launch_config))
    out = tmp_path / "run"
    result = runner.run([*accelerate_launch("--config_file", str(config_file)), TRAIN, *SHORT,
                         "--mixed-precision", "no", "--output-dir", str(out)], timeout=180)
    assert result.returncode == 0, result.stdout[-3000:]
    assert recorded_precision(out) == ("no", "no")
    assert result.stdout.count("the launcher asked for mixed precision 'bf16'") == 1, result.stdout[-3000:]
