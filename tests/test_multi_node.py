"""Two "nodes" on one machine: two torchrun launches (--nnodes 2, one rank each) joined by a c10d rendezvous."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN, free_port

ARGS = [*FAST, "--epochs", "0", "--max-steps", "20", "--save-every-steps", "10", "--device", "cpu"]


def node_cmd(node_rank: int, port: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "test", TRAIN, *ARGS, "--output-dir", str(out), *extra]


def run_two_nodes(runner, out0: Path, out1: Path):
    port = free_port()
    nodes = [runner.start(node_cmd(0, port, out0), cwd=REPO), runner.start(node_cmd(1, port, out1), cwd=REPO)]
    outputs = [proc.communicate(timeout=240)[0] for proc in nodes]
    return [proc.returncode for proc in nodes], outputs


@pytest.mark.slow
def test_two_nodes_sharing_the_output_dir_train_together(runner, tmp_path):
    out = tmp_path / "shared"
    codes, outputs = run_two_nodes(runner, out, out)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es)" in outputs[0]
    assert (out / "checkpoints" / "step_000000020").is_dir()


@pytest.mark.slow
def test_nodes_that_see_different_output_dirs_are_refused_on_every_rank(runner, tmp_path):
    # The same run started on two machines whose OUTPUT_DIR is a node-local disk: here, two different folders.
    out0, out1 = tmp_path / "node0", tmp_path / "node1"
    codes, outputs = run_two_nodes(runner, out0, out1)
    assert codes[0] != 0 and codes[1] != 0
    assert "is not the same directory on every node" in outputs[0], outputs[0][-3000:]
    assert not (out0 / "checkpoints").exists() and not (out1 / "checkpoints").exists()
