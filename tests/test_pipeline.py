"""Pipelines: stages run in order, survive a real SIGTERM, skip what is done, redo what is stale.

The stages use the small regression task so that a whole pipeline runs in seconds on two CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CPU_2PROC, free_port, wait_for
from dtrain.checkpoint.layout import read_pointer, verify_checkpoint
from dtrain.errors import UsageError
from dtrain.pipeline.runner import RunMode, plan_run
from dtrain.pipeline.spec import load_pipeline

# The regression task at a size that trains a few hundred steps per second.
FAST_DEFAULTS = {"task": "regression", "batch_size": 16, "n_layer": 2, "n_embd": 32, "log_every_steps": 5,
                 "eval_every_steps": 20, "eval_max_batches": 4, "warmup_steps": 5, "epochs": 0}


def write_pipeline(directory: Path, stages: dict, name: str = "pipeline.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump({"output_dir": "out", "defaults": FAST_DEFAULTS, "stages": stages},
                                   sort_keys=False))
    return path


def dtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtrain.cli", *args]


def status_of(runner, cwd: Path, pipeline: Path) -> dict[str, dict]:
    result = runner.run(dtrain_cmd("pipeline", "status", str(pipeline), "--json"), cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stdout
    return {s["name"]: s for s in json.loads(result.stdout)["stages"]}


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def run_id(stage_dir: Path) -> str:
    return json.loads((stage_dir / "stage.json").read_text())["run_id"]


def test_three_stages_survive_a_sigterm_in_stage_two_and_continue(runner, tmp_path):
    pipeline = write_pipeline(tmp_path, {
        "s1": {"max_steps": 40},
        "s2": {"init_from": "s1:latest", "max_steps": 200, "save_every_steps": 20, "lr": 0.001},
        "s3": {"init_from": "s2:best", "max_steps": 20},
    })
    out = tmp_path / "out"
    proc = runner.start(dtrain_cmd("pipeline", "run", str(pipeline)), cwd=tmp_path)
    # Signal only once stage 2 has committed a checkpoint, so there is something to resume from.
    wait_for(lambda: (out / "s2" / "checkpoints" / "latest").exists() or proc.poll() is not None,
             timeout=120, what="stage 2's first checkpoint")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Resume with: " in output and "pipeline run" in output.split("Resume with: ")[1].splitlines()[0]

    stages = status_of(runner, tmp_path, pipeline)
    assert stages["s1"]["state"] == "done"
    assert stages["s2"]["state"] == "interrupted"
    stopped_at = stages["s2"]["step"]
    assert 0 < stopped_at < 200
    assert stages["s3"]["state"] == "pending"
    s1_run, s1_manifest = run_id(out / "s1"), (out / "s1/checkpoints/step_000000040/manifest.json").read_text()

    # The state file is only a summary: without it the pipeline still knows where it stands.
    (out / "pipeline_state.json").unlink()
    result = runner.run(dtrain_cmd("pipeline", "run", str(pipeline)), cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout
    assert "stage s1: done (step 40) -> skipping" in result.stdout

    # Stage 1 was not rerun.
    assert run_id(out / "s1") == s1_run
    assert (out / "s1/checkpoints/step_000000040/manifest.json").read_text() == s1_manifest
    assert len(events(out / "s1", "start")) == 1 and not events(out / "s1", "resume")
    # Stage 2 resumed mid-run from its own checkpoint, not from step 0.
    assert len(events(out / "s2", "start")) == 1
    [resumed] = events(out / "s2", "resume")
    assert resumed["step"] == stopped_at
    # Stage 3 started from stage 2's best checkpoint, and records which run of stage 2 that was.
    s2_best = out / "s2" / "checkpoints" / read_pointer(out / "s2" / "checkpoints", "best")
    s3_config = yaml.safe_load((out / "s3" / "config.yaml").read_text())
    assert Path(s3_config["checkpoint"]["init_from"]) == s2_best.resolve()
    assert json.loads((out / "s3" / "stage.json").read_text())["inputs"] == {"s2": run_id(out / "s2")}

    assert {name: s["state"] for name, s in status_of(runner, tmp_path, pipeline).items()} == \
        {"s1": "done", "s2": "done", "s3": "done"}
    state_file = json.loads((out / "pipeline_state.json").read_text())
    assert {name: s["state"] for name, s in state_file["stages"].items()} == {"s1": "done", "s2": "done", "s3": "done"}


def test_skip_done_verifies_fresh_asks_and_only_makes_dependents_stale(runner, tmp_path):
    pipeline = write_pipeline(tmp_path, {
        "a": {"max_steps": 40, "save_every_steps": 20},
        "b": {"init_from": "a:latest", "max_steps": 20},
    })
    out = tmp_path / "out"
    run = lambda *flags, **kw: runner.run(dtrain_cmd("pipeline", "run", str(pipeline), *flags), cwd=tmp_path,
                                          timeout=180, **kw)
    first = run()
    assert first.returncode == 0, first.stdout
    a_run, b_run = run_id(out / "a"), run_id(out / "b")

    # Damage stage a's final checkpoint without changing any size: only checksums can tell.
    final = out / "a" / "checkpoints" / "step_000000040"
    weights = bytearray((final / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (final / "model.safetensors").write_bytes(bytes(weights))
    result = run("--skip-done")
    assert result.returncode == 0, result.stdout
    assert "stage a: interrupted at step 20" in result.stdout  # the damaged step 40 does not count
    assert verify_checkpoint(final, checksums=True).ok
    assert [e["step"] for e in events(out / "a", "resume")] == [20]
    # Resuming is the same run of stage a, so b (already built from it) stays done.
    assert run_id(out / "a") == a_run and run_id(out / "b") == b_run
    assert "stage b: done (step 20) -> skipping" in result.stdout

    # --fresh without --yes and without a terminal: a clear refusal, and nothing deleted.
    before = sorted(str(p) for p in out.rglob("*"))
    refused = runner.run(dtrain_cmd("pipeline", "run", str(pipeline), "--fresh"), cwd=tmp_path, timeout=60)
    assert refused.returncode == 2
    assert "dtrain: error: --fresh would delete" in refused.stdout and "--yes" in refused.stdout
    assert "Traceback" not in refused.stdout
    assert sorted(str(p) for p in out.rglob("*")) == before

    # --only a redoes a alone; b, built from the old a, is now stale and the next run redoes it.
    only = run("--only", "a")
    assert only.returncode == 0, only.stdout
    assert run_id(out / "a") != a_run and run_id(out / "b") == b_run
    stages = status_of(runner, tmp_path, pipeline)
    assert stages["a"]["state"] == "done"
    assert stages["b"]["state"] == "stale" and "a was redone" in stages["b"]["reason"]
    follow_up = run()
    assert follow_up.returncode == 0, follow_up.stdout
    assert "stage a: done (step 40) -> skipping" in follow_up.stdout
    assert run_id(out / "b") != b_run
    assert json.loads((out / "b" / "stage.json").read_text())["inputs"] == {"a": run_id(out / "a")}

    # Planning --from / --only on a finished pipeline (no training needed to check the decisions).
    spec = load_pipeline(pipeline, str(out))
    plan = lambda mode: [(p.name, p.action) for p in plan_run(spec, mode)]
    assert plan(RunMode()) == [("a", "skip"), ("b", "skip")]
    assert plan(RunMode(from_stage="a")) == [("a", "fresh"), ("b", "fresh")]
    assert plan(RunMode(only_stage="a")) == [("a", "fresh"), ("b", "skip")]
    assert plan(RunMode(from_stage="b")) == [("a", "skip"), ("b", "fresh")]

    # --fresh --yes starts over.
    fresh = run("--fresh", "--yes")
    assert fresh.returncode == 0, fresh.stdout
    assert not events(out / "a", "resume") and len(events(out / "a", "start")) == 1


@pytest.mark.slow
def test_pipeline_under_accelerate_launch_with_two_processes(runner, tmp_path):
    pipeline = write_pipeline(tmp_path, {
        "first": {"max_steps": 20},
        "second": {"init_from": "first:best", "max_steps": 20, "mixed_precision": "bf16"},
    })
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
           "--main_process_port", str(free_port()), "-m", "dtrain.cli", "pipeline", "run", str(pipeline)]
    result = runner.run(cmd, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]
    out = tmp_path / "out"
    for stage in ("first", "second"):
        [start] = events(out / stage, "start")
        assert start["world_size"] == 2
    state = json.loads((out / "pipeline_state.json").read_text())
    assert {name: s["state"] for name, s in state["stages"].items()} == {"first": "done", "second": "done"}
    # Rank 0 alone reports progress.
    assert result.stdout.count("stage first: pending -> starting fresh") == 1


def test_a_signal_between_stages_stops_the_pipeline_before_the_next_stage(capsys):
    from dtrain.errors import Interrupted
    from dtrain.pipeline.runner import _between_stages

    with pytest.raises(Interrupted) as stopped:
        with _between_stages("dtrain pipeline run p.yaml", is_main=True):
            os.kill(os.getpid(), signal.SIGTERM)  # handled: recorded, acted on at the end of the block
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "Resume with: dtrain pipeline run p.yaml" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer's loop installs its own


@pytest.mark.parametrize("stages, expected", [
    ({"a": {}, "b": {"init_from": "c:best"}}, "invalid value for init_from: 'c:best'"),
    ({"a": {}, "b": {"init_from": "a"}}, "accepted: a:best or a:latest"),
    ({"a": {"depends_on": ["b"]}, "b": {}}, "invalid value for depends_on: 'b'; accepted: an earlier stage"),
    ({"a": {"output_dir": "x"}}, "'output_dir' is set by the pipeline"),
    ({"a": {"lr": -1}}, "invalid value for lr: -1.0"),
    ({"a": {"not_a_field": 1}}, "unknown key 'not_a_field'"),
    ({"../a": {}}, "invalid stage name '../a'"),
])
def test_pipeline_file_errors_name_the_field(tmp_path, stages, expected):
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_pipeline(write_pipeline(tmp_path, stages))


def test_stage_keys_stack_defaults_config_file_and_inline(tmp_path):
    (tmp_path / "b.yaml").write_text("train: {lr: 0.5, max_steps: 7}\n")
    spec = load_pipeline(write_pipeline(tmp_path, {"a": {}, "b": {"config": "b.yaml", "max_steps": 9,
                                                                 "depends_on": "a"}}))
    config = spec.stage("b").config()
    assert (config.train.lr, config.train.max_steps, config.train.batch_size) == (0.5, 9, 16)
    assert config.output_dir == str(Path("out") / "b")
    assert spec.downstream("a") == {"b"} and spec.upstream("b") == {"a"}


def test_usage_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    from dtrain.commands.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "run", "missing.yaml"]) == 2
    assert capsys.readouterr().err.startswith("dtrain: error: cannot read pipeline file missing.yaml")
    pipeline = write_pipeline(tmp_path, {"a": {}})
    assert main(["pipeline", "run", str(pipeline), "--only", "zzz"]) == 2
    assert "dtrain: error: invalid value for --only: 'zzz'; accepted: a" in capsys.readouterr().err
    assert main(["pipeline", "run", str(pipeline), "--fresh", "--only", "a"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
