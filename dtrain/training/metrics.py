"""Run logs: metrics.jsonl (every record), metrics.csv (training/eval rows as a table), Accelerate trackers.

Only the main process writes, and never a credential (every string goes through dtrain.redact). On resume from
step S the files are rewound first: records with a step above S (written by the interrupted run after its last
checkpoint) are dropped, so the files read as one run.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from dtrain.errors import UsageError
from dtrain.redact import redact_values
from dtrain.utils import CREATE_MODE, atomic_write_text

FIRST_COLUMNS = ["step", "epoch", "kind"]


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash
    return records


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _open_append(path: Path, newline: str | None = None):
    """Opens a metrics file for appending, never through a symbolic link someone planted (the link is an
    error), created with the mode the user's umask leaves."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, CREATE_MODE)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UsageError(f"{path} is a symbolic link; dtrain never writes through a link it did not create: "
                         f"remove it") from None
    return os.fdopen(fd, "a", newline=newline)


class MetricsLog:
    def __init__(self, output_dir: Path, enabled: bool = True, accelerator=None):
        self.jsonl = Path(output_dir) / "metrics.jsonl"
        self.csv = Path(output_dir) / "metrics.csv"
        self.enabled = enabled
        self.accelerator = accelerator  # for trackers; None = no trackers
        self._columns: list[str] = []

    def reset(self) -> None:
        """A fresh start: forget an earlier run's records."""
        if self.enabled:
            for path in (self.jsonl, self.csv):
                path.unlink(missing_ok=True)
        self._columns = []

    def rewind(self, step: int) -> int:
        """Drops records above `step`; returns how many were dropped."""
        if not self.enabled:
            return 0
        records = read_records(self.jsonl)
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept), durable=False)
        self._rewrite_csv(kept)
        return len(records) - len(kept)

    def log(self, record: dict[str, Any], kind: str) -> None:
        """A training (`kind="train"`) or eval (`kind="eval"`) record with `step` and `epoch`; `kind` is kept."""
        if self.accelerator is not None and self.accelerator.trackers:
            values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
            self.accelerator.log({f"{kind}/{k}": v for k, v in values.items()}, step=record["step"])
        if not self.enabled:
            return
        row = {**record, "kind": kind}
        self._append_json(row)
        if not set(row) <= set(self._columns):
            self._rewrite_csv(read_records(self.jsonl))
        else:
            with _open_append(self.csv, newline="") as f:
                csv.DictWriter(f, self._columns).writerow({k: _clean(v) for k, v in row.items()})

    def event(self, name: str, step: int, **fields: Any) -> None:
        if self.enabled:
            self._append_json({"event": name, "step": step, **fields})

    def _append_json(self, record: dict[str, Any]) -> None:
        with _open_append(self.jsonl) as f:
            f.write(json.dumps({k: _clean(v) for k, v in redact_values(record).items()}) + "\n")

    def _rewrite_csv(self, records: list[dict[str, Any]]) -> None:
        rows = [r for r in records if "event" not in r]
        keys = {k for row in rows for k in row}
        self._columns = FIRST_COLUMNS + sorted(keys - set(FIRST_COLUMNS))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self._columns)
        writer.writeheader()
        writer.writerows({k: _clean(v) for k, v in row.items()} for row in rows)
        atomic_write_text(self.csv, buffer.getvalue(), durable=False)
