"""The node-local tier of a sharded (FSDP2) run: two "nodes" on one machine (two torchrun agents, --nnodes 2, one
rank each, each with its own local dir), where each node's local checkpoint holds only its own rank's shards.
Killed with SIGKILL and resumed from the local tier, or from the peer's replica, exactly; the resumed checkpoint is
promoted to the persistent tier as a whole sharded checkpoint, which resumes exactly on its own."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_local_tier import copy_of, every_local_checkpoint_complete, local_args, resume_event, \
    run_killed_after_step_12, run_two_nodes, uninterrupted_run

from dtrain.checkpoint.layout import verify_checkpoint
from dtrain.checkpoint.sharded import SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR, full_state, is_sharded

pytestmark = pytest.mark.slow

SHARDED = ["--sharding", "fsdp2"]


def same_values(a, b, where: str = "") -> None:
    """Nested state (tensors in dicts and lists), equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            same_values(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_values(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_same_sharded_end(a, b) -> None:
    """Two sharded runs ended at the same step with the same whole model and optimizer state, bit for bit."""
    ca = a / "checkpoints" / (a / "checkpoints" / "latest").read_text().strip()
    cb = b / "checkpoints" / (b / "checkpoints" / "latest").read_text().strip()
    assert ca.name == cb.name and is_sharded(ca) and is_sharded(cb)
    for name in (SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR):
        same_values(full_state(ca / name), full_state(cb / name), name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same two-node sharded run, never interrupted, without a local tier."""
    return uninterrupted_run(tmp_path_factory, *SHARDED)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A two-node sharded run, every process SIGKILLed right after its 4th local save (step 12)."""
    return run_killed_after_step_12(tmp_path_factory, *SHARDED)


def test_each_node_keeps_its_own_ranks_shards_and_a_replica_of_its_peers(killed):
    assert every_local_checkpoint_complete(killed) == 8  # 2 own + 2 replicas, on each node
    for node, peer in ((0, 1), (1, 0)):
        own = killed / "local" / str(node) / f"node_{node}" / "step_000000012"
        replica = killed / "local" / str(peer) / f"node_{node}" / "step_000000012"
        for path in (own, replica):
            names = {p.name for p in path.iterdir()}
            assert f"shards_rank{node}" in names and f"shards_rank{peer}" not in names, names
            assert not is_sharded(path)  # one node's shards are not a persistent sharded checkpoint
            assert (path / f"shards_rank{node}" / SHARDED_MODEL_DIR / ".metadata").is_file()
            assert (path / f"shards_rank{node}" / SHARDED_OPTIMIZER_DIR / ".metadata").is_file()
        assert (own / "manifest.json").read_text() == (replica / "manifest.json").read_text()


def test_kill_9_resumes_from_the_local_shards_exactly_and_promotes_a_whole_sharded_checkpoint(
        runner, killed, reference, tmp_path):
    root = copy_of(killed, tmp_path)
    codes, output = run_two_nodes(runner, *SHARDED, "--output-dir", str(root / "out"), *local_args(root),
                                  "--resume", "auto")
    assert codes == [0, 0], output
    event = resume_event(root / "out")
    assert (event["step"], event["tier"]) == (12, "local")
    assert "promoted the local checkpoint step_000000012" in output
    promoted = root / "out" / "checkpoints" / "step_000000012"
    assert is_sharded(promoted) and verify_checkpoint(promoted, checksums=True).ok
    assert sorted(p.name for p in (promoted / SHARDED_MODEL_DIR).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert_same_sharded_end(root / "out", reference)

    # The promoted checkpoint is a persistent one in its own right: with the local tier gone, it resumes exactly.
    shutil.rmtree(root / "local")
    shutil.rmtree(root / "out" / "checkpoints" / "step_000000016")
    (root / "out" / "checkpoints" / "latest").write_text("step_000000012\n")
    codes, output = run_two_nodes(runner, *SHARDED, "--output-dir", str(root / "out"), "--resume", "latest",
                                  "--strict-resume")
    assert codes == [0, 0], output
    assert (resume_event(root / "out")["step"], resume_event(root / "out")["tier"]) == (12, "persistent")
    assert_same_sharded_end(root / "out", reference)


def test_a_node_that_comes_back_empty_gets_its_shards_from_its_peer_and_resumes_exactly(
        runner, killed, reference, tmp_path):
    root = copy_of(killed, tmp_path)
    shutil.rmtree(root / "local" / "1")  # node 1 replaced: its local disk is empty
    codes, output = run_two_nodes(runner, *SHARDED, "--output-dir", str(root / "out"), *local_args(root),
                                  "--resume", "auto")
    assert codes == [0, 0], output
    assert (resume_event(root / "out")["step"], resume_event(root / "out")["tier"]) == (12, "peer")
    assert_same_sharded_end(root / "out", reference)


def test_when_a_ranks_shards_are_lost_on_every_node_the_run_resumes_from_the_persistent_tier_exactly(
        runner, killed, reference, tmp_path):
    """Rank 0's shards are gone from both copies of step 12 (its own and the replica): no fast copy of step 12 is
    complete, and step 9 is older than the persistent tier's step 10, which the run resumes from."""
    root = copy_of(killed, tmp_path)
    for node in (0, 1):
        shutil.rmtree(root / "local" / str(node) / "node_0" / "step_000000012" / "shards_rank0")
    codes, output = run_two_nodes(runner, *SHARDED, "--output-dir", str(root / "out"), *local_args(root),
                                  "--resume", "auto")
    assert codes == [0, 0], output
    assert (resume_event(root / "out")["step"], resume_event(root / "out")["tier"]) == (10, "persistent")
    assert_same_sharded_end(root / "out", reference)
