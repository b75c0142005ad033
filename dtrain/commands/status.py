"""`dtrain status OUTPUT_DIR`: how the last run ended (its exit_status.json), with that run's exit code."""

from __future__ import annotations

import json

from dtrain.training.exit_status import read


def status_command(args) -> int:
    """`dtrain status OUTPUT_DIR`: prints how the last run ended and exits with that run's exit code."""
    data = read(args.output_dir)
    if args.json:
        print(json.dumps(data))
    else:
        line = f"{data['reason']} (exit code {data['exit_code']})"
        if data.get("signal"):
            line += f" by {data['signal']}"
        if data.get("step") is not None:
            line += f" at step {data['step']}"
        print(line)
        if data.get("checkpoint"):
            print(f"checkpoint: {data['checkpoint']}")
        if data.get("resume_command") and data["reason"] in ("interrupted", "failed"):
            print(f"Resume with: {data['resume_command']}")
        if data.get("finished_at"):
            print(f"ended at {data['finished_at']}")
    return data["exit_code"]
