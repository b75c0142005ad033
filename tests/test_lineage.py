"""One lineage: after a resume from an older checkpoint, the abandoned continuation no longer counts.

The lineage logic is a pure function (tested without torch); the runs check retention, `best`, the fallback
from a damaged `latest`, `ckpt list` / `ckpt prune`, and a re-save of an existing step under a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, reset_accelerate, train_cmd

from dtrain.commands import cli
from dtrain.checkpoint.layout import read_pointer, read_trainer_state, step_dir_name, step_dirs
from dtrain.checkpoint.lineage import child_ancestry, lineage_of
from dtrain.checkpoint.resolve import find_latest
from dtrain.checkpoint.retention import CheckpointRecord
from dtrain.training.metrics import read_records
from dtrain.commands.train import main

# ------------------------------------------------------------------------------------------- pure lineage


def rec(step: int, run: str | None, *ancestry: tuple[str | None, int], metric: float | None = None):
    return CheckpointRecord(step, metric, run, tuple(ancestry))


# Run "a" saved 10, 20, 30; run "b" resumed from a's 10 and saved 15, 25, 35; run "c" resumed from b's 25.
BRANCHED = [rec(10, "a"), rec(20, "a"), rec(30, "a"),
            rec(15, "b", ("a", 10)), rec(25, "b", ("a", 10)), rec(35, "b", ("a", 10)),
            rec(40, "c", ("b", 25), ("a", 10)), rec(50, "c", ("b", 25), ("a", 10))]

LINEAGE_CASES = [
    # (id, records, head, steps on the lineage)
    ("fresh_run_is_its_own_lineage", [rec(10, "a"), rec(20, "a")], 20, [10, 20]),
    ("head_cuts_its_own_run", [rec(10, "a"), rec(20, "a"), rec(30, "a")], 20, [10, 20]),
    ("resume_from_older_abandons_the_newer_ones", BRANCHED[:6], 35, [10, 15, 25, 35]),
    ("abandoned_branch_head_sees_its_own_lineage", BRANCHED, 30, [10, 20, 30]),
    ("two_resumes_follow_the_chain", BRANCHED, 50, [10, 15, 25, 40, 50]),
    ("the_chain_survives_a_deleted_parent",  # retention deleted b's 25 and a's 10: c still reaches b's 15
     [r for r in BRANCHED if r.step not in (10, 25)], 50, [15, 40, 50]),
    ("same_parent_twice_keeps_runs_apart",  # b and d both resumed from a's 10; d's head ignores b's 15
     [rec(10, "a"), rec(15, "b", ("a", 10)), rec(30, "b", ("a", 10)), rec(20, "d", ("a", 10))], 20, [10, 20]),
    ("older_checkpoints_without_run_ids_use_the_step_rule", [rec(10, None), rec(20, None), rec(30, None)], 20,
     [10, 20]),
    ("a_run_resumed_from_an_older_format_checkpoint",
     [rec(10, None), rec(20, None), rec(30, None), rec(25, "b", (None, 10))], 25, [10, 25]),
    ("unknown_head_has_no_lineage", [rec(10, "a")], 99, []),
    ("no_records", [], 10, []),
]


@pytest.mark.parametrize("records, head, expected", [c[1:] for c in LINEAGE_CASES], ids=[c[0] for c in LINEAGE_CASES])
def test_lineage_is_the_heads_run_then_each_ancestor_up_to_its_step(records, head, expected):
    assert [r.step for r in lineage_of(records, head)] == expected


def test_a_childs_ancestry_starts_at_its_parent():
    parent = rec(25, "b", ("a", 10))
    assert child_ancestry(parent) == (("b", 25), ("a", 10))
    assert child_ancestry(rec(20, None)) == ((None, 20),)  # nothing known beyond an older-format parent


def test_lineage_module_imports_no_torch():
    import ast

    source = Path(__file__).resolve().parents[1] / "dtrain" / "checkpoint" / "lineage.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
    assert imported <= {"__future__", "typing", "dtrain"}, imported


# ------------------------------------------------------------------------------------------- real runs

BASE = [*FAST, "--eval-every-steps", "10", "--save-every-seconds", "0"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train(out: Path, *extra: str) -> int:
    reset_accelerate()
    code = main([*BASE, "--output-dir", str(out), *extra])
    reset_accelerate()
    return code


def names(out: Path) -> list[str]:
    return [p.name for p in step_dirs(out / "checkpoints")]


def test_resume_from_an_older_checkpoint_then_saving_past_it_follows_one_lineage(tmp_path, capsys):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    assert train(out, "--max-steps", "30", "--save-every-steps", "10") == 0
    assert names(out) == [step_dir_name(s) for s in (10, 20, 30)]
    assert read_trainer_state(ckdir / step_dir_name(30))["parent"] is None

    # Resume from step 10 and save past the abandoned 20 and 30, keeping only the newest 2 of the lineage.
    assert train(out, "--resume", str(ckdir / step_dir_name(10)), "--max-steps", "50", "--save-every-steps", "25",
                 "--keep-last", "2") == 0
    state = read_trainer_state(ckdir / step_dir_name(50))
    assert state["parent"] == step_dir_name(10)
    assert state["ancestry"] == [{"run_id": read_trainer_state(ckdir / step_dir_name(20))["run_id"], "step": 10}]
    lineage_steps = {10, 25, 50}
    present = {int(n[5:]) for n in names(out)}
    assert {20, 30} <= present, "retention deleted checkpoints of another lineage"
    assert {25, 50} <= present
    assert int(read_pointer(ckdir, "latest")[5:]) == 50
    assert int(read_pointer(ckdir, "best")[5:]) in lineage_steps

    capsys.readouterr()
    assert cli.main(["ckpt", "list", str(out), "--json"]) in (0, None)
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n for n, r in rows.items() if r["other_lineage"]} == {step_dir_name(20), step_dir_name(30)}
    assert cli.main(["ckpt", "list", str(out)]) in (0, None)
    assert "other lineage" in capsys.readouterr().out

    # A damaged latest falls back within the lineage (step 25), never to the abandoned, newer step 30.
    (ckdir / step_dir_name(50) / "model.safetensors").unlink()
    found = find_latest(ckdir)
    assert found.path.name == step_dir_name(25)
    assert found.skipped and found.skipped[0].startswith(step_dir_name(50))

    # Only `ckpt prune` removes the other lineage; without a rule it removes nothing else.
    before = set(names(out))
    assert cli.main(["ckpt", "prune", str(out)]) in (0, None)
    assert set(names(out)) == before - {step_dir_name(20), step_dir_name(30)}


def test_a_resume_inherits_the_lineage_and_best_ignores_other_lineages(tmp_path):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    assert train(out, "--max-steps", "30", "--save-every-steps", "10") == 0
    first_run = read_trainer_state(ckdir / step_dir_name(30))["run_id"]
    assert train(out, "--resume", str(ckdir / step_dir_name(10)), "--max-steps", "20", "--save-every-steps", "5") == 0  # saves 15 and a new 20 (replacing the other lineage's 20)
    assert read_trainer_state(ckdir / step_dir_name(20))["parent"] == step_dir_name(10)
    # Resuming the new latest continues the same lineage: its ancestry reaches the first run through step 10.
    assert train(out, "--resume", "latest", "--max-steps", "40", "--save-every-steps", "20") == 0
    state = read_trainer_state(ckdir / step_dir_name(40))
    assert state["parent"] == step_dir_name(20)
    assert [a["step"] for a in state["ancestry"]] == [20, 10]
    assert state["ancestry"][1]["run_id"] == first_run
    # The first run's step 30 is on no lineage of step 40: `best` never points at it.
    assert read_pointer(ckdir, "best") != step_dir_name(30)
    resumes = [r for r in read_records(out / "metrics.jsonl") if r.get("event") == "resume"]
    assert resumes[-1]["checkpoint"].endswith(step_dir_name(20))


@pytest.mark.slow
def test_a_crash_while_resaving_an_existing_step_leaves_the_previous_copy(runner, tmp_path):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    args = [*BASE, "--output-dir", str(out), "--save-every-steps", "10"]
    done = runner.run(train_cmd(*args, "--max-steps", "20"), timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    original = {p.name: p.read_bytes() for p in (ckdir / step_dir_name(20)).iterdir()}

    # A run from step 10 saves step 20 again and dies between moving the old copy aside and renaming in the new.
    crashed = runner.run(train_cmd(*args, "--max-steps", "30", "--resume", str(ckdir / step_dir_name(10))),
                         timeout=120, DTRAIN_FAULT_AT="old_moved_aside")
    assert crashed.returncode == -9, crashed.stdout[-3000:]
    dot_names = sorted(p.name for p in ckdir.iterdir() if p.name.startswith("."))
    assert f".trash-{step_dir_name(20)}-replaced" in dot_names, dot_names
    assert not (ckdir / step_dir_name(20)).exists()

    # The next start puts the previous copy back before resolving, so `latest` is step 20 as it was.
    resumed = runner.run(train_cmd(*args, "--max-steps", "20", "--resume", "latest"), timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "is back" in resumed.stdout
    events = [r for r in read_records(out / "metrics.jsonl") if r.get("event") == "resume"]
    assert events[-1]["checkpoint"].endswith(step_dir_name(20))
    assert {p.name: p.read_bytes() for p in (ckdir / step_dir_name(20)).iterdir()} == original
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]
