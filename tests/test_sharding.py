"""Sharded training (FSDP2) on 2 CPU ranks over gloo: really sharded, checkpointed shard by shard, stopped by a real
SIGTERM and resumed bit for bit, resharded onto another number of ranks, refused with one line where it cannot be."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, TRAIN, free_port, train_cmd, wait_for

pytestmark = pytest.mark.slow

FSDP_CPU = str(REPO / "launch_configs" / "fsdp_cpu_2proc.yaml")
RUN = [*FAST, "--max-steps", "40", "--save-every-steps", "10", "--keep-last", "0", "--dropout", "0.1"]


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
    import shutil

    reference, _ = straight
    out = tmp_path / "three"
    shutil.copytree(reference / "checkpoints" / "step_000000020", out / "checkpoints" / "step_000000020")
    (out / "checkpoints" / "latest").write_text("step_000000020\n")
    result = runner.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
                         "--master_port", str(free_port()), TRAIN, *RUN, "--sharding", "fsdp2", "--device", "cpu",
                         "--output-dir", str(out), "--resume", "latest"], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "world size changed from 2 to 3" in result.stdout
    assert "sharded with FSDP2 over 3 ranks" in result.stdout
    resume = next(r for r in records(out) if r.get("event") == "resume")
    assert resume["step"] == 20 and resume["world_size"] == 3 and resume["from_world_size"] == 2
    assert state_of(out / "checkpoints" / "step_000000040")["global_step"] == 40


def test_verify_resume_under_fsdp2_reports_identical(runner, tmp_path):
    # Three trainings, each with its own Accelerator, in one process per rank.
    result = runner.run(fsdp_launch("dtrain.cli", "verify-resume", *FAST, "--verify-steps", "12",
                                    "--output-dir", str(tmp_path / "v"), script="-m"), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "RESULT: identical: resuming is exact" in result.stdout
    assert "identical  model weights" in result.stdout and "identical  optimizer state" in result.stdout


def test_sharding_asked_for_with_one_process_is_refused_with_one_line(runner, tmp_path):
    result = runner.run(train_cmd(*FAST, "--sharding", "fsdp2", "--output-dir", str(tmp_path / "one")), cwd=REPO)
    assert result.returncode == 2
    assert "dtrain: error: invalid value for sharding: 'fsdp2'" in result.stdout
    assert "Traceback" not in result.stdout


def test_a_sharded_checkpoint_resumed_unsharded_is_refused_with_one_line(runner, straight, tmp_path):
    reference, _ = straight
    result = runner.run(train_cmd(*RUN, "--output-dir", str(tmp_path / "unsharded"), "--resume",
                                  str(reference / "checkpoints" / "step_000000020")), cwd=REPO)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "was written with sharding 'fsdp2' and this run uses 'none'" in result.stdout
    assert "Traceback" not in result.stdout
