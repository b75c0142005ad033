"""`dtrain status OUTPUT_DIR [--history]`: how the last invocation ended (exit_status.json), with its exit code;
`--history` first lists every invocation recorded in exit_history.jsonl."""

from __future__ import annotations

import json
import sys

from dtrain.training.exit_status import (
    describe,
    describe_checkpoint,
    printable,
    read,
    read_history,
)


def status_command(args) -> int:
    """Prints how the last invocation ended and exits with its exit code (2 when there is none or its record
    cannot be read: one `dtrain: error:` line)."""
    if getattr(args, "history", False):
        _print_history(args.output_dir, args.json)
    data = read(args.output_dir)
    if args.json:
        if not getattr(args, "history", False):  # --history --json: the history's JSON lines only
            print(json.dumps(data))
        return data["exit_code"]
    print(describe(data))
    checkpoint = describe_checkpoint(data)
    if checkpoint:
        print(f"checkpoint: {checkpoint}")
    if data.get("resume_command") and data["reason"] in ("interrupted", "failed"):
        print(f"Resume with: {printable(data['resume_command'])}")
    if data.get("finished_at"):
        print(f"ended at {printable(data['finished_at'])}")
    return data["exit_code"]


def _print_history(output_dir: str, as_json: bool) -> None:
    """One line per ended invocation, oldest first; unreadable lines are skipped and counted (on stderr)."""
    records, skipped = read_history(output_dir)
    for record in records:
        if as_json:
            print(json.dumps(record))
            continue
        checkpoint = describe_checkpoint(record)
        print(f"{printable(record.get('finished_at') or '?'):20}  {describe(record)}"
              + (f", checkpoint {checkpoint}" if checkpoint else ""))
    if skipped:
        print(f"dtrain: warning: skipped {skipped} unreadable line(s) of the history", file=sys.stderr)
