"""torchrun --max-restarts with --resume auto: a worker killed with SIGKILL mid-run costs a restart from the last
committed checkpoint, and the job still ends with the weights of a run that was never disturbed."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN, free_port, load_weights, same_tensors, wait_for

from dtrain.exit_status import read as read_status

ARGS = [*FAST, "--epochs", "0", "--max-steps", "200", "--save-every-steps", "20", "--device", "cpu",
        "--resume", "auto"]


def elastic_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", TRAIN, *ARGS,
            "--output-dir", str(out)]


# The agent must not hand a restarted round the previous round's addresses (a known c10d rendezvous hang).
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def worker_pid(out: Path, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in args and f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ \
                and b"torch.distributed.run" not in args:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_worker_killed_mid_run_is_restarted_and_the_job_ends_as_an_undisturbed_one(runner, tmp_path):
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    first = runner.run(elastic_cmd(straight), cwd=REPO, timeout=240, **ELASTIC_ENV)
    assert first.returncode == 0, first.stdout[-3000:]

    proc = runner.start(elastic_cmd(elastic), cwd=REPO, **ELASTIC_ENV)
    wait_for(lambda: (elastic / "checkpoints" / "latest").exists(), what="first checkpoint")
    victim = worker_pid(elastic, rank=1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output, "the restarted round did not resume from a checkpoint"
    assert read_status(elastic)["reason"] == "finished"
    final = "step_000000200"
    assert same_tensors(load_weights(straight / "checkpoints" / final), load_weights(elastic / "checkpoints" / final))
