"""The commit protocol under faults: a crash or kill at any moment, a full disk, two ranks, plain Accelerate.

Whatever happens, every directory under checkpoints/ whose name does not start with "." verifies against its
manifest, `latest` names one of them, and the next start cleans up and resumes.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, load_weights, reset_accelerate, same_tensors, train_cmd, train_in_process, wait_for

from dtrain.checkpoint import CheckpointManager, RetentionPolicy, verify_checkpoint
from dtrain.checkpoint.layout import read_pointer, step_dirs
from dtrain.checkpoint.local_commit import STAGES
from dtrain.checkpoint.retention import CheckpointRecord, checkpoints_to_keep
from dtrain.errors import CheckpointError
from dtrain.training.metrics import read_records

CRASH_ARGS = [*FAST, "--save-every-steps", "10", "--max-steps", "30"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def assert_consistent(checkpoints: Path) -> list[str]:
    """The contract's invariant: every non-dot dir verifies with checksums, `latest` names one of them."""
    names = []
    for path in checkpoints.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        check = verify_checkpoint(path, checksums=True)
        assert check.ok, f"{path.name}: {check.reason}"
        names.append(path.name)
    latest = read_pointer(checkpoints, "latest")
    assert latest in names, f"latest={latest!r}, checkpoints={sorted(names)}"
    best = read_pointer(checkpoints, "best")
    assert best is None or best in names
    return sorted(names)


def dot_entries(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ in-process


def make_manager(tmp_path: Path, policy: RetentionPolicy = RetentionPolicy()):
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return CheckpointManager(accelerator, tmp_path / "checkpoints", policy), model


def save(manager: CheckpointManager, model, step: int, metric: float | None = None):
    with torch.no_grad():
        model.weight.add_(1.0)  # every checkpoint holds different weights
    return manager.save(step, {"global_step": step, "epoch": 0}, metric)


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("stage", STAGES)
def test_failure_after_each_stage_keeps_earlier_checkpoints_and_latest(tmp_path, monkeypatch, stage):
    manager, model = make_manager(tmp_path)
    save(manager, model, 1)
    save(manager, model, 2)
    before = {name: files_of(manager.dir / name) for name in ("step_000000001", "step_000000002")}

    def fail_at(self, reached):
        if reached == stage:
            raise RuntimeError(f"injected fault after {reached}")

    monkeypatch.setattr(CheckpointManager, "_reached", fail_at)
    with pytest.raises(CheckpointError) as error:  # after the commit too: every rank raises the same error
        save(manager, model, 3)
    assert "injected fault" in str(error.value) or "injected fault" in str(error.value.__cause__)

    names = assert_consistent(manager.dir)
    for name, files in before.items():
        assert files_of(manager.dir / name) == files, f"{name} was changed by the failed save"
    committed = STAGES.index(stage) >= STAGES.index("renamed")
    assert ("step_000000003" in names) == committed
    latest = read_pointer(manager.dir, "latest")
    assert latest == ("step_000000003" if STAGES.index(stage) >= STAGES.index("pointers_written")
                      else "step_000000002")
    assert not [n for n in dot_entries(manager.dir) if n.startswith(".tmp-")], "the temp dir must be removed"

    # The next save works normally.
    monkeypatch.undo()
    save(manager, model, 4)
    assert read_pointer(manager.dir, "latest") == "step_000000004"
    assert_consistent(manager.dir)


def test_resaving_a_step_that_has_a_damaged_directory_replaces_it(tmp_path):
    manager, model = make_manager(tmp_path)
    save(manager, model, 1)
    damaged = manager.dir / "step_000000002"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes(b"half a file")
    (damaged / "leftover.bin").write_bytes(b"x")
    assert not verify_checkpoint(damaged).ok
    save(manager, model, 2)
    assert verify_checkpoint(damaged, checksums=True).ok
    assert not (damaged / "leftover.bin").exists(), "the old directory's files must not survive"
    assert read_pointer(manager.dir, "latest") == "step_000000002"
    assert dot_entries(manager.dir) == []
    assert same_tensors(load_weights(damaged), {k: v.detach().clone() for k, v in model.state_dict().items()})


def test_resaving_over_a_stale_temp_dir_of_the_same_step(tmp_path):
    manager, model = make_manager(tmp_path)
    stale = manager.dir / ".tmp-step_000000001"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a crashed save")
    save(manager, model, 1)
    listed = json.loads((manager.dir / "step_000000001" / "manifest.json").read_text())["files"]
    assert sorted(p.name for p in (manager.dir / "step_000000001").iterdir()) == sorted([*listed, "manifest.json"])
    assert dot_entries(manager.dir) == []


def test_plain_accelerate_load_state_reads_a_dtrain_checkpoint(tmp_path, capsys):
    from accelerate import Accelerator

    from dtrain.config import TaskConfig
    from dtrain.tasks.regression import build
    from dtrain.training.trainer import warmup_cosine

    out = tmp_path / "run"
    assert train_in_process(*FAST, "--output-dir", str(out), "--max-steps", "10", "--save-every-steps", "10") == 0, \
        capsys.readouterr().err
    checkpoint = out / "checkpoints" / "step_000000010"

    accelerator = Accelerator()
    task = build(TaskConfig(task="regression", n_layer=2, n_embd=32), seed=1234)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(5, 10, 0.1))
    model, optimizer, scheduler = accelerator.prepare(task.model, optimizer, scheduler)
    saved = load_weights(checkpoint)
    assert not same_tensors(saved, {k: v.detach().clone() for k, v in model.state_dict().items()})

    accelerator.load_state(str(checkpoint))
    assert same_tensors(saved, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert scheduler.scheduler.last_epoch == 10
    steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
    assert steps == {10}


def test_full_disk_fails_cleanly_and_leaves_earlier_checkpoints(tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(checkpoints)],
                             capture_output=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        # About 0.85 MB per checkpoint: the fourth save cannot fit in 3 MB.
        code = train_in_process(*FAST, "--output-dir", str(out), "--n-embd", "256", "--save-every-steps", "5",
                                "--max-steps", "40", "--keep-last", "0")
        err = capsys.readouterr().err
        assert code == 1, err
        # (searched, not matched at a line start: the progress bar may still hold the line when it is printed)
        lines = re.findall(r"dtrain: error:[^\r\n]*", err)
        assert lines and "saving checkpoint" in lines[0] and "failed" in lines[0], err
        assert "full" in lines[0] or "No space left" in lines[0], lines[0]
        assert "Traceback" not in err
        names = assert_consistent(checkpoints)
        assert len(names) >= 2, names
        assert read_pointer(checkpoints, "latest") == names[-1]
        assert not [n for n in dot_entries(checkpoints) if ".tmp-" in n], dot_entries(checkpoints)
        events = [r for r in read_records(out / "metrics.jsonl") if r.get("event") == "checkpoint"]
        assert [Path(e["path"]).name for e in events] == names, "every committed save was reported, no other"
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], capture_output=True, timeout=30)


# ------------------------------------------------------------------------------------------------ real processes


def test_kill_at_every_protocol_stage_leaves_a_resumable_run(runner, tmp_path, capsys):
    """SIGKILL inside the 2nd save (step 20) at each stage; afterwards all is consistent and resume is exact."""
    procs = {}
    for stage in STAGES:
        out = tmp_path / stage
        procs[stage] = (out, runner.start(train_cmd(*CRASH_ARGS, "--output-dir", str(out)),
                                          DTRAIN_FAULT_AT=stage, DTRAIN_FAULT_AFTER_SAVES="1"))
    for stage, (out, proc) in procs.items():
        try:
            output, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{stage}: the faulted run did not die")
        assert proc.returncode == -9, f"{stage}: the fault did not fire (rc {proc.returncode})\n{output[-3000:]}"

    straight = tmp_path / "straight"
    assert train_in_process(*CRASH_ARGS, "--output-dir", str(straight)) == 0, capsys.readouterr().err
    expected_weights = load_weights(straight / "checkpoints" / "step_000000030")

    for stage, (out, _) in procs.items():
        checkpoints = out / "checkpoints"
        names = assert_consistent(checkpoints)
        committed = STAGES.index(stage) >= STAGES.index("renamed")
        assert names == (["step_000000010", "step_000000020"] if committed else ["step_000000010"]), stage
        pointed = "step_000000020" if STAGES.index(stage) >= STAGES.index("pointers_written") else "step_000000010"
        assert read_pointer(checkpoints, "latest") == pointed, stage
        if not committed:
            assert ".tmp-step_000000020" in dot_entries(checkpoints), stage

        code = train_in_process(*CRASH_ARGS, "--output-dir", str(out), "--resume", "latest")
        assert code == 0, f"{stage}: {capsys.readouterr().err[-3000:]}"
        assert assert_consistent(checkpoints) == ["step_000000010", "step_000000020", "step_000000030"], stage
        assert read_pointer(checkpoints, "latest") == "step_000000030", stage
        assert dot_entries(checkpoints) == [], stage
        assert same_tensors(load_weights(checkpoints / "step_000000030"), expected_weights), \
            f"{stage}: resuming after the crash did not reproduce the uninterrupted run"


def test_random_kill_9_while_saving_every_step_never_breaks_a_checkpoint(runner, tmp_path, capsys):
    def args(max_steps: int) -> list[str]:
        return ["--quick", "--n-embd", "64", "--save-every-steps", "1", "--max-steps", str(max_steps),
                "--eval-every-steps", "50"]

    runs = []
    for seed in range(3):
        out = tmp_path / f"seed{seed}"
        runs.append((seed, out, runner.start(train_cmd(*args(400), "--output-dir", str(out)))))
    for seed, out, proc in runs:
        wait_for(lambda: (out / "checkpoints" / "latest").exists() or proc.poll() is not None, timeout=120,
                 what=f"the first checkpoint of seed {seed}")
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
        runner.kill(proc)
        proc.communicate(timeout=30)
        assert proc.returncode == -9

    for seed, out, _ in runs:
        checkpoints = out / "checkpoints"
        names = assert_consistent(checkpoints)
        assert names, seed

    # The next start removes what a crash leaves behind: temp dirs, trash, a half-written pointer.
    seed, out, _ = runs[0]
    checkpoints = out / "checkpoints"
    (checkpoints / ".tmp-step_000009999").mkdir(exist_ok=True)
    (checkpoints / ".tmp-step_000009999" / "model.safetensors").write_bytes(b"partial")
    (checkpoints / ".trash-step_000000001-0123abcd").mkdir(exist_ok=True)
    (checkpoints / ".latest.tmp-99999").write_text("step_0000")
    latest_step = int(read_pointer(checkpoints, "latest").split("_")[1])
    code = train_in_process(*args(latest_step + 2), "--output-dir", str(out), "--resume", "latest")
    assert code == 0, capsys.readouterr().err[-3000:]
    assert dot_entries(checkpoints) == []
    assert read_pointer(checkpoints, "latest") == f"step_{latest_step + 2:09d}"
    assert_consistent(checkpoints)


def test_two_ranks_retention_keeps_the_union_of_rules_and_only_rank0_deletes(runner, tmp_path):
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        result = runner.run(train_cmd(*FAST, "--output-dir", str(out), "--max-steps", "40", "--keep-last", "2",
                                      "--keep-best", "1", "--keep-every-steps", "20", "--save-every-steps", "5",
                                      "--eval-every-steps", "5", processes=2), timeout=180)
        if "EADDRINUSE" not in result.stdout:
            break  # (retry only when another process took the rendezvous port that free_port() picked)
    assert result.returncode == 0, result.stdout[-4000:]
    log = result.stdout[-4000:]
    records = read_records(out / "metrics.jsonl")
    assert [r for r in records if r.get("event") == "start"][0]["world_size"] == 2, log
    val_loss = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    saves = [r for r in records if r.get("event") == "checkpoint"]
    saved_steps = [r["step"] for r in saves]
    assert saved_steps == list(range(5, 41, 5)), log

    history = [CheckpointRecord(step, val_loss.get(step)) for step in saved_steps]
    expected = checkpoints_to_keep(history, RetentionPolicy(2, 1, 20, "min"), protected={40})
    checkpoints = out / "checkpoints"
    kept = {int(name.split("_")[1]) for name in assert_consistent(checkpoints)}
    assert kept == expected, (val_loss, log)
    assert dot_entries(checkpoints) == [], log

    # Rank 0 (the only writer of metrics.jsonl) deleted every pruned checkpoint itself, each exactly once;
    # had rank 1 deleted any, rank 0 would have missed it or failed to delete it.
    deleted = [name for r in saves for name in r["deleted"]]
    assert sorted(deleted) == [f"step_{s:09d}" for s in sorted(set(saved_steps) - expected)], (saves, log)
    assert "could not delete" not in result.stdout, log
    best = min((s for s in saved_steps if s in val_loss), key=lambda s: (val_loss[s], -s))
    assert read_pointer(checkpoints, "best") == f"step_{best:09d}", (val_loss, log)

    for path in step_dirs(checkpoints):
        manifest = json.loads((path / "manifest.json").read_text())
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(manifest["files"]), (path.name, log)
        assert json.loads((path / "trainer_state.json").read_text())["world_size"] == 2
