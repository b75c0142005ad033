"""Real signals to real processes: one coordinated save, a clean exit with 128+N, and a working resume."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, TRAIN, child_env, trainer_pids, wait_for
from dtrain.checkpoint.layout import verify_checkpoint

# Long enough never to finish on its own during a test; saves every 20 steps.
LONG = [*FAST, "--epochs", "0", "--max-steps", "1000000", "--save-every-steps", "20"]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def first_checkpoint_exists(out: Path):
    return lambda: (out / "checkpoints" / "latest").exists()


def assert_interrupt_checkpoint(out: Path, signame: str, world_size: int = 1) -> int:
    """The run stopped on `signame` with a committed checkpoint at the interrupt step; returns that step."""
    rs = records(out)
    interrupt = [r for r in rs if r.get("event") == "interrupt"]
    assert len(interrupt) == 1 and interrupt[0]["signal"] == signame, interrupt
    step = interrupt[0]["step"]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{step:09d}"
    checkpoint = out / "checkpoints" / latest
    assert verify_checkpoint(checkpoint, checksums=True).ok
    assert {f"random_states_{r}.pkl" for r in range(world_size)} <= {p.name for p in checkpoint.iterdir()}
    saves_of_step = [r for r in rs if r.get("event") == "checkpoint" and r["step"] == step]
    assert len(saves_of_step) == 1, "exactly one save of the interrupt step"
    return step


def assert_no_process_left(out: Path) -> None:
    wait_for(lambda: not trainer_pids(out), timeout=30, what="every training process to exit")


def resume_line(output: str) -> list[str]:
    match = re.search(r"^Resume with: (.+)$", output, flags=re.M)
    assert match, f"no 'Resume with:' line in:\n{output[-3000:]}"
    return shlex.split(match.group(1))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138)],
                         ids=["SIGINT", "SIGTERM", "SIGUSR1"])
def test_signal_to_single_process_saves_exits_128_plus_n_and_resumes(runner, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = runner.start([sys.executable, TRAIN, *LONG, "--output-dir", str(out)], cwd=REPO)
    wait_for(first_checkpoint_exists(out), what="first checkpoint")
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, output[-3000:]
    step = assert_interrupt_checkpoint(out, sig.name)
    command = resume_line(output)
    assert command[-2:] == ["--resume", "latest"]
    if command[0] == "python":
        command[0] = sys.executable
    resumed = runner.run([*command, "--max-steps", str(step + 3)], cwd=REPO)  # a later flag wins
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    resume = [r for r in records(out) if r.get("event") == "resume"]
    assert resume and resume[0]["step"] == step


def start_two_ranks(runner, out: Path, *extra: str) -> subprocess.Popen:
    from conftest import train_cmd

    proc = runner.start(train_cmd(*LONG, *extra, "--output-dir", str(out), processes=2), cwd=REPO)
    wait_for(first_checkpoint_exists(out), what="first checkpoint of the 2-rank run")
    wait_for(lambda: len(trainer_pids(out)) == 2, what="both ranks")
    return proc


def both_ranks_stopped_at(output: str, step: int) -> bool:
    stops = re.findall(r"\[RANK (\d)\] SIG\w+ received: saving a checkpoint at step (\d+)", output)
    return sorted(stops) == [("0", str(step)), ("1", str(step))]


def test_sigterm_to_rank_1_only_stops_both_ranks_at_the_same_step(runner, tmp_path):
    out = tmp_path / "run"
    proc = start_two_ranks(runner, out)
    os.kill(trainer_pids(out)[1], signal.SIGTERM)
    output, _ = proc.communicate(timeout=90)
    step = assert_interrupt_checkpoint(out, "SIGTERM", world_size=2)
    assert both_ranks_stopped_at(output, step), output[-3000:]
    assert_no_process_left(out)
    from conftest import train_cmd

    resumed = runner.run(train_cmd(*LONG, "--max-steps", str(step + 4), "--output-dir", str(out), "--resume", "latest",
                                   processes=2), cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert [r for r in records(out) if r.get("event") == "resume"][0]["world_size"] == 2


def test_sigint_to_the_whole_process_group_saves_once(runner, tmp_path):
    out = tmp_path / "run"
    proc = start_two_ranks(runner, out)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C in a terminal does: launcher and every rank at once
    output, _ = proc.communicate(timeout=90)
    step = assert_interrupt_checkpoint(out, "SIGINT", world_size=2)
    assert both_ranks_stopped_at(output, step), output[-3000:]
    assert "aborting" not in output, "the launcher's forwarded signal must not count as a second Ctrl+C"
    assert_no_process_left(out)


def test_sigterm_to_the_multi_process_launcher_saves(runner, tmp_path):
    out = tmp_path / "run"
    proc = start_two_ranks(runner, out)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=90)
    step = assert_interrupt_checkpoint(out, "SIGTERM", world_size=2)
    assert both_ranks_stopped_at(output, step), output[-3000:]
    assert_no_process_left(out)


def test_sigterm_to_single_process_accelerate_launch_saves_and_leaves_no_orphan(runner, tmp_path):
    out = tmp_path / "run"
    proc = runner.start([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", TRAIN, *LONG,
                         "--output-dir", str(out)], cwd=REPO)
    wait_for(first_checkpoint_exists(out), what="first checkpoint")
    wait_for(lambda: len(trainer_pids(out)) == 1, what="the trainer")
    proc.send_signal(signal.SIGTERM)  # this launcher does not forward it: the trainer must notice on its own
    proc.communicate(timeout=60)
    assert_no_process_left(out)
    assert_interrupt_checkpoint(out, "SIGTERM")


def test_signal_during_evaluation_is_honoured_after_it(runner, tmp_path):
    out = tmp_path / "run"
    # Evaluation of the whole (large) eval split every 20 steps takes most of the time: the signal lands in it.
    proc = runner.start([sys.executable, TRAIN, *LONG, "--eval-max-batches", "0", "--batch-size", "1",
                         "--output-dir", str(out)], cwd=REPO)
    wait_for(first_checkpoint_exists(out), what="first checkpoint")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert_interrupt_checkpoint(out, "SIGTERM")


def test_launcher_death_is_noticed_through_the_parent_watch(tmp_path):
    from dtrain.training.interrupt import InterruptHandler

    script = (
        "import dtrain, time\n"  # records the parent first, as dtrain/train.py does
        "time.sleep(2)\n"  # the launcher dies while we are still starting up
        "from dtrain.training.interrupt import InterruptHandler\n"
        "h = InterruptHandler(watch_parent=True, poll_seconds=0.05).install()\n"
        "print('ready', flush=True)\n"
        "deadline = time.time() + 20\n"
        "while not h.requested and time.time() < deadline: time.sleep(0.05)\n"
        "print('requested', h.requested, flush=True)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
                               "stdout=open(sys.argv[2], 'w')); import time; time.sleep(0.5)",
                               script, str(tmp_path / "child.log")], env=child_env())
    try:
        parent.wait(timeout=30)
        wait_for(lambda: "requested" in (tmp_path / "child.log").read_text(), timeout=30, what="child to react")
    finally:
        parent.kill()
    assert f"requested {int(signal.SIGTERM)}" in (tmp_path / "child.log").read_text()
    assert InterruptHandler(watch_parent=False).requested == 0


def test_second_ctrl_c_during_a_save_aborts_at_once_and_loses_nothing_committed(runner, tmp_path):
    out = tmp_path / "run"
    # The second save holds for a minute after writing its files, so both Ctrl+C land inside it.
    proc = runner.start([sys.executable, TRAIN, *LONG, "--output-dir", str(out)], cwd=REPO,
                        DTRAIN_FAULT_AT="state_written:sleep=60", DTRAIN_FAULT_AFTER_SAVES="1")
    checkpoints = out / "checkpoints"
    wait_for(lambda: (checkpoints / ".tmp-step_000000040" / "trainer_state.json").exists(),
             what="the second save (step 40) to be half-way")
    proc.send_signal(signal.SIGINT)
    import time

    time.sleep(1.5)  # a person's second press, not the launcher's echo of the first
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=20)  # far less than the save's minute: it did not wait for it
    assert proc.returncode == 130
    assert "second Ctrl+C" in output
    assert (checkpoints / "latest").read_text().strip() == "step_000000020"
    assert verify_checkpoint(checkpoints / "step_000000020", checksums=True).ok
    assert list(checkpoints.glob(".tmp-*")), "the half-written save stays a dot-dir"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("step_")] == ["step_000000020"]


def test_signal_during_a_periodic_save_stops_right_after_it_without_a_second_save(runner, tmp_path):
    out = tmp_path / "run"
    proc = runner.start([sys.executable, TRAIN, *LONG, "--output-dir", str(out)], cwd=REPO,
                        DTRAIN_FAULT_AT="state_written:sleep=3", DTRAIN_FAULT_AFTER_SAVES="1")
    wait_for(lambda: (out / "checkpoints" / ".tmp-step_000000040" / "trainer_state.json").exists(),
             what="the second save (step 40) to be half-way")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output[-2000:]
    step = assert_interrupt_checkpoint(out, "SIGTERM")
    assert step == 40, "stopped at the step of the save it interrupted, with no extra training step"


def test_agreement_every_k_steps_stops_on_a_multiple_of_k(runner, tmp_path):
    out = tmp_path / "run"
    proc = runner.start([sys.executable, TRAIN, *LONG, "--agree-every-steps", "7", "--output-dir", str(out)],
                        cwd=REPO)
    wait_for(first_checkpoint_exists(out), what="first checkpoint")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    step = assert_interrupt_checkpoint(out, "SIGTERM")
    # Ranks agree every 7 steps, and also right after each save (every 20), where a signal that came in
    # during the save is acted on at once.
    assert step % 7 == 0 or step % 20 == 0, step
