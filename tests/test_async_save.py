"""--async-save: the loop is held only for a host copy; the commit protocol and its guarantees are unchanged."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import torch
from accelerate.utils import load as safe_load

from conftest import FAST, REPO, load_weights, same_tensors, train_cmd, wait_for
from dtrain.checkpoint.layout import step_dirs, verify_checkpoint

LONG = [*FAST, "--epochs", "0", "--max-steps", "1000000"]


def assert_every_checkpoint_complete(out: Path) -> None:
    ckpts = out / "checkpoints"
    dirs = step_dirs(ckpts)
    assert dirs, "at least one checkpoint was committed"
    for path in dirs:
        check = verify_checkpoint(path, checksums=True)
        assert check.ok, f"{path.name}: {check.reason}"
    assert (ckpts / (ckpts / "latest").read_text().strip()) in dirs


def test_async_checkpoint_has_the_same_content_as_a_synchronous_one(tmp_path):
    from dtrain.commands.train import main

    args = [*FAST, "--max-steps", "20", "--save-every-steps", "10", "--dropout", "0.1"]
    assert main([*args, "--output-dir", str(tmp_path / "sync")]) == 0
    assert main([*args, "--async-save", "--output-dir", str(tmp_path / "async")]) == 0
    for step in ("step_000000010", "step_000000020"):
        a, b = tmp_path / "sync/checkpoints" / step, tmp_path / "async/checkpoints" / step
        assert verify_checkpoint(b, checksums=True).ok
        assert {p.name for p in a.iterdir()} == {p.name for p in b.iterdir()}
        assert same_tensors(load_weights(a), load_weights(b))
        for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            assert _equal(safe_load(a / name), safe_load(b / name)), name
        assert json.loads((b / "trainer_state.json").read_text())["async"] is True
    events = [json.loads(line) for line in (tmp_path / "async/metrics.jsonl").read_text().splitlines()]
    saves = [e for e in events if e.get("event") == "checkpoint"]
    assert [e["step"] for e in saves] == [10, 20]
    assert all(e["blocking_seconds"] <= e["total_seconds"] for e in saves)


def test_plain_accelerate_loads_an_async_checkpoint(tmp_path):
    from accelerate import Accelerator

    from dtrain.config import TaskConfig
    from dtrain.tasks import regression
    from dtrain.commands.train import main

    assert main([*FAST, "--max-steps", "10", "--async-save", "--output-dir", str(tmp_path)]) == 0
    task = regression.build(TaskConfig(task="regression", n_layer=2, n_embd=32), 1234)
    optimizer = torch.optim.AdamW(task.model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(task.model, optimizer, scheduler)
    checkpoint = tmp_path / "checkpoints" / "step_000000010"
    accelerator.load_state(str(checkpoint))
    assert same_tensors({k: v for k, v in model.state_dict().items()}, load_weights(checkpoint))


def _equal(x, y) -> bool:
    from dtrain.commands.verify_resume import _equal as equal

    return equal(x, y)


def test_kill_9_while_a_background_write_is_in_flight_leaves_only_complete_checkpoints(runner, tmp_path):
    out = tmp_path / "run"
    # Deterministic: die in the background thread after the files are written, before the commit.
    result = runner.run(train_cmd(*LONG, "--save-every-steps", "5", "--async-save", "--output-dir", str(out)),
                        DTRAIN_FAULT_AT="state_written", DTRAIN_FAULT_AFTER_SAVES="2")
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:]
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step_000000005", "step_000000010"]
    assert list((out / "checkpoints").glob(".tmp-*")), "the interrupted save stays a dot-dir"
    assert_every_checkpoint_complete(out)
    # And at random moments of a run that saves every step.
    rng = random.Random(7)
    for attempt in range(2):
        run = tmp_path / f"random{attempt}"
        proc = runner.start(train_cmd(*LONG, "--save-every-steps", "1", "--async-save", "--keep-last", "2",
                                      "--output-dir", str(run)))
        wait_for(lambda: (run / "checkpoints" / "latest").exists(), what="first checkpoint")
        time.sleep(rng.uniform(0.1, 1.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert_every_checkpoint_complete(run)
    resumed = runner.run(train_cmd(*LONG[:-2], "--max-steps", "200", "--async-save", "--output-dir", str(run),
                                   "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert not list((run / "checkpoints").glob(".tmp-*")), "stale temp dirs are cleaned at start"


def test_background_write_failure_stops_the_run_with_the_clear_error(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.run(train_cmd(*LONG, "--save-every-steps", "5", "--async-save", "--output-dir", str(out)),
                        DTRAIN_FAULT_AT="manifest_written:raise", DTRAIN_FAULT_AFTER_SAVES="1")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "dtrain: error: saving checkpoint step_000000010 failed (OSError: injected fault at manifest_written)" \
        in result.stdout
    assert "Traceback" not in result.stdout
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step_000000005"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000005"
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_two_ranks_saving_every_step_asynchronously_stop_together_on_sigterm(runner, tmp_path):
    from conftest import trainer_pids
    from test_interrupts import assert_interrupt_checkpoint, both_ranks_stopped_at

    out = tmp_path / "run"
    proc = runner.start(train_cmd(*LONG, "--save-every-steps", "1", "--async-save", "--keep-last", "3",
                                  "--output-dir", str(out), processes=2), cwd=REPO)
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), what="first checkpoint")
    wait_for(lambda: len(trainer_pids(out)) == 2, what="both ranks")
    time.sleep(1.0)
    os.kill(trainer_pids(out)[1], signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    step = assert_interrupt_checkpoint(out, "SIGTERM", world_size=2)
    assert both_ranks_stopped_at(output, step), output[-3000:]
    assert_every_checkpoint_complete(out)
    resumed = runner.run(train_cmd(*LONG[:-2], "--max-steps", str(step + 3), "--save-every-steps", "1",
                                   "--async-save", "--output-dir", str(out), "--resume", "latest", processes=2),
                         cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
