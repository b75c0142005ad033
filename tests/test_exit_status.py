"""exit_status.json and `dtrain status`: how a run ended, readable even where a launcher hides the exit code."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN, free_port, launch_cmd, wait_for

from dtrain.commands.cli import main as cli_main
from dtrain.commands.train import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SHORT = [*FAST, "--max-steps", "12", "--save-every-steps", "6"]
LONG = [*FAST, "--epochs", "0", "--max-steps", "1000000", "--save-every-steps", "20"]


def status(out: Path) -> dict:
    return json.loads((out / "exit_status.json").read_text())


def test_finished_run_records_finished_and_status_exits_0(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SHORT, "--output-dir", str(out)]) == 0
    s = status(out)
    assert (s["reason"], s["exit_code"], s["signal"], s["step"], s["checkpoint"]) == \
        ("finished", 0, None, 12, "step_000000012")
    capsys.readouterr()
    assert cli_main(["status", str(out)]) == 0
    assert capsys.readouterr().out.startswith("finished (exit code 0) at step 12")


def test_early_stop_is_its_own_reason(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--max-steps", "500", "--eval-every-steps", "10", "--mode", "max",
                 "--early-stopping-patience", "1", "--output-dir", str(out)]) == 0
    assert status(out)["reason"] == "early_stop"


def test_refused_start_records_usage_error_and_status_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SHORT, "--output-dir", str(out)]) == 0
    assert main([*SHORT, "--output-dir", str(out)]) == 2  # checkpoints exist, neither --resume nor --overwrite
    s = status(out)
    assert (s["reason"], s["exit_code"]) == ("usage_error", 2)
    capsys.readouterr()
    assert cli_main(["status", str(out), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["reason"] == "usage_error"


def test_bad_flags_write_nothing(tmp_path):
    assert main([*SHORT, "--lr", "-1", "--output-dir", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


def test_a_run_refused_by_the_lock_leaves_the_owners_status_alone(tmp_path):
    out = tmp_path / "run"
    assert main([*SHORT, "--output-dir", str(out)]) == 0
    before = (out / "exit_status.json").read_text()
    fd = os.open(out / ".dtrain.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a live run would hold it
    try:
        assert main([*SHORT, "--output-dir", str(out), "--resume", "latest"]) == 2
    finally:
        os.close(fd)
    assert (out / "exit_status.json").read_text() == before


def test_status_without_a_recorded_run_exits_2_with_one_line(tmp_path, capsys):
    assert cli_main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain: error:") and "exit_status.json" in err[0]


@pytest.mark.slow
def test_crash_records_failed_with_the_last_checkpoint(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.run([sys.executable, TRAIN, "--task", "tests.helpers.tasks:crashing_regression", *FAST[2:],
                         "--max-steps", "30", "--save-every-steps", "5", "--output-dir", str(out)], cwd=REPO)
    assert result.returncode == 1 and "simulated crash" in result.stdout
    s = status(out)
    assert (s["reason"], s["exit_code"], s["step"], s["checkpoint"]) == ("failed", 1, 11, "step_000000010")
    assert "--resume latest" in s["resume_command"]


def torchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), TRAIN, *args]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "accelerate-2", "torchrun-2"])
def test_sigterm_is_recorded_as_interrupted_behind_any_launcher(runner, tmp_path, launcher):
    out = tmp_path / "run"
    args = [*LONG, "--output-dir", str(out)]
    cmd = {"python": lambda: launch_cmd(TRAIN, *args), "accelerate-2": lambda: launch_cmd(TRAIN, *args, processes=2),
           "torchrun-2": lambda: torchrun_cmd(*args, "--device", "cpu")}[launcher]()
    env = {"ACCELERATE_USE_CPU": "true"} if launcher == "torchrun-2" else {}  # gloo ranks under torchrun on a CPU
    proc = runner.start(cmd, cwd=REPO, **env)
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), what="first checkpoint")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    s = status(out)
    assert (s["reason"], s["exit_code"], s["signal"]) == ("interrupted", 143, "SIGTERM"), s
    assert s["checkpoint"] == f"step_{s['step']:09d}" and "--resume latest" in s["resume_command"]
    assert cli_main(["status", str(out)]) == 143
