"""OUTPUT_DIR/exit_status.json and exit_history.jsonl: how each invocation ended, readable behind any launcher.

`accelerate launch` and torchrun replace a worker's exit code with 1 (and print their own traceback), so a
scheduler cannot tell a finished run from an interrupted one by the launcher's code. The main process therefore
writes exit_status.json atomically at every exit, appends the same record as one line to exit_history.jsonl,
and `dtrain status OUTPUT_DIR [--history]` prints them and exits with the last invocation's exit code.

`step` and `checkpoint` always name the latest committed checkpoint while one exists, also when the invocation
never trained (a mistyped flag, a refused resume): a later mistake never hides that a run had finished.
The checkpoint is read from its location at exit, with a short bound; when that location cannot be read (an
object store that went away), it is the one this run last committed or resumed from, or else the one the
previous record named, and `checkpoint_source` says "last_seen".

Both files are written only under the run lock: a run refused because the directory is busy must not overwrite
the record of the run that owns it. Nothing in them holds a credential (dtrain.redact).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from dtrain.errors import UsageError
from dtrain.redact import redact_uri

FILE = "exit_status.json"
HISTORY_FILE = "exit_history.jsonl"
REASONS = ("finished", "early_stop", "interrupted", "usage_error", "failed")
STORE_READ_SECONDS = 5.0  # at exit, how long the checkpoint location may take to say what its latest is
MAX_RECORD_BYTES = 1 << 20  # a larger exit_status.json is not one dtrain wrote
MAX_STEP = 2**63 - 1


@dataclass
class ExitStatus:
    reason: str
    exit_code: int
    signal: str | None = None
    step: int | None = None
    checkpoint: str | None = None
    resume_command: str | None = None
    finished_at: str = ""
    # "store": read from the checkpoint location at exit; "last_seen": the location could not be read, so the
    # checkpoint this run (or the previous record) last knew of; None: there is no checkpoint.
    checkpoint_source: str | None = None
    store_error: str | None = None  # why the location could not be read, if it could not
    # "local": a stop on a signal left its checkpoint in the node-local tier only (the next start promotes it);
    # "persistent": in --checkpoint-dir. Only written by runs with a local tier.
    checkpoint_tier: str | None = None


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
    """Collects, while an invocation runs, what its exit status will say (the entry script owns one).

    `output_dir` is set as soon as it is known (from the command line even when the flags are bad), `config`
    once the flags are good, `trainer` once it exists."""

    def __init__(self):
        self.output_dir: str | None = None
        self.config = None
        self.trainer = None
        self.fit_reason: str | None = None

    def status(self, exit_code: int) -> ExitStatus:
        from dtrain.checkpoint.layout import parse_step

        trainer, previous = self.trainer, read_or_none(self.output_dir) if self.output_dir else None
        checkpoint, source, error = self._latest_checkpoint(previous)
        trained = trainer.state.global_step if trainer is not None else 0
        step = trained or (parse_step(checkpoint) if checkpoint else (0 if trainer is not None else None))
        # An invocation that never built a trainer has no command of its own: the run's is still the one.
        resume = trainer.resume_command if trainer is not None else (previous or {}).get("resume_command")
        tier = getattr(getattr(trainer, "local_saves", None), "stop_tier", None)
        if tier == "local":  # newer than the persistent tier's latest: name the local one
            checkpoint = f"step_{trainer.state.global_step:09d}"
        return ExitStatus(
            reason=reason_for(exit_code, self.fit_reason), exit_code=exit_code, signal=signal_name(exit_code),
            step=step, checkpoint=checkpoint, resume_command=redact_uri(resume), checkpoint_source=source,
            store_error=redact_uri(error), checkpoint_tier=tier)

    def record(self, exit_code: int) -> None:
        """Writes exit_status.json and its history line from the main process; never raises (the run's own
        outcome matters more than its record)."""
        if self.output_dir is None or os.environ.get("RANK", "0") != "0":
            return
        try:
            # Before a trainer exists nothing made the directory: write only into one a dtrain run used.
            write(self.output_dir, self.status(exit_code), only_into_a_run_dir=self.trainer is None)
        except Exception as exc:  # noqa: BLE001 - a status that cannot be written must not mask the exit code
            print(redact_uri(f"dtrain: warning: could not write {Path(self.output_dir) / FILE}: {exc}"), flush=True)

    def _latest_checkpoint(self, previous: dict | None) -> tuple[str | None, str | None, str | None]:
        """(checkpoint name, checkpoint_source, why the location could not be read)."""
        from dtrain.checkpoint.layout import LATEST

        storage = self._storage_opener()
        if storage is None:  # the flags were not understood: only what the output dir itself says
            latest = self._local_pointer()
            if latest is not None:
                return latest, "store", None
            return _previous_checkpoint(previous, None)
        deadline = time.monotonic() + STORE_READ_SECONDS
        latest, error = _bounded(lambda: storage().read_pointer(LATEST), deadline)
        if latest is not None:
            return latest, "store", None
        if error is None:  # no pointer: does the location hold no checkpoint at all (e.g. after --overwrite)?
            names, error = _bounded(lambda: storage().step_names(), deadline)
            if error is None and not names:
                return None, None, None
        known = self._last_known_by_this_run()
        if known is not None:
            return known, "last_seen", error
        return _previous_checkpoint(previous, error)

    def _storage_opener(self) -> Callable[[], Any] | None:
        """A function that opens the run's checkpoint storage (opening may itself reach the network)."""
        if self.trainer is not None:
            storage = self.trainer.checkpoints.storage
            return lambda: storage
        if self.config is None:
            return None
        from dtrain.checkpoint.location import open_storage, run_checkpoints

        location = run_checkpoints(self.config.output_dir, self.config.checkpoint.checkpoint_dir)
        return lambda: open_storage(location)

    def _local_pointer(self) -> str | None:
        from dtrain.checkpoint.layout import LATEST, read_pointer
        from dtrain.checkpoint.location import CHECKPOINTS_DIR

        return read_pointer(Path(self.output_dir) / CHECKPOINTS_DIR, LATEST)

    def _last_known_by_this_run(self) -> str | None:
        """The checkpoint this run last committed, or resumed from (the manager remembers both)."""
        from dtrain.checkpoint.layout import step_dir_name

        if self.trainer is None:
            return None
        step = self.trainer.checkpoints.last_saved_step
        return step_dir_name(step) if step is not None else None


def _previous_checkpoint(previous: dict | None, error: str | None) -> tuple[str | None, str | None, str | None]:
    checkpoint = (previous or {}).get("checkpoint")
    return checkpoint, ("last_seen" if checkpoint else None), error


def _bounded(read: Callable[[], Any], deadline: float) -> tuple[Any, str | None]:
    """(what `read` returned, None) or (None, why it failed), waiting at most until `deadline`: a store that
    hangs must not keep a finished process from exiting (the thread is a daemon, left behind)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = read()
        except Exception as exc:  # noqa: BLE001 - any failure of the store means "could not read it"
            result["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"

    thread = threading.Thread(target=target, name="dtrain-exit-status-read", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        return None, f"no answer within {STORE_READ_SECONDS:.0f}s"
    return result.get("value"), result.get("error")


def write(output_dir: str | Path, status: ExitStatus, only_into_a_run_dir: bool = False) -> bool:
    """Writes the status atomically and appends it to the history, if the output dir exists and no other run
    holds its lock (main process). `only_into_a_run_dir`: and only if a dtrain run has used the directory."""
    from dtrain.lock import LOCK_FILE
    from dtrain.utils import atomic_write_text

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return False  # a run refused before it made its directory leaves nothing behind
    if only_into_a_run_dir and not any((output_dir / name).exists() for name in (FILE, HISTORY_FILE, LOCK_FILE)):
        return False  # e.g. a mistyped --output-dir naming some other directory
    status.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # the umask decides
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another run owns this directory
        record = {k: v for k, v in asdict(status).items() if k != "checkpoint_tier" or v is not None}
        _append_line(output_dir / HISTORY_FILE, json.dumps(record) + "\n")
        atomic_write_text(output_dir / FILE, json.dumps(record, indent=1) + "\n")
        return True
    finally:
        os.close(fd)  # drops the flock


def _append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        os.write(fd, line.encode())  # one write of one line: a crash tears at most this line
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ reading

def validated(data: Any) -> dict[str, Any]:
    """`data` if it is an exit status dtrain could have written; ValueError saying what is wrong otherwise
    (the file may have been garbled, truncated or written by someone else)."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("reason") not in REASONS:
        raise ValueError(f"reason is not one of {', '.join(REASONS)}")
    code = data.get("exit_code")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        raise ValueError("exit_code is not an integer from 0 to 255")
    step = data.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP):
        raise ValueError("step is not a non-negative integer")
    for name in ("signal", "checkpoint", "resume_command", "finished_at", "checkpoint_source", "store_error",
                 "checkpoint_tier"):
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} is not a string")
    return data


def _parse(text: str) -> dict[str, Any]:
    def no_constants(name: str):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        return validated(json.loads(text, parse_constant=no_constants))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read(output_dir: str | Path) -> dict[str, Any]:
    """The last invocation's exit status; UsageError (one line) when there is none or it cannot be read."""
    path = Path(output_dir) / FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: no run has ended in {output_dir} yet (or it was killed "
                         f"with SIGKILL, which leaves no status; see `dtrain ckpt list {output_dir}`)") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECORD_BYTES:
        raise UsageError(f"{path} is not a dtrain exit status (larger than {MAX_RECORD_BYTES} bytes)")
    try:
        return _parse(raw.decode())
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise UsageError(f"{path} is not a dtrain exit status ({first_line})") from None


def read_or_none(output_dir: str | Path) -> dict[str, Any] | None:
    try:
        return read(output_dir)
    except UsageError:
        return None


def read_history(output_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Every recorded invocation, oldest first, and how many lines were skipped as unreadable."""
    path = Path(output_dir) / HISTORY_FILE
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    records, skipped = [], 0
    for line in lines:
        try:
            if len(line) > MAX_RECORD_BYTES:
                raise ValueError("too long")
            records.append(_parse(line.decode()))
        except ValueError:
            skipped += 1  # a line torn by a crash, or garbled
    return records, skipped


def describe(data: dict[str, Any]) -> str:
    """`finished (exit code 0) at step 600` (a record that `validated` accepted)."""
    line = f"{data['reason']} (exit code {data['exit_code']})"
    if data.get("signal"):
        line += f" by {data['signal']}"
    if data.get("step") is not None:
        line += f" at step {data['step']}"
    return printable(line)


def describe_checkpoint(data: dict[str, Any]) -> str | None:
    """`step_000000600`, with a note when the checkpoint location could not be read at exit."""
    if not data.get("checkpoint"):
        return None
    note = " (last seen: the checkpoint location could not be read)" if data.get("checkpoint_source") == "last_seen" else ""
    return printable(data["checkpoint"] + note)


def printable(text: str) -> str:
    """Without control characters: a garbled file must not drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)

