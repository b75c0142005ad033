"""No hangs and no orphans on the way out: every process of a 2-rank job exits within a bound once the launcher
or any rank is gone, and what it leaves behind resumes.

Workers of the multi-process launcher run in sessions of their own, so the Runner's process-group kill does not
reach them: they are found as the launcher's descendants (before it dies) and killed by pid at the end.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, train_cmd, wait_for
from dtrain.checkpoint.layout import verify_checkpoint

# Never finishes on its own during a test; saves every 20 steps.
LONG = [*FAST, "--epochs", "0", "--max-steps", "1000000", "--save-every-steps", "20"]
# Launcher death -> all workers gone. What it takes: noticing (0.5 s poll), the step in progress, the agreement,
# one save of this tiny model and the exit barrier; on this shared 2-core machine a few seconds. The target.
LAUNCHER_DEATH_BOUND = 60


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Every process below `root` in the process tree (by the ppid in /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; whoever adopted it has not reaped it yet


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
    return int(env["RANK"]) if "RANK" in env else None


@pytest.fixture
def workers():
    """rank -> pid of the training processes of a launcher; whatever is still alive is killed at the end."""
    found: dict[int, int] = {}

    def find(launcher: subprocess.Popen) -> dict[int, int]:
        wait_for(lambda: len({rank_of(p) for p in descendants(launcher.pid)} - {None}) == 2, what="both ranks")
        found.update({rank_of(p): p for p in descendants(launcher.pid) if rank_of(p) is not None})
        return dict(found)

    yield find
    for pid in found.values():
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)  # SIGKILL also ends a stopped process


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lock_is_free(out: Path) -> bool:
    fd = os.open(out / ".dtrain.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def only_complete_checkpoints(out: Path) -> list[str]:
    """Names of the checkpoints (no leading dot); each must verify with its manifest."""
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names:
        assert verify_checkpoint(out / "checkpoints" / name, checksums=True).ok, name
    return names


def traceback_from_dtrain(output: str) -> bool:
    """Whether a worker printed a traceback through dtrain's code (the launcher prints one of its own)."""
    return re.search(r'File ".*/dtrain/', output) is not None


def start_two_ranks(runner, out: Path, *extra: str, **env: str) -> subprocess.Popen:
    proc = runner.start(train_cmd(*LONG, *extra, "--output-dir", str(out), processes=2), cwd=REPO, **env)
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), what="the first checkpoint")
    return proc


def output_of(proc: subprocess.Popen) -> str:
    """What the launcher and its workers wrote (they share the pipe); call once every writer is gone."""
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.mark.slow
def test_launcher_killed_with_sigkill_workers_save_and_exit_and_the_run_resumes(runner, workers, tmp_path):
    out = tmp_path / "run"
    launcher = start_two_ranks(runner, out)
    ranks = workers(launcher)
    killed_at = time.monotonic()
    launcher.kill()  # SIGKILL: nothing forwards anything to the workers
    wait_for(lambda: not any(map(is_alive, ranks.values())), timeout=LAUNCHER_DEATH_BOUND,
             what="every worker to exit after the launcher's death")
    print(f"workers gone {time.monotonic() - killed_at:.1f}s after the launcher was killed")
    output = output_of(launcher)
    interrupts = [r for r in records(out) if r.get("event") == "interrupt"]
    assert len(interrupts) == 1 and interrupts[0]["signal"] == "SIGTERM", output[-3000:]
    step = interrupts[0]["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:09d}"
    assert f"step_{step:09d}" in only_complete_checkpoints(out)
    assert lock_is_free(out)
    resumed = runner.run(train_cmd(*LONG, "--max-steps", str(step + 4), "--output-dir", str(out),
                                   "--resume", "latest", processes=2), cwd=REPO, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert [r["step"] for r in records(out) if r.get("event") == "resume"] == [step]
    only_complete_checkpoints(out)


@pytest.mark.slow
def test_launcher_killed_while_a_rank_hangs_every_worker_still_exits(runner, workers, tmp_path):
    out = tmp_path / "run"
    launcher = start_two_ranks(runner, out, "--signal-grace-seconds", "5")
    ranks = workers(launcher)
    os.kill(ranks[1], signal.SIGSTOP)  # hangs (keeps its connections open): rank 0 cannot agree with it
    launcher.kill()
    killed_at = time.monotonic()
    # Rank 0 is held in a collective with the stopped rank; with nobody left to SIGKILL it, it leaves by itself
    # once the launcher's grace period is over, without committing anything.
    wait_for(lambda: not is_alive(ranks[0]), timeout=40, what="rank 0 to exit after the launcher's death")
    print(f"rank 0 gone {time.monotonic() - killed_at:.1f}s after the launcher was killed (grace 5 s)")
    os.kill(ranks[1], signal.SIGCONT)  # the hung rank wakes up to a dead launcher and a dead peer
    wait_for(lambda: not is_alive(ranks[1]), timeout=40, what="rank 1 to exit once it runs again")
    output = output_of(launcher)
    assert "the launcher is gone and this rank did not stop within 5s" in output, output[-3000:]
    assert not [r for r in records(out) if r.get("event") == "interrupt"], "no rank could agree to save"
    assert only_complete_checkpoints(out)
    assert lock_is_free(out)  # and `--resume latest` works: see the test above


@pytest.mark.slow
def test_rank_killed_with_sigkill_the_other_stops_at_once_with_a_clear_error(runner, workers, tmp_path):
    out = tmp_path / "run"
    launcher = start_two_ranks(runner, out)
    ranks = workers(launcher)
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    # Well inside the launcher's own 30 s grace before it SIGKILLs what is left: rank 0 leaves by itself.
    wait_for(lambda: not is_alive(ranks[0]), timeout=25, what="rank 0 to exit after rank 1 was killed")
    print(f"rank 0 gone {time.monotonic() - killed_at:.1f}s after rank 1 was killed")
    output = output_of(launcher)
    assert "dtrain: error: rank 0 lost contact with another rank" in output, output[-3000:]
    assert "committed checkpoints are intact" in output
    assert lock_is_free(out)
    only_complete_checkpoints(out)


@pytest.mark.slow
def test_hung_rank_turns_into_an_error_after_the_collective_timeout(runner, workers, tmp_path):
    out = tmp_path / "run"
    launcher = start_two_ranks(runner, out, "--collective-timeout-seconds", "5")
    ranks = workers(launcher)
    # A stopped process keeps its connections open, like a hung peer or a node that vanished without closing
    # them: only the timeout can tell rank 0 (torch's default would keep it waiting for 30 minutes).
    os.kill(ranks[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_for(lambda: not is_alive(ranks[0]), timeout=45, what="rank 0 to give up on the stopped rank")
    print(f"rank 0 gone {time.monotonic() - stopped_at:.1f}s after rank 1 stopped (collective timeout 5 s)")
    os.kill(ranks[1], signal.SIGKILL)
    output = output_of(launcher)
    assert "dtrain: error: rank 0 lost contact with another rank" in output, output[-3000:]
    assert lock_is_free(out)
    only_complete_checkpoints(out)


@pytest.mark.slow
def test_fault_on_rank_0_after_the_commit_stops_both_ranks_with_the_same_error(runner, workers, tmp_path):
    out = tmp_path / "run"
    # Rank 0 raises in the retention step of the second save, after step 40 was committed.
    launcher = runner.start(train_cmd(*LONG, "--output-dir", str(out), processes=2), cwd=REPO,
                            DTRAIN_FAULT_AT="retention_done:raise", DTRAIN_FAULT_RANK="0",
                            DTRAIN_FAULT_AFTER_SAVES="1")
    ranks = workers(launcher)
    wait_for(lambda: not any(map(is_alive, ranks.values())), timeout=60, what="both ranks to exit")
    output = output_of(launcher)
    # One error per rank (a progress bar may precede it on its line): rank 1 learnt of rank 0's failure.
    errors = re.findall(r"dtrain: error: checkpoint step_000000040 was committed, but [^\n]*?(?=dtrain: error:|\n|$)",
                        output)
    assert len(errors) == 2, output[-3000:]
    assert "injected fault at retention_done" in errors[0] + errors[1]
    assert not traceback_from_dtrain(output)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000040"
    assert only_complete_checkpoints(out) == ["step_000000020", "step_000000040"]


@pytest.mark.slow
def test_rank_that_never_reaches_the_exit_barrier_does_not_hold_the_others(runner, workers, tmp_path):
    out = tmp_path / "run"
    # After the agreed save, rank 1 hangs before the final barrier (as a peer whose node vanished would).
    launcher = start_two_ranks(runner, out, "--collective-timeout-seconds", "5", "--signal-grace-seconds", "120",
                               DTRAIN_FAULT_AT="exit_barrier:sleep=300", DTRAIN_FAULT_RANK="1")
    ranks = workers(launcher)
    launcher.kill()
    killed_at = time.monotonic()
    wait_for(lambda: not is_alive(ranks[0]), timeout=45, what="rank 0 to leave without its peer")
    print(f"rank 0 gone {time.monotonic() - killed_at:.1f}s after the launcher was killed (exit barrier 5 s)")
    assert is_alive(ranks[1]), "rank 1 is still held before the barrier"
    os.kill(ranks[1], signal.SIGKILL)
    output = output_of(launcher)
    assert "rank 0: another rank did not reach the end within 5s" in output, output[-3000:]
    interrupts = [r for r in records(out) if r.get("event") == "interrupt"]
    assert len(interrupts) == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{interrupts[0]['step']:09d}"
    assert lock_is_free(out)
    only_complete_checkpoints(out)


@pytest.mark.slow
def test_rank_0_failing_to_create_the_output_dir_stops_every_rank_with_one_error(runner, tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    result = runner.run(train_cmd(*FAST, "--max-steps", "2", "--output-dir", str(in_the_way / "run"),
                                  processes=2), cwd=REPO, timeout=90)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("dtrain: error:")]
    assert errors == [f"dtrain: error: cannot create the output directory {in_the_way / 'run'}: Not a directory"], \
        result.stdout[-3000:]
    assert not traceback_from_dtrain(result.stdout)


def test_collective_timeout_is_a_validated_config_field():
    from dtrain.config import build_config
    from dtrain.errors import UsageError

    assert build_config().train.collective_timeout_seconds == 600
    assert build_config(flag_values={"collective_timeout_seconds": "30"}).train.collective_timeout_seconds == 30
    for bad in ("0", "-5", "nan", "inf", "soon"):
        with pytest.raises(UsageError, match="invalid value for collective_timeout_seconds"):
            build_config(flag_values={"collective_timeout_seconds": bad})


def test_a_failure_before_an_agreement_is_reported_instead_of_raised():
    from dtrain.distributed import run_and_agree

    def fails():
        raise PermissionError(13, "Permission denied")

    ok, error = run_and_agree(fails)
    assert not ok and isinstance(error, PermissionError)
    assert run_and_agree(fails, run=False) == (True, None)  # ranks that skip the work only hear of failures
    assert run_and_agree(lambda: None) == (True, None)


def test_lost_peer_errors_are_told_apart_from_other_failures():
    from dtrain.distributed import is_lost_peer

    assert is_lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert is_lost_peer(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv"))
    assert not is_lost_peer(RuntimeError("CUDA out of memory"))
    assert not is_lost_peer(ValueError("Connection closed by peer"))


def test_run_lock_that_cannot_be_opened_is_one_usage_error(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from dtrain.errors import UsageError
    from dtrain.lock import RunLock

    lock = RunLock(tmp_path / "missing", Accelerator(cpu=True))  # rank 0's os.open fails before the agreement
    with pytest.raises(UsageError, match=r"cannot take the run lock .*\.dtrain\.lock: No such file or directory"):
        lock.acquire()
    held = RunLock(tmp_path, lock.accelerator)
    held.acquire()  # a usable directory: taken
    try:
        with pytest.raises(UsageError, match=f"another dtrain run \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path, lock.accelerator).acquire()
    finally:
        held.release()
