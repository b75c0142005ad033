"""`dtrain pipeline run FILE` and `dtrain pipeline status FILE`."""

from __future__ import annotations

import json

from dtrain.errors import UsageError
from dtrain.pipeline.runner import RunMode, pipeline_command, run_pipeline, say
from dtrain.pipeline.spec import load_pipeline
from dtrain.pipeline.state import StageStatus, pipeline_status


def run_command(args) -> None:
    if args.fresh and (args.from_stage or args.only_stage):
        raise UsageError("--fresh redoes every stage; it cannot be combined with --from or --only")
    pipeline = load_pipeline(args.file, args.output_dir)
    mode = RunMode(fresh=args.fresh, skip_done=args.skip_done, from_stage=args.from_stage,
                   only_stage=args.only_stage, yes=args.yes)
    extra = ["--output-dir", args.output_dir] if args.output_dir else []
    statuses = run_pipeline(pipeline, mode, pipeline_command(args.file, extra))
    if statuses:
        say(f"finished; outputs in {pipeline.output_dir}")
        print(format_table(statuses), flush=True)


def status_command(args) -> None:
    pipeline = load_pipeline(args.file, args.output_dir)
    statuses = pipeline_status(pipeline, checksums=args.checksums)
    if args.json:
        print(json.dumps({"pipeline": str(pipeline.path), "output_dir": str(pipeline.output_dir),
                          "stages": [s.to_dict() for s in statuses]}, indent=1))
        return
    print(f"pipeline {pipeline.path}  (outputs in {pipeline.output_dir})")
    print(format_table(statuses))


def format_table(statuses: list[StageStatus]) -> str:
    rows = [("stage", "status", "best", "checkpoint")]
    for s in statuses:
        best = "-"
        if s.best and isinstance(s.best.get("value"), (int, float)):
            best = f"{s.best['metric']} {s.best['value']:.4g} @ {s.best['step']}"
        rows.append((s.name, s.describe(), best, s.checkpoint or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows)
