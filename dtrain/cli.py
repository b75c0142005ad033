"""The `dtrain` console script: `dtrain train ...`, `dtrain ckpt list|verify ...`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dtrain.cli_common import DtrainArgumentParser, run_main
from dtrain.errors import UsageError


def checkpoints_dir_of(path: str) -> Path:
    """Accepts a run's output dir or its checkpoints/ dir."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.is_dir():
        return p
    raise UsageError(f"{path} is not a run directory (no checkpoints/ inside)")


def ckpt_list(args) -> None:
    from dtrain.checkpoint.layout import BEST, LATEST, read_pointer, read_trainer_state, step_dirs, verify_checkpoint

    ckdir = checkpoints_dir_of(args.output_dir)
    latest, best = read_pointer(ckdir, LATEST), read_pointer(ckdir, BEST)
    rows = []
    for path in step_dirs(ckdir):
        check = verify_checkpoint(path, checksums=args.checksums)
        try:
            state = read_trainer_state(path)
        except (OSError, ValueError):
            state = {}
        metric = state.get("checkpoint_metric") or {}
        rows.append({"name": path.name, "step": state.get("global_step"), "epoch": state.get("epoch"),
                     "metric": metric.get("name"), "value": metric.get("value"), "bytes": check.bytes,
                     "complete": check.ok, "problem": check.reason or None,
                     "latest": path.name == latest, "best": path.name == best})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print(f"no checkpoints in {ckdir}")
        return
    print(f"{'checkpoint':<16} {'step':>8} {'epoch':>5} {'metric':>14} {'size':>10}  status")
    for r in rows:
        value = f"{r['value']:.4f}" if isinstance(r["value"], (int, float)) else "-"
        flags = " ".join(f for f in ("latest", "best") if r[f])
        status = "complete" if r["complete"] else f"DAMAGED: {r['problem']}"
        print(f"{r['name']:<16} {r['step'] if r['step'] is not None else '?':>8} "
              f"{r['epoch'] if r['epoch'] is not None else '?':>5} {value:>14} {_size(r['bytes']):>10}  "
              f"{status} {flags}".rstrip())


def ckpt_verify(args) -> int:
    from dtrain.checkpoint.layout import verify_checkpoint

    check = verify_checkpoint(Path(args.path), checksums=True)
    if check.ok:
        print(f"{args.path}: complete ({_size(check.bytes)}, every sha256 matches)")
        return 0
    print(f"{args.path}: NOT a complete checkpoint: {check.reason}")
    return 1


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def build_parser() -> DtrainArgumentParser:
    parser = DtrainArgumentParser(prog="dtrain", description="dtrain: training that survives interruptions")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=DtrainArgumentParser)
    commands.add_parser("train", help="train (same flags as dtrain/train.py)", add_help=False)

    ckpt = commands.add_parser("ckpt", help="inspect and manage checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=DtrainArgumentParser)
    listing = ckpt_commands.add_parser("list", help="checkpoints of a run, with status")
    listing.add_argument("output_dir")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--checksums", action="store_true", help="also check sha256 of every file")
    verify = ckpt_commands.add_parser("verify", help="exit 0 if a checkpoint is complete, 1 with the reason if not")
    verify.add_argument("path")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from dtrain.train import main as train_main

        return train_main(argv[1:])
    outcome: dict[str, int] = {}

    def dispatch() -> None:
        args = build_parser().parse_args(argv)
        if args.command == "ckpt" and args.ckpt_command == "list":
            ckpt_list(args)
        elif args.command == "ckpt" and args.ckpt_command == "verify":
            outcome["code"] = ckpt_verify(args)

    code = run_main(dispatch)
    return code or outcome.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
