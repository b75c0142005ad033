"""The SLURM kit's own logic, with stand-in `srun` and `scontrol` on PATH (SLURM is not installed here): USR1 to
the batch shell -> one save -> `dtrain status` says interrupted -> requeue; a finished or failed run is never
requeued; the requeued job resumes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, free_port, wait_for

from dtrain.training.exit_status import read as read_status

SBATCH = str(REPO / "launch_configs" / "slurm" / "dtrain.sbatch")
RUN = [*FAST, "--epochs", "0", "--max-steps", "150", "--save-every-steps", "20"]

STAND_IN_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's own options, run the task on this node (signals reach it directly, as srun relays them)
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
echo "srun $*" >> "$SLURM_RECORD"
exec "$@"
"""
STAND_IN_SCONTROL = """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then echo localhost; exit 0; fi
if [ "$1" = requeue ]; then echo "requeue $2" >> "$SLURM_RECORD"; exit 0; fi
exit 1
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STAND_IN_SRUN), ("scontrol", STAND_IN_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "slurm_record.txt"
    record.touch()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_RECORD": str(record), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "test", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "GPUS_PER_NODE": "1",
           "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path / "run")}
    return env, record, tmp_path / "run"


def job(env: dict, **more: str) -> dict:
    return {**env, "RDZV_PORT": str(free_port()), **more}


def requeues(record: Path) -> list[str]:
    return [line for line in record.read_text().splitlines() if line.startswith("requeue")]


@pytest.mark.slow
def test_usr1_to_the_batch_shell_saves_requeues_and_the_requeued_job_finishes(runner, slurm):
    env, record, out = slurm
    proc = runner.start(["bash", SBATCH, *RUN], cwd=REPO, **job(env))
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), what="first checkpoint")
    proc.send_signal(signal.SIGUSR1)  # --signal=B:USR1 reaches the batch shell only
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    status = read_status(out)
    assert (status["reason"], status["signal"]) == ("interrupted", "SIGUSR1"), output[-3000:]
    assert requeues(record) == ["requeue 4242"]
    # SLURM starts the requeued job with the same script and arguments: it resumes and finishes.
    again = runner.run(["bash", SBATCH, *RUN], cwd=REPO, timeout=180, **job(env, SLURM_RESTART_COUNT="1"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert read_status(out)["reason"] == "finished" and read_status(out)["step"] == 150
    assert requeues(record) == ["requeue 4242"], "a finished run must not be requeued"


@pytest.mark.slow
def test_a_crash_is_not_requeued_and_the_job_fails_with_the_runs_code(runner, slurm):
    env, record, out = slurm
    crash = ["--task", "tests.helpers.tasks:crashing_regression", *RUN[2:]]
    result = runner.run(["bash", SBATCH, *crash], cwd=REPO, timeout=180, **job(env))
    assert result.returncode == 1, result.stdout[-3000:]
    assert read_status(out)["reason"] == "failed"
    assert requeues(record) == []
