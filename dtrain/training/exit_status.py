"""OUTPUT_DIR/exit_status.json: how the last run ended, readable behind any launcher.

`accelerate launch` and torchrun replace a worker's exit code with 1 (and print their own traceback), so a
scheduler cannot tell a finished run from an interrupted one by the launcher's code. The main process therefore
writes this file atomically at every exit, and `dtrain status OUTPUT_DIR` prints it and exits with the run's
own exit code.

It is written only under the run lock: a second run that was refused because the directory is busy must not
overwrite the status of the run that owns it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dtrain.errors import UsageError

FILE = "exit_status.json"
REASONS = ("finished", "early_stop", "interrupted", "usage_error", "failed")


@dataclass
class ExitStatus:
    reason: str
    exit_code: int
    signal: str | None = None
    step: int | None = None
    checkpoint: str | None = None
    resume_command: str | None = None
    finished_at: str = ""


def reason_for(exit_code: int, fit_reason: str | None = None) -> str:
    if exit_code == 0:
        return fit_reason if fit_reason in ("finished", "early_stop") else "finished"
    if exit_code == 2:
        return "usage_error"
    if exit_code > 128 or exit_code == 124:  # a signal, or --max-time: stopped after a committed checkpoint
        return "interrupted"
    return "failed"


def signal_name(exit_code: int) -> str | None:
    if exit_code <= 128:
        return None
    try:
        return signal.Signals(exit_code - 128).name
    except ValueError:
        return None


class RunOutcome:
    """Collects, while a training runs, what its exit status will say (the entry script owns one)."""

    def __init__(self):
        self.output_dir: str | None = None
        self.trainer = None
        self.fit_reason: str | None = None

    def status(self, exit_code: int) -> ExitStatus:
        from dtrain.checkpoint.layout import LATEST

        trainer = self.trainer
        return ExitStatus(
            reason=reason_for(exit_code, self.fit_reason), exit_code=exit_code, signal=signal_name(exit_code),
            step=trainer.state.global_step if trainer is not None else None,
            checkpoint=trainer.checkpoints.storage.read_pointer(LATEST) if trainer is not None else None,
            resume_command=trainer.resume_command if trainer is not None else None)

    def record(self, exit_code: int) -> None:
        """Writes exit_status.json from the main process; never raises (the run's own outcome matters more)."""
        if self.output_dir is None or os.environ.get("RANK", "0") != "0":
            return
        try:
            write(self.output_dir, self.status(exit_code))
        except Exception as exc:  # noqa: BLE001 - a status that cannot be written must not mask the exit code
            print(f"dtrain: warning: could not write {Path(self.output_dir) / FILE}: {exc}", flush=True)


def write(output_dir: str | Path, status: ExitStatus) -> bool:
    """Writes the status atomically if the output dir exists and no other run holds its lock (main process)."""
    from dtrain.lock import LOCK_FILE
    from dtrain.utils import atomic_write_text

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return False  # a run refused before it made its directory leaves nothing behind
    status.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another run owns this directory
        atomic_write_text(output_dir / FILE, json.dumps(asdict(status), indent=1) + "\n")
        return True
    finally:
        os.close(fd)  # drops the flock


def read(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: no run has ended in {output_dir} yet (or it was killed "
                         f"with SIGKILL, which leaves no status; see `dtrain ckpt list {output_dir}`)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("reason") not in REASONS or not isinstance(data.get("exit_code"), int):
        raise UsageError(f"{path} is not a dtrain exit status")
    return data
