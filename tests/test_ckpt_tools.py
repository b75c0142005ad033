"""Checkpoint tools on a real run that was interrupted by SIGTERM and resumed: show, prune, export, eval, plot.

The commands run in-process through `dtrain.commands.cli.main` (they start no Accelerator), the training runs as real
processes.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import sys
from pathlib import Path

import pytest

from conftest import FAST, Runner, load_weights, same_tensors, train_cmd, wait_for
from dtrain.checkpoint.layout import read_pointer, read_trainer_state, step_dirs, verify_checkpoint
from dtrain.checkpoint.retention import RetentionPolicy
from dtrain.commands.ckpt import plan_prune
from dtrain.commands.cli import main

# Wider than FAST's default so the weights dominate an exported file (the bf16 size check needs that).
RUN_ARGS = [*FAST, "--n-embd", "128", "--max-steps", "120", "--epochs", "0", "--save-every-steps", "20",
            "--keep-last", "0"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """A finished run that a SIGTERM stopped once (after its first checkpoint) and `--resume latest` finished."""
    output_dir = tmp_path_factory.mktemp("tools") / "run"
    runner = Runner()
    try:
        proc = runner.start(train_cmd(*RUN_ARGS, "--output-dir", str(output_dir)))
        wait_for(lambda: (output_dir / "checkpoints" / "latest").exists() or proc.poll() is not None,
                 timeout=120, what="the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode in (0, 128 + signal.SIGTERM), out  # 0 only if it finished before the signal
        result = runner.run(train_cmd(*RUN_ARGS, "--output-dir", str(output_dir), "--resume", "latest"))
        assert result.returncode == 0, result.stdout
    finally:
        runner.cleanup()
    return output_dir


def checkpoint(run: Path, pointer: str) -> Path:
    return run / "checkpoints" / read_pointer(run / "checkpoints", pointer)


def test_show_tells_step_metrics_how_it_was_written_files_and_config(resumed_run, capsys):
    assert main(["ckpt", "show", str(resumed_run)]) == 0
    text = capsys.readouterr().out
    latest = checkpoint(resumed_run, "latest")
    assert f"checkpoint  {latest}" in text and "latest" in text.splitlines()[0]
    assert "progress    step 120, epoch 0" in text
    assert "written by  1 process(es) on cpu, mixed precision no, sharding none, sync save" in text
    assert "model.safetensors" in text and "trainer_state.json" in text
    assert "config" in text and "max_steps: 120" in text

    assert main(["ckpt", "show", str(resumed_run), "--which", "best", "--json", "--checksums"]) == 0
    info = json.loads(capsys.readouterr().out)
    best = checkpoint(resumed_run, "best")
    state = read_trainer_state(best)
    assert info["path"] == str(best) and info["best"] and info["complete"] and info["checksums_checked"]
    assert info["step"] == state["global_step"]
    assert info["metrics"]["val_loss"] == state["checkpoint_metric"]["value"]
    assert "loss" in info["metrics"]  # the training loss logged at that step, from metrics.jsonl
    assert info["written_by"] == {"world_size": 1, "device": "cpu", "mixed_precision": "no", "sharding": "none", "save": "sync",
                                  "created": info["written_by"]["created"]}
    assert info["files"]["model.safetensors"] == (best / "model.safetensors").stat().st_size
    assert info["config"]["train"]["max_steps"] == 120


def test_prune_dry_run_lists_and_keeps_then_prune_applies_the_training_policy(resumed_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(resumed_run, run)
    checkpoints = run / "checkpoints"
    before = [p.name for p in step_dirs(checkpoints)]
    doomed, _ = plan_prune(checkpoints, RetentionPolicy(keep_last=2, keep_every_steps=100), "val_loss")
    assert doomed  # the run kept every checkpoint (--keep-last 0), so there is something to prune

    assert main(["ckpt", "prune", str(run), "--keep-last", "2", "--keep-every-steps", "100", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert [p.name for p in step_dirs(checkpoints)] == before
    assert all(f"would delete step_{s:09d}" in listing for s in doomed)
    assert "nothing was deleted" in listing

    assert main(["ckpt", "prune", str(run), "--keep-last", "2", "--keep-every-steps", "100"]) == 0
    remaining = {int(p.name[5:]) for p in step_dirs(checkpoints)}
    assert remaining == {int(name[5:]) for name in before} - set(doomed)
    assert 100 in remaining  # a milestone
    for pointer in ("latest", "best"):
        assert checkpoint(run, pointer).is_dir()
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".trash-")]

    # The newest and the best survive even a policy that keeps a single checkpoint.
    assert main(["ckpt", "prune", str(run), "--keep-last", "1"]) == 0
    assert {p.name for p in step_dirs(checkpoints)} == {checkpoint(run, "latest").name, checkpoint(run, "best").name}

    assert main(["ckpt", "prune", str(run)]) == 2
    assert "dtrain: error: ckpt prune needs a rule" in capsys.readouterr().err


def test_export_round_trip_and_bf16_halves_the_size(resumed_run, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from dtrain.config import config_from_dict
    from dtrain.commands.export import load_exported, read_export_metadata
    from dtrain.tasks import build_task

    fp32, bf16 = tmp_path / "model.safetensors", tmp_path / "model-bf16.safetensors"
    assert main(["ckpt", "export", str(resumed_run), "--which", "latest", "--out", str(fp32)]) == 0
    assert main(["ckpt", "export", str(resumed_run), "--which", "latest", "--out", str(bf16), "--dtype", "bf16"]) == 0
    latest = checkpoint(resumed_run, "latest")
    assert same_tensors(load_file(str(fp32)), load_weights(latest))

    metadata = read_export_metadata(fp32)
    state = read_trainer_state(latest)
    assert metadata["step"] == str(state["global_step"]) and metadata["task"] == "regression"
    assert json.loads(metadata["config"]) == state["config"]

    # Loadable by the task's own model builder, from the config the file carries.
    config = config_from_dict(json.loads(metadata["config"]))
    model = build_task(config.task, config.train.seed).model
    model.load_state_dict(load_file(str(fp32)))
    rebuilt, _ = load_exported(fp32)
    assert same_tensors(rebuilt.state_dict(), load_weights(latest))

    halves = load_file(str(bf16))
    assert all(t.dtype == torch.bfloat16 for t in halves.values())
    assert bf16.stat().st_size < 0.55 * fp32.stat().st_size
    for name, tensor in load_weights(latest).items():
        torch.testing.assert_close(halves[name].float(), tensor, rtol=1e-2, atol=1e-3)
    load_exported(bf16)  # a bf16 file loads into the fp32 model too


def test_eval_reproduces_the_metric_training_measured(resumed_run, capsys):
    best = checkpoint(resumed_run, "best")
    measured = read_trainer_state(best)["checkpoint_metric"]["value"]
    # Training evaluated --eval-max-batches 4 batches; the same batches give the same number.
    assert main(["eval", str(resumed_run), "--which", "best", "--max-batches", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(best) and result["samples"] == 64
    assert result["metrics"]["val_loss"] == pytest.approx(measured, rel=1e-6)
    assert main(["eval", str(best)]) == 0  # the whole eval split, as a table
    text = capsys.readouterr().out
    assert "256 eval samples" in text and "val_loss" in text


def test_eval_of_charlm_prints_the_sample_training_wrote(runner, tmp_path, capsys):
    run = tmp_path / "charlm"
    result = runner.run(train_cmd("--quick", "--max-steps", "10", "--output-dir", str(run)))
    assert result.returncode == 0, result.stdout
    assert main(["eval", str(run), "--max-batches", "2"]) == 0
    text = capsys.readouterr().out
    assert "val_loss" in text and "sample:" in text
    written = (run / "samples" / "step_000000010.txt").read_text()
    assert text.split("sample:\n", 1)[1].rstrip("\n") == written.rstrip("\n")


def test_plot_draws_a_png_of_the_resumed_run(resumed_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    events = [json.loads(line).get("event") for line in (resumed_run / "metrics.jsonl").read_text().splitlines()]
    assert "interrupt" in events and "resume" in events
    png = tmp_path / "curves.png"
    assert main(["plot", str(resumed_run), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400

    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.std() > 0.05  # curves and text, not a blank canvas
    assert len(data) > 20_000


def test_plot_without_matplotlib_is_a_clear_usage_error(resumed_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["plot", str(resumed_run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtrain: error: dtrain plot needs matplotlib") and "dtrain[plot]" in err
    assert not (tmp_path / "x.png").exists()


def test_list_and_verify_see_a_damaged_checkpoint(resumed_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(resumed_run, run)
    damaged = step_dirs(run / "checkpoints")[0]
    (damaged / "model.safetensors").write_bytes(b"")
    assert main(["ckpt", "list", str(run), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert not rows[damaged.name]["complete"] and "model.safetensors" in rows[damaged.name]["problem"]
    assert main(["ckpt", "verify", str(damaged)]) == 1
    assert main(["ckpt", "verify", str(checkpoint(run, "latest"))]) == 0
    assert verify_checkpoint(checkpoint(run, "latest"), checksums=True).ok
    # Export and eval refuse a damaged checkpoint with the reason.
    assert main(["ckpt", "export", str(damaged), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err
