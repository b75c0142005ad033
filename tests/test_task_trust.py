"""A task name read from a file (a checkpoint's config, an export's metadata) never makes dtrain import code the
command line did not name: built-in tasks are rebuilt, a user task needs --task or --trust-task, and a trusted
name is never looked up in the working directory (where an attacker may have put a module beside the files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dtrain.errors import UsageError
from dtrain.tasks import task_recorded_in

REPO = Path(__file__).resolve().parents[1]
USER_TASK = "tests.helpers.tasks:user_regression"
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n\ndef build(config, seed):\n    raise SystemExit(0)\n"


def test_a_builtin_recorded_task_is_used_and_the_working_directory_is_not_searched():
    assert task_recorded_in("ckpt", "charlm") == ("charlm", False)


def test_a_user_task_from_a_file_is_refused_unless_named_or_trusted():
    with pytest.raises(UsageError, match="--task evil:build.*--trust-task"):
        task_recorded_in("ckpt", "evil:build")
    assert task_recorded_in("ckpt", "evil:build", named="mine:build") == ("mine:build", True)
    assert task_recorded_in("ckpt", "evil:build", trust_recorded=True) == ("evil:build", False)
    with pytest.raises(UsageError, match="does not record a task"):
        task_recorded_in("ckpt", {"not": "a name"})


@pytest.fixture(scope="module")
def user_task_run(tmp_path_factory):
    from tests.conftest import train_in_process

    out = tmp_path_factory.mktemp("user-task") / "run"
    assert train_in_process("--task", USER_TASK, "--output-dir", str(out), "--max-steps", "4",
                            "--save-every-steps", "4", "--eval-every-steps", "0") == 0
    return out / "checkpoints" / "step_000000004"


def planted_checkpoint(source: Path, tmp_path: Path, module: str) -> tuple[Path, Path]:
    """A copy of `source` whose recorded task is `module:build`, with `module.py` planted inside the checkpoint
    and the manifest recomputed, as someone who can write the directory would do."""
    import shutil

    from dtrain.checkpoint.layout import write_manifest

    checkpoint = tmp_path / "ckpt" / source.name
    shutil.copytree(source, checkpoint)
    marker = tmp_path / "marker"
    (checkpoint / f"{module}.py").write_text(PAYLOAD.format(marker=str(marker)))
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["task"]["task"] = f"{module}:build"
    state_file.write_text(json.dumps(state))
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint, 4)
    return checkpoint, marker


def dtrain_eval(runner, checkpoint: Path, *flags: str, cwd: Path):
    return runner.run([sys.executable, "-m", "dtrain.cli", "eval", str(checkpoint), "--max-batches", "1", *flags],
                      cwd=cwd, timeout=120, PYTHONPATH=str(REPO))


@pytest.mark.parametrize("flags", [(), ("--trust-task",)], ids=["default", "trusted"])
def test_a_task_module_planted_in_a_checkpoint_never_runs(runner, user_task_run, tmp_path, flags):
    checkpoint, marker = planted_checkpoint(user_task_run, tmp_path, "planted_task")
    result = dtrain_eval(runner, checkpoint, *flags, cwd=checkpoint)  # the module sits in the working directory
    assert result.returncode == 2, result.stdout
    assert not marker.exists(), "the planted module was imported"
    errors = [line for line in result.stdout.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stdout
    assert ("--trust-task" in errors[0]) if not flags else ("cannot import task module" in errors[0])


def test_a_user_task_checkpoint_evaluates_when_the_command_line_names_the_task(runner, user_task_run):
    refused = dtrain_eval(runner, user_task_run, cwd=REPO)
    assert refused.returncode == 2 and f"--task {USER_TASK}" in refused.stdout
    named = dtrain_eval(runner, user_task_run, "--task", USER_TASK, "--json", cwd=REPO)
    assert named.returncode == 0, named.stdout
    assert "val_loss" in json.loads(named.stdout[named.stdout.index("{"):])["metrics"]


def test_an_export_naming_a_user_task_loads_only_when_trusted(user_task_run, tmp_path):
    from dtrain.commands.cli import main
    from dtrain.commands.export import load_exported

    out = tmp_path / "model.safetensors"
    assert main(["ckpt", "export", str(user_task_run), "--out", str(out)]) == 0
    with pytest.raises(UsageError, match="--trust-task"):
        load_exported(out)
    model, config = load_exported(out, trust_task=True)
    assert config.task.task == USER_TASK and sum(p.numel() for p in model.parameters()) > 0
