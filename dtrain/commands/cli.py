"""The `dtrain` console script (also `python -m dtrain.cli`, e.g. as the script of `accelerate launch -m`).

    dtrain train [ARGS]                       train (same flags as dtrain/train.py)
    dtrain verify-resume [ARGS]               check that interrupt + resume reproduces an uninterrupted run
    dtrain pipeline run|status FILE           stages of training runs (see dtrain/pipeline/spec.py)
    dtrain ckpt list|show|verify|prune|export checkpoint tools
    dtrain eval PATH                          evaluate a checkpoint on its task's eval split
    dtrain plot OUTPUT_DIR                    training/eval curves with interrupts, resumes, checkpoints
    dtrain status OUTPUT_DIR [--history]      how the last run ended; exits with that run's exit code

Each command's code is imported only when it runs, so `dtrain ckpt list` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dtrain.commands.common import DtrainArgumentParser, run_main

# (command, subcommand) -> "module:function"; the function takes the parsed args and may return an exit code.
HANDLERS = {
    ("pipeline", "run"): "dtrain.commands.pipeline:run_command",
    ("pipeline", "status"): "dtrain.commands.pipeline:status_command",
    ("ckpt", "list"): "dtrain.commands.ckpt:ckpt_list",
    ("ckpt", "verify"): "dtrain.commands.ckpt:ckpt_verify",
    ("ckpt", "show"): "dtrain.commands.ckpt:ckpt_show",
    ("ckpt", "prune"): "dtrain.commands.ckpt:ckpt_prune",
    ("ckpt", "export"): "dtrain.commands.export:export_command",
    ("eval", None): "dtrain.commands.evaluate:eval_command",
    ("plot", None): "dtrain.commands.plot:plot_command",
    ("status", None): "dtrain.commands.status:status_command",
}
# Commands that parse their own arguments: everything after the command name is theirs.
PASS_THROUGH = {"train": "dtrain.commands.train:main", "verify-resume": "dtrain.commands.verify_resume:main"}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; accepted: an integer >= 1")
    return value


def _add_pipeline(commands) -> None:
    pipeline = commands.add_parser("pipeline", help="run stages of training runs from a pipeline file")
    sub = pipeline.add_subparsers(dest="subcommand", required=True, parser_class=DtrainArgumentParser)
    run = sub.add_parser("run", help="run the stages in order: skip finished ones, resume interrupted ones")
    run.add_argument("file", help="pipeline file (YAML)")
    run.add_argument("--output-dir", help="where the stages' folders go (default: the file's output_dir)")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="the default: skip done stages, resume interrupted ones")
    how.add_argument("--skip-done", action="store_true",
                     help="count a stage as done only if its final checkpoint verifies by its checksums")
    how.add_argument("--fresh", action="store_true", help="delete every stage's outputs (asks, or needs --yes) and start over")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--from", dest="from_stage", metavar="STAGE", help="redo STAGE, then continue (dependents rerun)")
    which.add_argument("--only", dest="only_stage", metavar="STAGE", help="redo STAGE alone (dependents become stale)")
    run.add_argument("--yes", "-y", action="store_true", help="confirm deleting outputs without a terminal prompt")
    status = sub.add_parser("status", help="where every stage stands")
    status.add_argument("file", help="pipeline file (YAML)")
    status.add_argument("--output-dir", help="where the stages' folders are (default: the file's output_dir)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--checksums", action="store_true", help="verify every checksum of the checkpoints, not only sizes")


def _add_ckpt(commands) -> None:
    ckpt = commands.add_parser("ckpt", help="inspect and manage checkpoints")
    sub = ckpt.add_subparsers(dest="subcommand", required=True, parser_class=DtrainArgumentParser)
    listing = sub.add_parser("list", help="checkpoints of a run, with status")
    listing.add_argument("output_dir")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--checksums", action="store_true", help="also compare every file's checksum (reads every byte)")
    listing.add_argument("--local-checkpoint-dir", help="also list this node's local tier (its own checkpoints "
                         "and the replicas it keeps; {node_rank} and {rank} match every value)")
    verify = sub.add_parser("verify", help="exit 0 if a checkpoint is complete, 1 with the reason if not")
    verify.add_argument("path")
    show = sub.add_parser("show", help="step, metrics, config, files and how a checkpoint was written")
    show.add_argument("path", help="a checkpoint dir, or a run's output dir (then --which)")
    show.add_argument("--which", choices=("latest", "best"), help="for an output dir (default: latest)")
    show.add_argument("--json", action="store_true")
    show.add_argument("--checksums", action="store_true", help="verify every file's checksum, not only sizes")
    prune = sub.add_parser("prune", help="delete checkpoints with the training retention policy, and those of "
                                         "other lineages (saved after the checkpoint a later run resumed from)")
    prune.add_argument("output_dir")
    prune.add_argument("--keep-last", type=_positive, metavar="N", help="keep the newest N")
    prune.add_argument("--keep-best", type=_positive, metavar="K", help="keep the best K by --monitor")
    prune.add_argument("--keep-every-steps", type=_positive, metavar="M",
                       help="keep checkpoints whose step is a multiple of M")
    prune.add_argument("--monitor", help="eval metric for --keep-best (default: the run's)")
    prune.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better (default: the run's)")
    prune.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    export = sub.add_parser("export", help="the model weights as one .safetensors file, or (causal-lm) a "
                                           "Hugging Face model directory, for inference")
    export.add_argument("path", help="a checkpoint dir, or a run's output dir (then --which)")
    export.add_argument("--which", choices=("best", "latest"), help="for an output dir (default: best, else latest)")
    export.add_argument("--format", choices=("safetensors", "hf", "peft"), default="safetensors",
                        help="safetensors: one file; hf: a directory from_pretrained loads (causal-lm runs; a "
                             "LoRA adapter merged into its base); peft: the adapter as PeftModel.from_pretrained "
                             "loads it (--peft runs)")
    export.add_argument("--out", required=True, metavar="FILE|DIR",
                        help="where to write, e.g. model.safetensors (--format hf and peft: a directory)")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")


def build_parser() -> DtrainArgumentParser:
    parser = DtrainArgumentParser(prog="dtrain", description="dtrain: training that survives interruptions")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=DtrainArgumentParser)
    commands.add_parser("train", help="train (same flags as dtrain/train.py)", add_help=False)
    commands.add_parser("verify-resume", help="check that interrupt + resume matches an uninterrupted run",
                        add_help=False)
    _add_pipeline(commands)
    _add_ckpt(commands)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its task's eval split (CPU)")
    evaluate.add_argument("path", help="a checkpoint dir, or a run's output dir (then --which)")
    evaluate.add_argument("--which", choices=("best", "latest"), help="for an output dir (default: best, else latest)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--max-batches", type=_positive, default=0, metavar="N",
                          help="stop after N batches (default: the whole eval split)")
    evaluate.add_argument("--batch-size", type=_positive, metavar="N", help="default: the run's")
    evaluate.add_argument("--data", metavar="PATH", help="evaluate on other data (task input, as --data of train)")
    evaluate.add_argument("--task", metavar="NAME|pkg.mod:fn",
                          help="the task to rebuild (default: the checkpoint's, if it is built in)")
    evaluate.add_argument("--trust-task", action="store_true",
                          help="import the user task the checkpoint names (not searched in the working directory)")
    plot = commands.add_parser("plot", help="training/eval curves of a run as a PNG (needs dtrain[plot])")
    plot.add_argument("output_dir")
    plot.add_argument("--out", metavar="FILE.png", help="default: OUTPUT_DIR/metrics.png")
    status = commands.add_parser("status", help="how the last run in OUTPUT_DIR ended (exit_status.json); "
                                                "exits with that run's exit code, 2 if there is none")
    status.add_argument("output_dir")
    status.add_argument("--json", action="store_true", help="print the file's JSON")
    status.add_argument("--history", action="store_true",
                        help="first every ended invocation, oldest first (exit_history.jsonl; JSON lines with --json)")
    return parser


def _load(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASS_THROUGH:
        return _load(PASS_THROUGH[argv[0]])(argv[1:])
    outcome: dict[str, int] = {}

    def dispatch() -> None:
        args = build_parser().parse_args(argv)
        handler = _load(HANDLERS[(args.command, getattr(args, "subcommand", None))])
        outcome["code"] = handler(args) or 0

    return run_main(dispatch) or outcome.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
