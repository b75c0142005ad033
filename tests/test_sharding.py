"""Sharded training (FSDP2) on 2 CPU ranks over gloo: really sharded, checkpointed shard by shard, stopped by a real
SIGTERM and resumed bit for bit, resharded onto another number of ranks, refused with one line where it cannot be."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, TRAIN, free_port, train_cmd, wait_for

pytestmark = pytest.mark.slow

FSDP_CPU = str(REPO / "launch_configs" / "fsdp_cpu_2proc.yaml")
RUN = [*FAST, "--max-steps", "40", "--save-every-steps", "10", "--keep-last", "0", "--dropout", "0.1"]


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), TRAIN, *args, "--device", "cpu"]


def fsdp_launch(*args: str, script: str = TRAIN) -> list[str]:
    """`accelerate launch --config_file launch_configs/fsdp_cpu_2proc.yaml SCRIPT ARGS` (the launcher asks for
    FSDP; `script="-m"` runs the module named first in ARGS)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CPU,
            "--main_process_port", str(free_port()), script, *args]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if r.get("kind") == "train"}


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import Runner

    runner = Runner()
    try:
        out = tmp_path_factory.mktemp("fsdp-straight")
        result = runner.run(fsdp_launch(*RUN, "--output-dir", str(out)), cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        yield out, result.stdout
    finally:
        runner.cleanup()


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """The same run as `straight`, data parallel (every rank holds the whole model)."""
    from conftest import Runner

    runner = Runner()
    try:
        out = tmp_path_factory.mktemp("ddp-straight")
        result = runner.run(torchrun(*RUN, "--sharding", "none", "--output-dir", str(out)), cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        yield out
    finally:
        runner.cleanup()


def resumed_from(checkpoint: Path, out: Path) -> None:
    """`out` as a run whose latest checkpoint is a copy of `checkpoint`."""
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    (out / "checkpoints" / "latest").write_text(f"{checkpoint.name}\n")


def assert_close_losses(out: Path, reference: Path) -> None:
    """The windows logged after the resume match the reference run's to float tolerance (another reduction order
    of the same sums: sharded and data-parallel runs agree closely, not bit for bit)."""
    resumed_at = next(r for r in records(out) if r.get("event") == "resume")["step"]
    after = {step: loss for step, loss in losses(out).items() if step - 5 >= resumed_at}
    expected = {step: losses(reference)[step] for step in after}
    assert len(after) >= 3 and after == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_an_fsdp_launch_config_on_cpus_really_shards_and_records_it(straight):
    out, output = straight
    for rank in (0, 1):
        line = next(l for l in output.splitlines() if f"[RANK {rank}] sharded with FSDP2 over 2 ranks" in l)
        held, total = (int(n.replace(",", "")) for n in line.split("holds ")[1].split(" parameter")[0].split(" of "))
        assert 0.4 * total < held < 0.6 * total, line  # about half of every parameter on each rank
    checkpoint = out / "checkpoints" / "step_000000040"
    assert state_of(checkpoint)["sharding"] == "fsdp2"
    assert next(r for r in records(out) if r.get("event") == "start")["sharding"] == "fsdp2"
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    shards = sorted(name for name in manifest if name.endswith(".distcp"))
    assert shards == ["optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp",
                      "pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"]
    assert "model.safetensors" not in manifest  # no rank wrote the full model


def test_sigterm_and_resume_under_fsdp2_continue_bit_for_bit(runner, straight, tmp_path):
    from dtrain.commands.verify_resume import compare_checkpoints

    reference, _ = straight
    out = tmp_path / "signalled"
    proc = runner.start(fsdp_launch(*RUN, "--output-dir", str(out)), cwd=REPO)
    wait_for(lambda: (out / "checkpoints" / "step_000000010").exists(), timeout=180, what="the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    status = json.loads((out / "exit_status.json").read_text())
    assert status["reason"] == "interrupted" and status["signal"] == "SIGTERM", output[-3000:]
    resumed = runner.run(fsdp_launch(*RUN, "--output-dir", str(out), "--resume", "latest", "--strict-resume"),
                         cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    # A logged loss is the mean of its window (--log-every-steps 5): windows that began after the resume match.
    resumed_at = next(r for r in records(out) if r.get("event") == "resume")["step"]
    after = {step: loss for step, loss in losses(out).items() if step - 5 >= resumed_at}
    assert len(after) >= 4 and after == {step: losses(reference)[step] for step in after}  # bit for bit
    rows = compare_checkpoints(reference / "checkpoints" / "step_000000040", out / "checkpoints" / "step_000000040")
    assert [name for name, same, _ in rows if not same] == []


def test_a_two_rank_sharded_checkpoint_resumes_sharded_on_three_ranks(runner, straight, tmp_path):
    reference, _ = straight
    out = tmp_path / "three"
    resumed_from(reference / "checkpoints" / "step_000000020", out)
    result = runner.run(torchrun(*RUN, "--sharding", "fsdp2", "--output-dir", str(out), "--resume", "latest",
                                 processes=3), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "world size changed from 2 to 3" in result.stdout
    assert "sharded with FSDP2 over 3 ranks" in result.stdout
    resume = next(r for r in records(out) if r.get("event") == "resume")
    assert resume["step"] == 20 and resume["world_size"] == 3 and resume["from_world_size"] == 2
    assert state_of(out / "checkpoints" / "step_000000040")["global_step"] == 40


def test_verify_resume_under_fsdp2_with_gradient_accumulation_reports_identical(runner, tmp_path):
    # Three trainings, each with its own Accelerator, in one process per rank; the stop falls inside an epoch.
    result = runner.run(fsdp_launch("dtrain.cli", "verify-resume", *FAST, "--verify-steps", "12", "--grad-accum", "2",
                                    "--output-dir", str(tmp_path / "v"), script="-m"), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "RESULT: identical: resuming is exact" in result.stdout
    assert "identical  model weights" in result.stdout and "identical  optimizer state" in result.stdout


def test_sharding_asked_for_with_one_process_is_refused_with_one_line(runner, tmp_path):
    result = runner.run(train_cmd(*FAST, "--sharding", "fsdp2", "--output-dir", str(tmp_path / "one")), cwd=REPO)
    assert result.returncode == 2
    assert "dtrain: error: invalid value for sharding: 'fsdp2'" in result.stdout
    assert "Traceback" not in result.stdout


def test_a_sharded_checkpoint_resumes_data_parallel_and_continues_the_loss(runner, straight, tmp_path):
    reference, _ = straight
    out = tmp_path / "to-ddp"
    resumed_from(reference / "checkpoints" / "step_000000020", out)
    result = runner.run(torchrun(*RUN, "--sharding", "none", "--output-dir", str(out), "--resume", "latest"),
                        cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "written with sharding 'fsdp2' and this run uses 'none': its model and optimizer state are converted" \
        in result.stdout
    assert_close_losses(out, reference)
    assert "model.safetensors" in json.loads((out / "checkpoints" / "step_000000040" / "manifest.json").read_text())[
        "files"]  # from here on a full-state run


def test_a_sharded_checkpoint_resumes_on_one_process(runner, straight, tmp_path):
    reference, _ = straight
    out = tmp_path / "one"
    resumed_from(reference / "checkpoints" / "step_000000020", out)
    result = runner.run(train_cmd(*RUN, "--output-dir", str(out), "--resume", "latest"), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "world size changed from 2 to 1" in result.stdout
    assert state_of(out / "checkpoints" / "step_000000040")["global_step"] == 40


def test_a_full_state_checkpoint_resumes_sharded_and_continues_the_loss(runner, unsharded, tmp_path):
    out = tmp_path / "to-fsdp"
    resumed_from(unsharded / "checkpoints" / "step_000000020", out)
    result = runner.run(torchrun(*RUN, "--sharding", "fsdp2", "--output-dir", str(out), "--resume", "latest"),
                        cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "written with sharding 'none' and this run uses 'fsdp2'" in result.stdout
    assert_close_losses(out, unsharded)
    assert (out / "checkpoints" / "step_000000040" / "pytorch_model_fsdp_0").is_dir()


def test_export_eval_and_init_from_take_a_sharded_checkpoint_on_one_process(runner, straight, unsharded, tmp_path):
    import torch
    from safetensors.torch import load_file

    from dtrain.checkpoint.sharded import SHARDED_MODEL_DIR, full_state
    from dtrain.config import config_from_dict
    from dtrain.tasks import build_task
    from dtrain.training.resume import load_initial_weights

    checkpoint = straight[0] / "checkpoints" / "step_000000040"
    exported = tmp_path / "model.safetensors"
    result = runner.run([sys.executable, "-m", "dtrain.cli", "ckpt", "export", str(checkpoint), "--out",
                         str(exported)], cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    tensors = load_file(str(exported))
    gathered = full_state(checkpoint / SHARDED_MODEL_DIR)["model"]
    assert tensors.keys() == gathered.keys() == load_file(str(unsharded / "checkpoints" / "step_000000040" /
                                                              "model.safetensors")).keys()
    assert all(torch.equal(tensors[name], gathered[name]) for name in tensors)  # whole, not one rank's shard

    task = build_task(config_from_dict(state_of(checkpoint)["config"]).task, 0)
    load_initial_weights(task.model, str(checkpoint))  # --init-from: the same weights, no process group
    assert all(torch.equal(task.model.state_dict()[name], tensors[name]) for name in tensors)

    evaluated = runner.run([sys.executable, "-m", "dtrain.cli", "eval", str(checkpoint)], cwd=REPO, timeout=120)
    assert evaluated.returncode == 0 and "val_loss" in evaluated.stdout, evaluated.stdout[-3000:]


class RunsCode:
    """A pickle that calls a function of the attacker's choice when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("processes", [1, 2])
def test_a_crafted_dcp_index_is_refused_on_resume_and_runs_nothing(runner, straight, tmp_path, processes):
    from dtrain.checkpoint.layout import write_manifest

    reference, _ = straight
    out, marker = tmp_path / "run", tmp_path / "ran"
    resumed_from(reference / "checkpoints" / "step_000000020", out)
    checkpoint = out / "checkpoints" / "step_000000020"
    (checkpoint / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    write_manifest(checkpoint, 20)  # the attacker recomputes the manifest: the checkpoint verifies
    command = (train_cmd(*RUN, "--output-dir", str(out), "--resume", str(checkpoint)) if processes == 1 else
               torchrun(*RUN, "--sharding", "fsdp2", "--output-dir", str(out), "--resume", str(checkpoint)))
    result = runner.run(command, cwd=REPO, timeout=300)
    assert result.returncode == (2 if processes == 1 else 1), result.stdout[-3000:]  # torchrun reports 1
    assert "step_000000020/optimizer_0/.metadata was refused (refers to posix.mkdir" in result.stdout
    assert not marker.exists()


def test_ten_kill_9s_under_fsdp2_half_inside_saves_break_nothing_and_the_end_is_exact(runner, straight, tmp_path):
    from conftest import trainer_pids
    from dtrain.checkpoint.layout import read_pointer, verify_checkpoint
    from dtrain.checkpoint.local_commit import STAGES
    from dtrain.commands.verify_resume import compare_checkpoints

    reference, _ = straight
    out = tmp_path / "killed"
    checkpoints = out / "checkpoints"
    args = [*RUN, "--save-every-steps", "1", "--output-dir", str(out), "--resume", "auto"]

    def latest_step() -> int:
        name = read_pointer(checkpoints, "latest") if checkpoints.is_dir() else None
        return int(name.split("_")[1]) if name else 0

    for kill in range(10):
        before = latest_step()
        if kill % 2:  # inside the second save of this start, at each stage of the commit in turn, on one rank
            stage = STAGES[(kill // 2) % len(STAGES)]
            rank = "1" if stage in ("temp_created", "state_written") and kill % 4 == 1 else "0"
            proc = runner.start(fsdp_launch(*args), cwd=REPO, DTRAIN_FAULT_AT=stage, DTRAIN_FAULT_AFTER_SAVES="1",
                                DTRAIN_FAULT_RANK=rank)
            output, _ = proc.communicate(timeout=180)
            assert proc.returncode != 0 and "SIGKILL" in output, f"kill {kill} at {stage}: {output[-3000:]}"
        else:  # at whatever moment the run is in once it has committed one more step
            proc = runner.start(fsdp_launch(*args), cwd=REPO)
            wait_for(lambda: len(trainer_pids(out)) == 2 or proc.poll() is not None, timeout=180, what="both ranks")
            ranks = trainer_pids(out)
            wait_for(lambda: latest_step() > before or proc.poll() is not None, timeout=180, interval=0.02,
                     what=f"a new checkpoint after kill {kill}")
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            # Every process at once: the ranks run in their own session, and killed alone the launcher would
            # leave them to save and exit by themselves (a clean stop, not this test's crash).
            for pid in ranks.values():
                os.kill(pid, signal.SIGKILL)
            runner.kill(proc)
            proc.communicate(timeout=60)
        print(f"kill {kill}: latest step {before} -> {latest_step()}")
        names = [p.name for p in checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert all(verify_checkpoint(checkpoints / name, checksums=True).ok for name in names), kill
        assert read_pointer(checkpoints, "latest") in names, kill
        assert latest_step() < 40, "the run ended before the tenth kill"

    finished = runner.run(fsdp_launch(*args), cwd=REPO, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:]
    rows = compare_checkpoints(reference / "checkpoints" / "step_000000040", checkpoints / "step_000000040")
    assert [name for name, same, _ in rows if not same] == []  # 10 kills later: the uninterrupted run, bit for bit


def test_async_sharded_saves_equal_synchronous_ones_and_a_kill_mid_write_keeps_the_previous(runner, straight,
                                                                                             tmp_path):
    from dtrain.checkpoint.layout import read_pointer, verify_checkpoint
    from dtrain.commands.verify_resume import compare_checkpoints

    reference, _ = straight
    out = tmp_path / "async"
    args = [*RUN, "--async-save", "--output-dir", str(out)]
    killed = runner.run(fsdp_launch(*args), cwd=REPO, timeout=300, DTRAIN_FAULT_AT="state_written",
                        DTRAIN_FAULT_AFTER_SAVES="1")  # SIGKILL in the background write of the second save
    assert killed.returncode != 0 and "SIGKILL" in killed.stdout, killed.stdout[-3000:]
    assert "--async-save is not supported" not in killed.stdout
    checkpoints = out / "checkpoints"
    assert read_pointer(checkpoints, "latest") == "step_000000010"
    assert verify_checkpoint(checkpoints / "step_000000010", checksums=True).ok
    assert not (checkpoints / "step_000000020").exists()
    resumed = runner.run(fsdp_launch(*args, "--resume", "latest"), cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    for step in (10, 20, 40):  # written in the background, each the synchronous run's checkpoint bit for bit
        name = f"step_{step:09d}"
        rows = compare_checkpoints(reference / "checkpoints" / name, checkpoints / name)
        assert [row for row in rows if not row[1]] == [], name
    assert state_of(checkpoints / "step_000000040")["async"] is True


def test_a_rank_failing_before_the_collective_shard_write_stops_both_ranks_at_once(runner, tmp_path):
    from dtrain.checkpoint.layout import read_pointer

    out = tmp_path / "async"
    # Rank 0's host copy of the second save fails in the background; rank 1 must not go on into DCP's collective
    # write, where it would wait for rank 0 until the collective timeout (600 s by default, far past this test's).
    result = runner.run(fsdp_launch(*RUN, "--async-save", "--output-dir", str(out)), cwd=REPO, timeout=240,
                        DTRAIN_FAULT_AT="host_copied:raise", DTRAIN_FAULT_RANK="0", DTRAIN_FAULT_AFTER_SAVES="1")
    assert result.returncode == 1, result.stdout[-3000:]
    errors = re.findall(r"dtrain: error: saving checkpoint step_000000020 failed [^\n]*?(?=dtrain: error:|\n|$)",
                        result.stdout)
    assert len(errors) == 2, result.stdout[-3000:]  # one per rank
    assert any("OSError: injected fault at host_copied" in error for error in errors), errors
    assert read_pointer(out / "checkpoints", "latest") == "step_000000010"
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / "checkpoints" / "step_000000020").exists()


def test_evaluation_under_fsdp2_matches_data_parallel(straight, unsharded):
    def evals(out: Path) -> dict[int, float]:
        return {r["step"]: r["val_loss"] for r in records(out) if "val_loss" in r}

    assert sorted(evals(straight[0])) == [20, 40]
    assert evals(straight[0]) == pytest.approx(evals(unsharded), rel=1e-4)


def test_early_stopping_and_the_best_checkpoint_under_fsdp2(runner, tmp_path):
    out = tmp_path / "early"
    result = runner.run(torchrun(*FAST, "--max-steps", "60", "--eval-every-steps", "5", "--save-every-steps", "5",
                                 "--lr", "0.05", "--keep-last", "1", "--keep-best", "1",
                                 "--early-stopping-patience", "1", "--sharding", "fsdp2", "--output-dir", str(out)),
                        cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    evals = [(r["step"], r["val_loss"]) for r in records(out) if "val_loss" in r]
    assert [step for step, _ in evals] == [5, 10] and evals[1][1] > evals[0][1]  # worse once: stopped
    assert json.loads((out / "exit_status.json").read_text())["reason"] == "early_stop"
    checkpoints = out / "checkpoints"
    assert (checkpoints / "best").read_text().strip() == "step_000000005"  # the better one, kept beside latest
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == [
        "step_000000005", "step_000000010"]
