"""torchrun --max-restarts with --resume auto: a worker killed with SIGKILL mid-run costs a restart from the last
committed checkpoint, and the job still ends with the weights of a run that was never disturbed."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN, free_port, load_weights, same_tensors, trainer_pids, wait_for

from dtrain.training.exit_status import read as read_status

ARGS = [*FAST, "--epochs", "0", "--max-steps", "200", "--save-every-steps", "20", "--device", "cpu",
        "--resume", "auto"]


def elastic_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", TRAIN, *ARGS,
            "--output-dir", str(out)]


# The agent must not hand a restarted round the previous round's addresses (a known c10d rendezvous hang).
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.mark.slow
def test_worker_killed_mid_run_is_restarted_and_the_job_ends_as_an_undisturbed_one(runner, tmp_path):
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    first = runner.run(elastic_cmd(straight), cwd=REPO, timeout=240, **ELASTIC_ENV)
    assert first.returncode == 0, first.stdout[-3000:]

    proc = runner.start(elastic_cmd(elastic), cwd=REPO, **ELASTIC_ENV)
    wait_for(lambda: (elastic / "checkpoints" / "latest").exists(), what="first checkpoint")
    wait_for(lambda: 1 in trainer_pids(elastic), what="rank 1")
    os.kill(trainer_pids(elastic)[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output, "the restarted round did not resume from a checkpoint"
    assert read_status(elastic)["reason"] == "finished"
    final = "step_000000200"
    assert same_tensors(load_weights(straight / "checkpoints" / final), load_weights(elastic / "checkpoints" / final))
