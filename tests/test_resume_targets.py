"""`--resume none|latest|best|auto|PATH`, refusing to overwrite, falling back past damage, `dtrain ckpt`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import FAST, load_weights, reset_accelerate, same_tensors

from dtrain.commands import cli
from dtrain.checkpoint.layout import read_pointer, step_dirs, verify_checkpoint
from dtrain.training.metrics import read_records
from dtrain.commands.train import main

BASE = [*FAST, "--save-every-steps", "10", "--max-steps", "30"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train(capsys, out: Path, *extra: str) -> tuple[int, str]:
    reset_accelerate()
    code = main([*BASE, "--output-dir", str(out), *extra])
    return code, capsys.readouterr().err


def usage_error(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("dtrain: error:")]
    assert lines, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]}"
    return lines[0]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under the run's checkpoints/ with its content."""
    root = out / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def names(out: Path) -> list[str]:
    return [p.name for p in step_dirs(out / "checkpoints")]


def resume_events(out: Path) -> list[dict]:
    return [r for r in read_records(out / "metrics.jsonl") if r.get("event") == "resume"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished run with checkpoints at steps 10, 20 and 30 (trained once, copied per test)."""
    out = tmp_path_factory.mktemp("base") / "run"
    reset_accelerate()
    assert main([*BASE, "--output-dir", str(out)]) == 0
    reset_accelerate()
    return out


@pytest.fixture
def run_dir(base_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    # Paths in the copied run's metrics point at the base run; nothing below relies on them.
    return out


def truncate(file: Path, keep: int = 100) -> None:
    with open(file, "r+b") as f:
        f.truncate(keep)


def test_truncated_newest_checkpoint_falls_back_to_the_next_older_with_a_warning(run_dir, capsys, caplog):
    assert names(run_dir) == ["step_000000010", "step_000000020", "step_000000030"]
    truncate(run_dir / "checkpoints" / "step_000000030" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        code, err = train(capsys, run_dir, "--resume", "latest", "--max-steps", "40")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    skipped = [w for w in warnings if "step_000000030" in w and "model.safetensors" in w]
    assert skipped, warnings
    assert "bytes" in skipped[0], "the warning must say why the checkpoint was skipped"
    event = resume_events(run_dir)[-1]
    assert event["step"] == 20 and event["checkpoint"].endswith("step_000000020")
    # The damaged step was trained again and its directory replaced by a complete one.
    for path in step_dirs(run_dir / "checkpoints"):
        assert verify_checkpoint(path, checksums=True).ok, path
    assert read_pointer(run_dir / "checkpoints", "latest") == "step_000000040"
    assert "step_000000030" in names(run_dir)


def test_auto_falls_back_past_damage_as_well(run_dir, capsys):
    (run_dir / "checkpoints" / "step_000000030" / "manifest.json").unlink()
    code, err = train(capsys, run_dir, "--resume", "auto")
    assert code == 0, err
    assert resume_events(run_dir)[-1]["step"] == 20


def test_every_checkpoint_damaged_refuses_latest_and_auto(run_dir, capsys):
    for path in step_dirs(run_dir / "checkpoints"):
        truncate(path / "optimizer.bin")
    before = snapshot(run_dir)
    for spec in ("latest", "auto"):
        code, err = train(capsys, run_dir, "--resume", spec)
        usage_error(code, err, f"--resume {spec}", "step_000000030")
    assert snapshot(run_dir) == before, "nothing may be changed or deleted"


def test_explicit_damaged_path_exits_2(run_dir, capsys):
    damaged = run_dir / "checkpoints" / "step_000000020"
    truncate(damaged / "model.safetensors")
    before = snapshot(run_dir)
    code, err = train(capsys, run_dir, "--resume", str(damaged))
    usage_error(code, err, "step_000000020", "model.safetensors")
    assert snapshot(run_dir) == before


def test_explicit_path_that_does_not_exist_exits_2(run_dir, capsys):
    code, err = train(capsys, run_dir, "--resume", str(run_dir / "checkpoints" / "step_000000999"))
    usage_error(code, err, "step_000000999", "does not exist")


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                     "trainer_state.json"])
def test_a_flipped_byte_in_any_file_is_caught_by_a_default_resume(run_dir, capsys, caplog, damaged):
    file = run_dir / "checkpoints" / "step_000000030" / damaged
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit of other content
    file.write_bytes(bytes(data))
    code, err = train(capsys, run_dir, "--resume", str(file.parent))
    usage_error(code, err, "step_000000030", damaged, "does not match its crc32c")  # a named one: refused
    with caplog.at_level(logging.WARNING):
        code, err = train(capsys, run_dir, "--resume", "latest", "--max-steps", "40")
    assert code == 0, err
    assert any("skipping damaged checkpoint step_000000030" in r.getMessage() and damaged in r.getMessage()
               for r in caplog.records)
    assert resume_events(run_dir)[-1]["step"] == 20  # the previous complete one of the lineage


def test_no_verify_checksums_skips_the_check(run_dir, capsys):
    file = run_dir / "checkpoints" / "step_000000030" / "scheduler.bin"
    file.write_bytes(file.read_bytes())  # untouched content: the check is what is skipped, nothing is broken
    manifest = json.loads((file.parent / "manifest.json").read_text())
    manifest["files"]["scheduler.bin"]["crc32c"] = "00000000"
    (file.parent / "manifest.json").write_text(json.dumps(manifest))
    code, err = train(capsys, run_dir, "--resume", str(file.parent), "--max-steps", "40", "--no-verify-checksums")
    assert code == 0, err
    code, err = train(capsys, run_dir, "--resume", str(file.parent), "--max-steps", "40")
    usage_error(code, err, "scheduler.bin does not match its crc32c")


@pytest.mark.parametrize("spec", ["latest", "best"])
def test_resume_latest_or_best_with_nothing_to_resume_exits_2(tmp_path, capsys, spec):
    out = tmp_path / "empty"
    code, err = train(capsys, out, "--resume", spec)
    usage_error(code, err, f"--resume {spec}")
    assert not step_dirs(out / "checkpoints")


def test_resume_best_without_a_best_pointer_exits_2(run_dir, capsys):
    (run_dir / "checkpoints" / "best").unlink()
    code, err = train(capsys, run_dir, "--resume", "best")
    usage_error(code, err, "--resume best")


def test_resume_best_resumes_from_the_best_pointer(run_dir, capsys):
    best = read_pointer(run_dir / "checkpoints", "best")
    assert best is not None
    code, err = train(capsys, run_dir, "--resume", "best", "--max-steps", "35")
    assert code == 0, err
    assert resume_events(run_dir)[-1]["checkpoint"].endswith(best)


def test_resume_auto_with_nothing_starts_fresh(tmp_path, capsys):
    out = tmp_path / "fresh"
    code, err = train(capsys, out, "--resume", "auto", "--max-steps", "10")
    assert code == 0, err
    events = [r["event"] for r in read_records(out / "metrics.jsonl") if "event" in r]
    assert events[0] == "start" and "resume" not in events
    assert names(out) == ["step_000000010"]


def test_fresh_start_in_a_dir_with_checkpoints_is_refused_and_deletes_nothing(run_dir, capsys):
    before = snapshot(run_dir)
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    for extra in ([], ["--resume", "none"]):
        code, err = train(capsys, run_dir, *extra)
        usage_error(code, err, "--resume latest", "--overwrite")
    assert snapshot(run_dir) == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before


def test_overwrite_starts_fresh(run_dir, capsys):
    code, err = train(capsys, run_dir, "--overwrite", "--max-steps", "10")
    assert code == 0, err
    assert names(run_dir) == ["step_000000010"]
    assert read_pointer(run_dir / "checkpoints", "latest") == "step_000000010"
    records = read_records(run_dir / "metrics.jsonl")
    assert [r["event"] for r in records if "event" in r][0] == "start"
    assert max(r["step"] for r in records) == 10, "the earlier run's metrics are gone"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_path_into_another_output_dir_starts_a_new_run_from_it(run_dir, tmp_path, capsys):
    source = run_dir / "checkpoints" / "step_000000020"
    before = snapshot(run_dir)
    other = tmp_path / "other"
    code, err = train(capsys, other, "--resume", str(source), "--max-steps", "30")
    assert code == 0, err
    assert snapshot(run_dir) == before, "the source run must not be touched"
    event = resume_events(other)[-1]
    assert event["step"] == 20 and event["checkpoint"] == str(source)
    assert names(other) == ["step_000000030"]
    # Same data order, same RNG: continuing from step 20 reproduces the original run's step 30.
    assert same_tensors(load_weights(other / "checkpoints" / "step_000000030"),
                        load_weights(run_dir / "checkpoints" / "step_000000030"))


def test_resume_path_may_name_a_run_dir(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    code, err = train(capsys, other, "--resume", str(run_dir), "--max-steps", "35")
    assert code == 0, err
    assert resume_events(other)[-1]["step"] == 30


# ------------------------------------------------------------------------------------------------ dtrain ckpt


def test_ckpt_verify_exit_codes(run_dir, capsys):
    good = run_dir / "checkpoints" / "step_000000020"
    assert cli.main(["ckpt", "verify", str(good)]) == 0
    assert "complete" in capsys.readouterr().out
    bad = run_dir / "checkpoints" / "step_000000030"
    data = bytearray((bad / "optimizer.bin").read_bytes())
    data[10] ^= 0xFF
    (bad / "optimizer.bin").write_bytes(bytes(data))
    assert cli.main(["ckpt", "verify", str(bad)]) == 1
    assert "optimizer.bin" in capsys.readouterr().out
    assert cli.main(["ckpt", "verify", str(run_dir / "nope")]) == 1


def test_ckpt_list_json(run_dir, capsys):
    truncate(run_dir / "checkpoints" / "step_000000010" / "scheduler.bin", keep=3)
    assert cli.main(["ckpt", "list", str(run_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["step_000000010", "step_000000020", "step_000000030"]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert [r["complete"] for r in rows] == [False, True, True]
    assert "scheduler.bin" in rows[0]["problem"]
    assert [r["latest"] for r in rows] == [False, False, True]
    best = read_pointer(run_dir / "checkpoints", "best")
    assert [r["name"] for r in rows if r["best"]] == [best]
    assert all(r["bytes"] > 0 for r in rows[1:])
    # The checkpoints/ dir itself is accepted too, and an empty run lists nothing.
    assert cli.main(["ckpt", "list", str(run_dir / "checkpoints"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    (run_dir / "empty" / "checkpoints").mkdir(parents=True)
    assert cli.main(["ckpt", "list", str(run_dir / "empty"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
