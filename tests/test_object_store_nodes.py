"""Two "nodes" without a shared filesystem: two torchrun launches (--nnodes 2, one rank each, c10d rendezvous on
loopback), each with its own local output dir, checkpoints in an S3 store (moto)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN, free_port, load_weights, same_tensors

from dtrain.checkpoint.object_store import ObjectStore

ARGS = [*FAST, "--epochs", "0", "--max-steps", "30", "--save-every-steps", "10", "--device", "cpu"]


def node_cmd(node_rank: int, port: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "test", TRAIN, *ARGS, "--output-dir", str(out), *extra]


def start_two_nodes(runner, out0: Path, out1: Path, *extra: str, **env: str):
    port = free_port()
    return [runner.start(node_cmd(0, port, out0, *extra), cwd=REPO, **env),
            runner.start(node_cmd(1, port, out1, *extra), cwd=REPO, **env)]


def finish(nodes):
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in nodes]
    except subprocess.TimeoutExpired:
        for proc in nodes:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a node did not finish:\n" + "\n----\n".join(p.communicate()[0][-3000:] for p in nodes))
    return [proc.returncode for proc in nodes], outputs


def run_two_nodes(runner, out0: Path, out1: Path, *extra: str, **env: str):
    return finish(start_two_nodes(runner, out0, out1, *extra, **env))


@pytest.mark.slow
def test_nodes_with_their_own_disks_resume_from_the_store_after_both_were_killed(runner, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/nodes"
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # node-local disks: neither sees the other's
    # Both ranks die with SIGKILL in the middle of uploading step 20.
    codes, outputs = run_two_nodes(runner, node0, node1, "--checkpoint-dir", uri,
                                   DTRAIN_FAULT_AT="upload_started", DTRAIN_FAULT_AFTER_SAVES="1")
    assert codes[0] != 0 and codes[1] != 0, outputs[0][-3000:]
    store = ObjectStore(uri)
    assert [n for n in store.step_names() if store.has_manifest(n)] == ["step_000000010"]
    assert store.read_pointer("latest") == "step_000000010"

    codes, outputs = run_two_nodes(runner, node0, node1, "--checkpoint-dir", uri, "--resume", "latest")
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f"resumed from {uri}/step_000000010" in outputs[0]
    assert "2 process(es)" in outputs[0]
    committed = [n for n in store.step_names() if store.verify(n, checksums=True).ok]
    assert committed == store.step_names() == ["step_000000010", "step_000000020", "step_000000030"]
    # The second node kept nothing: no checkpoints, no staging copies, no logs (those live on rank 0's node).
    assert not (node1 / "checkpoints").exists() and not any((node1 / ".staging").iterdir())
    assert not (node1 / "metrics.jsonl").exists()

    # The same job, undisturbed, on a filesystem both nodes share. Not started alongside the others: a port
    # that free_port() hands out may be taken meanwhile by another launch's workers.
    shared = tmp_path / "straight"
    codes, outputs = run_two_nodes(runner, shared, shared)
    assert codes == [0, 0], outputs[0][-3000:]
    from safetensors.torch import load

    assert same_tensors(load(store.read_bytes("step_000000030", "model.safetensors")),
                        load_weights(shared / "checkpoints" / "step_000000030"))


@pytest.mark.slow
def test_sharded_nodes_with_their_own_disks_upload_their_own_shards_and_resume_exactly(runner, s3_bucket, tmp_path):
    from dtrain.commands.verify_resume import compare_checkpoints

    uri = f"{s3_bucket}/sharded-nodes"
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    codes, outputs = run_two_nodes(runner, node0, node1, "--sharding", "fsdp2", "--checkpoint-dir", uri,
                                   DTRAIN_FAULT_AT="upload_started", DTRAIN_FAULT_AFTER_SAVES="1")
    assert codes[0] != 0 and codes[1] != 0, outputs[0][-3000:]
    assert "sharded with FSDP2 over 2 ranks" in outputs[1]
    store = ObjectStore(uri)
    assert store.read_pointer("latest") == "step_000000010"
    codes, outputs = run_two_nodes(runner, node0, node1, "--sharding", "fsdp2", "--checkpoint-dir", uri,
                                   "--resume", "latest")
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    manifest = store.read_manifest("step_000000030")["files"]
    assert sorted(n for n in manifest if n.endswith(".distcp")) == [
        "optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp",
        "pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"]  # each node uploaded its own
    assert store.verify("step_000000030", checksums=True).ok
    assert not (node1 / "checkpoints").exists()

    shared = tmp_path / "straight"
    codes, outputs = run_two_nodes(runner, shared, shared, "--sharding", "fsdp2")
    assert codes == [0, 0], outputs[0][-3000:]
    downloaded = store.download("step_000000030", tmp_path / "downloaded" / "step_000000030")
    rows = compare_checkpoints(shared / "checkpoints" / "step_000000030", downloaded)
    assert [row for row in rows if not row[1]] == []
