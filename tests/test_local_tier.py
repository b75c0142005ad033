"""The node-local tier: two "nodes" on one machine (two torchrun agents, --nnodes 2, one rank each, each with its own
local dir through {node_rank}), killed with SIGKILL and resumed from the fastest tier that is complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN, assert_same_end, free_port, wait_for

from dtrain.checkpoint.layout import step_dirs, verify_checkpoint

STEPS = ["--epochs", "0", "--max-steps", "16", "--device", "cpu", "--save-every-steps", "10",
         "--save-every-seconds", "0"]
LOCAL = ["--local-save-every-steps", "3"]
TIMEOUT = 240


def node_cmd(node_rank: int, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
            "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), TRAIN, *FAST,
            *STEPS, *args]


def run_two_nodes(runner, *args: str, **env: str) -> tuple[list[int], str]:
    port = free_port()
    nodes = [runner.start(node_cmd(n, port, *args), cwd=REPO, **env) for n in (0, 1)]
    outputs = []
    for proc in nodes:
        try:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
        except Exception:
            runner.cleanup()
            raise
    return [proc.returncode for proc in nodes], "\n".join(o[-4000:] for o in outputs)


def local_args(root: Path) -> list[str]:
    return ["--local-checkpoint-dir", str(root / "local" / "{node_rank}"), *LOCAL]


def every_local_checkpoint_complete(root: Path) -> int:
    """Every committed-looking local checkpoint (own and replicas) verifies; returns how many there are."""
    count = 0
    for node_dir in (root / "local").glob("*/node_*"):
        for path in step_dirs(node_dir):
            check = verify_checkpoint(path, checksums=True)
            assert check.ok, f"{path}: {check.reason}"
            count += 1
    return count


def resume_event(out: Path) -> dict:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("event") == "resume"][-1]


def uninterrupted_run(tmp_path_factory, *args: str) -> Path:
    """The two-node run with `args`, never interrupted, without a local tier: its output dir."""
    from conftest import Runner

    runner, root = Runner(), tmp_path_factory.mktemp("reference")
    try:
        codes, output = run_two_nodes(runner, *args, "--output-dir", str(root / "out"))
    finally:
        runner.cleanup()
    assert codes == [0, 0], output
    return root / "out"


def run_killed_after_step_12(tmp_path_factory, *args: str) -> Path:
    """The two-node run with `args`, every process SIGKILLed right after its 4th local save (step 12) committed and
    replicated; the persistent tier holds step 10. Returns its root (out/ and local/)."""
    from conftest import Runner

    runner, root = Runner(), tmp_path_factory.mktemp("killed")
    try:
        codes, output = run_two_nodes(runner, *args, "--output-dir", str(root / "out"), *local_args(root),
                                      DTRAIN_FAULT_AT="local_retention_done", DTRAIN_FAULT_AFTER_SAVES="3")
    finally:
        runner.cleanup()
    assert codes != [0, 0], output
    assert (root / "local/0/node_0/step_000000012").is_dir() and (root / "local/1/node_0/step_000000012").is_dir()
    assert [p.name for p in step_dirs(root / "out" / "checkpoints")] == ["step_000000010"]
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted_run(tmp_path_factory)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    return run_killed_after_step_12(tmp_path_factory)


def copy_of(killed: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(killed, root, symlinks=True)
    # The output dir records absolute paths nowhere that a resume reads; the local dirs move with it.
    return root


@pytest.mark.slow
def test_kill_9_of_every_process_resumes_from_the_local_tier_exactly(runner, killed, reference, tmp_path):
    root = copy_of(killed, tmp_path)
    assert every_local_checkpoint_complete(root) == 8  # 2 nodes x (own + replica) x newest 2
    codes, output = run_two_nodes(runner, "--output-dir", str(root / "out"), *local_args(root), "--resume", "auto")
    assert codes == [0, 0], output
    event = resume_event(root / "out")
    assert (event["step"], event["tier"]) == (12, "local"), event
    assert (root / "out/checkpoints/step_000000012").is_dir(), "the local checkpoint was not promoted"
    assert_same_end(root / "out", reference)


@pytest.mark.slow
def test_a_node_that_comes_back_empty_resumes_from_its_peers_replica_exactly(runner, killed, reference, tmp_path):
    root = copy_of(killed, tmp_path)
    shutil.rmtree(root / "local" / "1")  # node 1 replaced: its RAM disk is empty
    codes, output = run_two_nodes(runner, "--output-dir", str(root / "out"), *local_args(root), "--resume", "auto")
    assert codes == [0, 0], output
    event = resume_event(root / "out")
    assert (event["step"], event["tier"]) == (12, "peer"), event
    assert "came back without its local checkpoint step_000000012" in output
    assert_same_end(root / "out", reference)


@pytest.mark.slow
def test_with_every_local_dir_wiped_the_run_falls_back_to_the_persistent_tier(runner, killed, reference, tmp_path):
    root = copy_of(killed, tmp_path)
    shutil.rmtree(root / "local")
    codes, output = run_two_nodes(runner, "--output-dir", str(root / "out"), *local_args(root), "--resume", "auto")
    assert codes == [0, 0], output
    event = resume_event(root / "out")
    assert (event["step"], event["tier"]) == (10, "persistent"), event
    assert_same_end(root / "out", reference)


def test_local_tier_flags_need_a_local_dir_and_only_its_two_placeholders():
    from dtrain.config.local_tier import LocalTierConfig
    from dtrain.errors import UsageError

    with pytest.raises(UsageError, match="local_save_every_steps: 3; accepted: a value only with local_checkpoint_dir"):
        LocalTierConfig(local_save_every_steps=3).validate()
    with pytest.raises(UsageError, match=r"the only placeholders are \{node_rank\} and \{rank\}"):
        LocalTierConfig(local_checkpoint_dir="/dev/shm/{node}").validate()
    LocalTierConfig(local_checkpoint_dir="/dev/shm/run/{node_rank}-{rank}", local_save_every_steps=5).validate()


def test_one_process_saves_locally_resumes_from_it_after_kill_9_and_ckpt_list_shows_it(runner, tmp_path, capsys):
    from dtrain.commands.cli import main

    out, local = tmp_path / "out", tmp_path / "local"
    cmd = [sys.executable, TRAIN, *FAST, *STEPS, *LOCAL, "--output-dir", str(out), "--local-checkpoint-dir", str(local)]
    killed = runner.run(cmd, cwd=REPO, DTRAIN_FAULT_AT="local_renamed", DTRAIN_FAULT_AFTER_SAVES="3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    # Killed after the rename, before retention: three complete local checkpoints.
    assert [p.name for p in step_dirs(local / "node_0")] == ["step_000000006", "step_000000009", "step_000000012"]
    assert main(["ckpt", "list", str(out), "--json", "--local-checkpoint-dir", str(local)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["tier"], r["name"], r["complete"]) for r in rows] == [
        ("persistent", "step_000000010", True), ("local", "step_000000006", True), ("local", "step_000000009", True),
        ("local", "step_000000012", True)]
    resumed = runner.run([*cmd, "--resume", "auto"], cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert (resume_event(out)["step"], resume_event(out)["tier"]) == (12, "local")
    plain = runner.run([sys.executable, TRAIN, *FAST, *STEPS, "--output-dir", str(tmp_path / "plain")], cwd=REPO)
    assert plain.returncode == 0, plain.stdout[-3000:]
    assert_same_end(out, tmp_path / "plain")


SIGTERM_ARGS = [*FAST, "--epochs", "0", "--max-steps", "400", "--device", "cpu", "--save-every-steps", "5",
                "--save-every-seconds", "0", "--local-save-every-steps", "1"]


def sigterm_after_two_persistent_saves(runner, cmd: list[str], out: Path) -> tuple[int, str, dict]:
    proc = runner.start(cmd, cwd=REPO)

    def persistent_saves() -> int:
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return sum('"event": "checkpoint"' in line and '"tier"' not in line for line in lines)

    wait_for(lambda: persistent_saves() >= 2 or proc.poll() is not None, timeout=120, what="two persistent saves")
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    return proc.returncode, output, json.loads((out / "exit_status.json").read_text())


@pytest.mark.slow
def test_sigterm_with_too_little_grace_for_the_persistent_save_leaves_it_local_and_the_next_start_promotes_it(
        runner, tmp_path):
    # A stop at a step its schedule saves persistently anyway (every 5th) finishes that save: the stop is then
    # in the persistent tier. Tried again (fresh dirs) until the stop falls between two persistent saves.
    for attempt in range(6):
        out, local = tmp_path / f"out{attempt}", tmp_path / f"local{attempt}"
        cmd = [sys.executable, TRAIN, *SIGTERM_ARGS, "--output-dir", str(out), "--local-checkpoint-dir", str(local),
               "--signal-grace-seconds", "0.001"]
        _, output, status = sigterm_after_two_persistent_saves(runner, cmd, out)
        stop = status["step"]
        assert status["checkpoint"] == f"step_{stop:09d}", status
        if stop % 5 == 0:
            assert status["checkpoint_tier"] == "persistent", status
            assert verify_checkpoint(out / "checkpoints" / f"step_{stop:09d}", checksums=True).ok
            continue
        assert status["checkpoint_tier"] == "local", status
        break
    else:
        pytest.fail("six stops in a row fell on a step saved persistently by its schedule")
    assert "the stop checkpoint of step" in output and "local tier" in output
    assert verify_checkpoint(local / "node_0" / f"step_{stop:09d}", checksums=True).ok
    assert not (out / "checkpoints" / f"step_{stop:09d}").exists(), "the persistent save should have been left"

    again = runner.run([*cmd, "--resume", "auto", "--max-steps", str(stop + 2)], cwd=REPO, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "promoted the local checkpoint" in again.stdout
    assert verify_checkpoint(out / "checkpoints" / f"step_{stop:09d}", checksums=True).ok
    assert resume_event(out)["tier"] == "local"


# ------------------------------------------------------------------------------------------- kills during saves

KILL_STEPS = ["--epochs", "0", "--max-steps", "22", "--device", "cpu", "--save-every-steps", "0",
              "--save-every-seconds", "0"]


def restarting_cmd(out: Path, *args: str) -> list[str]:
    """One torchrun with two ranks that restarts its workers when one dies; each rank is a node of the local tier
    ({rank} in the dir), so every local save is also replicated to the other."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "12",
            "--monitor-interval", "0.1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            TRAIN, *FAST, *KILL_STEPS, "--output-dir", str(out), *args]


@pytest.mark.slow
def test_kills_during_local_saves_and_replications_never_leave_a_broken_checkpoint(runner, tmp_path):
    """20 SIGKILLs, each restarted at once with --resume auto: 10 while a local save writes its files (every rank),
    10 while rank 1 receives its peer's replica. The run still ends exactly where an uninterrupted one does."""
    ref = runner.run(restarting_cmd(tmp_path / "ref"), cwd=REPO, timeout=TIMEOUT,
                     TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert ref.returncode == 0, ref.stdout[-3000:]
    faults = {"saving": {"DTRAIN_FAULT_AT": "local_state_written", "DTRAIN_FAULT_AFTER_SAVES": "1"},
              "replicating": {"DTRAIN_FAULT_AT": "replica_started", "DTRAIN_FAULT_RANK": "1",
                              "DTRAIN_FAULT_AFTER_SAVES": "0"}}
    for name, fault in faults.items():
        root = tmp_path / name
        local = ["--local-checkpoint-dir", str(root / "local" / "{rank}"), "--local-save-every-steps", "2",
                 "--resume", "auto"]
        result = runner.run(restarting_cmd(root / "out", *local), cwd=REPO, timeout=TIMEOUT,
                            TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **fault)
        assert result.returncode == 0, result.stdout[-4000:]
        events = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
        resumes = [e for e in events if e.get("event") == "resume"]
        tiers = [(e["step"], e["tier"]) for e in resumes]
        assert len(resumes) >= 10 and all(tier in ("local", "peer") for _, tier in tiers), (name, tiers)
        assert "skipping damaged" not in result.stdout
        assert every_local_checkpoint_complete(root) > 0
        assert_same_end(root / "out", tmp_path / "ref")
