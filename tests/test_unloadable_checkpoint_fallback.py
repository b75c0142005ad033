"""A checkpoint whose files are complete (the manifest matches) but whose contents cannot be loaded is treated
like a damaged one: `--resume latest` skips it with a warning, leaves it in place and resumes the previous complete
checkpoint of its lineage, bit for bit; an explicit `--resume PATH` is exit 2 with one line, never a traceback.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import Runner, assert_same_end, train_cmd
from dtrain.checkpoint.layout import step_dir_name, write_manifest

# Checkpoints at steps 2, 4 and 6 of a 6-step run; a resume from step 4 ends where the run itself ended.
ARGS = ["--task", "regression", "--batch-size", "8", "--n-layer", "1", "--n-embd", "8", "--max-steps", "6",
        "--save-every-steps", "2", "--keep-last", "5", "--eval-every-steps", "0", "--log-every-steps", "2",
        "--save-every-seconds", "0"]
NEWEST, PREVIOUS = step_dir_name(6), step_dir_name(4)


def finished_run(tmp_path_factory, processes: int) -> Path:
    out = tmp_path_factory.mktemp(f"finished{processes}") / "run"
    runner = Runner()
    try:
        result = runner.run(train_cmd(*ARGS, "--output-dir", str(out), processes=processes), timeout=240)
    finally:
        runner.cleanup()
    assert result.returncode == 0, result.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, 2)


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


def garble(checkpoint: Path, name: str) -> None:
    """Random bytes of the same size in one file, and a manifest recomputed to match: complete, not loadable."""
    file = checkpoint / name
    file.write_bytes(random.Random(name).randbytes(file.stat().st_size))  # the same garbage every time
    write_manifest(checkpoint, int(checkpoint.name.split("_")[1]))


def resume(runner, run: Path, target: str, processes: int = 1):
    return runner.run(train_cmd(*ARGS, "--output-dir", str(run), "--resume", target, processes=processes),
                      timeout=240)


def assert_fell_back(result, skipped: str, reason: str, resumed: str) -> None:
    assert result.returncode == 0, result.stdout[-3000:]
    warnings = [line for line in result.stdout.splitlines() if f"skipping checkpoint {skipped}" in line]
    assert len(warnings) == 1 and reason in warnings[0] and "left in place" in warnings[0], result.stdout[-3000:]
    assert f"resumed from {resumed}" in result.stdout
    assert "Traceback" not in result.stdout


def assert_refused_in_one_line(result, run: Path, checkpoint: Path, processes: int = 1) -> None:
    """Exit 2 (behind a launcher, which exits 1 itself: in exit_status.json), one line, no traceback of dtrain."""
    status = json.loads((run / "exit_status.json").read_text())
    assert (result.returncode if processes == 1 else status["exit_code"]) == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and f"{checkpoint} cannot be loaded" in errors[0], result.stdout[-3000:]
    assert "/dtrain/" not in "".join(line for line in result.stdout.splitlines() if line.strip().startswith("File"))


@pytest.mark.parametrize("name, reason", [("optimizer.bin", "cannot be loaded ("),
                                          ("scheduler.bin", "cannot be loaded ("),
                                          ("model.safetensors", "cannot be loaded ("),
                                          ("random_states_0.pkl", "cannot be loaded (random_states_0.pkl: ")])
def test_latest_skips_a_complete_but_unloadable_checkpoint_and_resumes_the_previous_one_exactly(
        runner, one_process_run, tmp_path, name, reason):
    run = copy_of(one_process_run, tmp_path)
    garble(run / "checkpoints" / NEWEST, name)
    result = resume(runner, run, "latest")
    # The model (and for a later file, the optimizer) of the unloadable checkpoint was loaded before the failure:
    # the fallback's load overwrites everything, so the run ends exactly where the uninterrupted one did.
    assert_fell_back(result, NEWEST, reason, run / "checkpoints" / PREVIOUS)
    assert_same_end(one_process_run, run)


def test_an_explicit_unloadable_checkpoint_is_exit_2_in_one_line_and_left_as_it_was(runner, one_process_run,
                                                                                     tmp_path):
    run = copy_of(one_process_run, tmp_path)
    checkpoint = run / "checkpoints" / NEWEST
    garble(checkpoint, "optimizer.bin")
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    result = resume(runner, run, str(checkpoint))
    assert_refused_in_one_line(result, run, checkpoint)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before


def test_when_no_checkpoint_of_the_lineage_loads_latest_is_exit_2_naming_each_and_deletes_none(
        runner, one_process_run, tmp_path):
    run = copy_of(one_process_run, tmp_path)
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    for name in names:
        garble(run / "checkpoints" / name, "optimizer.bin")
    result = resume(runner, run, "latest")
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0], result.stdout[-3000:]
    assert all(f"{name} cannot be loaded" in errors[0] for name in names), errors[0]
    assert "Traceback" not in result.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == names


@pytest.mark.slow
def test_two_ranks_fall_back_together_from_an_unloadable_optimizer(runner, two_process_run, tmp_path):
    run = copy_of(two_process_run, tmp_path)
    garble(run / "checkpoints" / NEWEST, "optimizer.bin")
    assert_fell_back(resume(runner, run, "latest", processes=2), NEWEST, "cannot be loaded (",
                     run / "checkpoints" / PREVIOUS)
    assert_same_end(two_process_run, run)


@pytest.mark.slow
def test_a_load_that_fails_on_rank_1_only_makes_both_ranks_fall_back(runner, two_process_run, tmp_path):
    run = copy_of(two_process_run, tmp_path)
    garble(run / "checkpoints" / NEWEST, "random_states_1.pkl")  # read by rank 1 alone
    result = resume(runner, run, "latest", processes=2)
    assert_fell_back(result, NEWEST, "on rank 1", run / "checkpoints" / PREVIOUS)
    assert_same_end(two_process_run, run)


@pytest.mark.slow
def test_two_ranks_refuse_an_explicit_unloadable_checkpoint_in_one_line(runner, two_process_run, tmp_path):
    run = copy_of(two_process_run, tmp_path)
    checkpoint = run / "checkpoints" / NEWEST
    garble(checkpoint, "random_states_1.pkl")
    assert_refused_in_one_line(resume(runner, run, str(checkpoint), processes=2), run, checkpoint, processes=2)
