"""Real training runs: one process, two processes through accelerate launch, and the README's examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import FAST, REPO, launch_cmd, same_tensors, train_cmd


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def test_quick_charlm_run_writes_the_contract_layout(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.run(train_cmd("--quick", "--output-dir", str(out)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert (out / "config.yaml").exists() and (out / "metrics.csv").exists()
    assert list((out / "samples").glob("step_*.txt")), "charlm writes generated text at eval time"
    start = events(out, "start")[0]
    assert start["world_size"] == 1 and start["step"] == 0
    ckpts = out / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == "step_000000030"
    assert {"model.safetensors", "trainer_state.json", "manifest.json", "optimizer.bin"} <= {
        p.name for p in (ckpts / latest).iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "lr" in r for r in records) and any("val_loss" in r for r in records)
    assert events(out, "end")[0]["step"] == 30


def test_two_processes_really_run_two_ranks_with_identical_parameters(runner, tmp_path):
    out = tmp_path / "api"
    result = runner.run(launch_cmd(str(REPO / "tests" / "helpers" / "api_ranks.py"), str(out), processes=2))
    assert result.returncode == 0, result.stdout[-3000:]
    assert events(out, "start")[0]["world_size"] == 2
    from safetensors.torch import load_file

    rank0 = load_file(str(out / "params_rank0.safetensors"))
    rank1 = load_file(str(out / "params_rank1.safetensors"))
    assert same_tensors(rank0, rank1)
    checkpoint = out / "checkpoints" / "step_000000012"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()


def test_world_size_above_one_that_ends_with_one_rank_is_an_error(monkeypatch, capsys, tmp_path):
    # What we saw with torchrun on a CPU box without cpu=True: WORLD_SIZE=2, yet each rank alone.
    import dtrain.training.runtime
    from dtrain.commands.train import main

    class SingleRankAccelerator:
        num_processes, distributed_type = 1, "NO"

        def __init__(self, **kwargs):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dtrain.training.runtime, "Accelerator", SingleRankAccelerator)
    assert main([*FAST, "--max-steps", "2", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtrain: error:") and "WORLD_SIZE=2" in err and "Traceback" not in err


def test_inconsistent_launch_environment_is_a_usage_error(runner, tmp_path):
    result = runner.run(train_cmd(*FAST, "--max-steps", "2", "--output-dir", str(tmp_path / "r")),
                        timeout=60, WORLD_SIZE="2", RANK="0")
    assert result.returncode == 2, result.stdout[-2000:]
    assert "dtrain: error:" in result.stdout and "Traceback" not in result.stdout


def _readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(runner, tmp_path):
    blocks = _readme_blocks()
    api = next(b for b in blocks if "Trainer(" in b)
    manual = next(b for b in blocks if "CheckpointManager(" in b)
    user_task = next(b for b in blocks if "def build(config, seed)" in b)
    (tmp_path / "api_example.py").write_text(api)
    (tmp_path / "manual_example.py").write_text(manual)
    (tmp_path / "mytask.py").write_text(user_task)
    import sys

    def run(script: str) -> str:
        result = runner.run([sys.executable, script], cwd=tmp_path)
        assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}"
        return result.stdout

    api_run, manual_run = tmp_path / "runs/api-example", tmp_path / "runs/manual/checkpoints"
    run("api_example.py")
    run("manual_example.py")
    manual_last = (manual_run / "step_000000060").stat().st_ino
    # Second runs resume: the API example from its last checkpoint (step 40 of 40: nothing left to train)...
    assert "finished 40" in run("api_example.py")
    resumes = events(api_run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == 40, resumes
    assert Path(resumes[0]["checkpoint"]).name == "step_000000040"
    assert len(events(api_run, "start")) == 1, "the second run did not start over"
    # ...and the manual loop from step 60, so it trains and saves nothing: step 60 is the very same directory.
    run("manual_example.py")
    assert (manual_run / "latest").read_text().strip() == "step_000000060"
    assert (manual_run / "step_000000060").stat().st_ino == manual_last, "the manual loop saved step 60 again"
    kept = sorted(p.name for p in manual_run.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_000000040", "step_000000060"]
    result = runner.run(train_cmd("--task", "mytask:build", "--max-steps", "5", "--output-dir", "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]


def test_second_run_in_a_live_output_dir_is_refused_and_touches_nothing(runner, tmp_path):
    from conftest import wait_for

    out = tmp_path / "run"
    first = runner.start(train_cmd(*FAST, "--epochs", "0", "--max-steps", "1000000", "--save-every-steps", "20",
                                   "--output-dir", str(out)),
                         DTRAIN_FAULT_AT="state_written:sleep=60", DTRAIN_FAULT_AFTER_SAVES="1")
    wait_for(lambda: (out / "checkpoints" / ".tmp-step_000000040" / "trainer_state.json").exists(),
             what="the first run to be half-way through its second save")
    second = runner.run(train_cmd(*FAST, "--output-dir", str(out), "--resume", "latest"), timeout=60)
    assert second.returncode == 2, second.stdout[-2000:]
    assert "another dtrain run" in second.stdout
    assert list((out / "checkpoints").glob(".tmp-*")), "the live run's save in progress was left alone"
    assert first.poll() is None
