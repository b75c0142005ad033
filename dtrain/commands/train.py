"""`dtrain train [ARGS]` (and `accelerate launch dtrain/train.py [ARGS]`): parse the flags, train, record the exit.

Exit codes: 0 finished, 1 failed, 2 bad usage, 128+N stopped by signal N after a committed checkpoint; the main
process also records the outcome in OUTPUT_DIR/exit_status.json (and exit_history.jsonl), since launchers
replace these codes with their own. A mistyped command is recorded too, in the output dir its flags name.
"""

from __future__ import annotations

import argparse

from dtrain.commands.common import DtrainArgumentParser, run_main
from dtrain.config import add_config_flags, config_from_args, read_config_file
from dtrain.errors import UsageError
from dtrain.training.exit_status import RunOutcome


def build_parser(prog: str = "dtrain train") -> DtrainArgumentParser:
    parser = DtrainArgumentParser(prog=prog, description="Train a task with checkpoints that survive interruptions.")
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    outcome = RunOutcome()

    def parse_and_train() -> None:
        from dtrain.training.run import train  # torch and Accelerate load only once the flags are good

        try:
            config = config_from_args(build_parser().parse_args(argv))
        except UsageError:
            outcome.output_dir = output_dir_named_in(argv)  # the record of a mistyped command goes there
            raise
        outcome.output_dir, outcome.config = config.output_dir, config
        train(config, outcome=outcome)

    return run_main(parse_and_train, on_exit=outcome.record)


def output_dir_named_in(argv: list[str] | None) -> str | None:
    """The output dir that command-line flags name even when the rest of them is bad: `--output-dir`, else the
    `output_dir` of a readable `--config` file; None when neither names one (the default is not guessed)."""
    lenient = argparse.ArgumentParser(add_help=False)
    lenient.add_argument("--output-dir")
    lenient.add_argument("--config")
    try:
        named, _ = lenient.parse_known_args(argv)
    except (SystemExit, argparse.ArgumentError):  # e.g. `--output-dir` without a value
        return None
    if named.output_dir:
        return named.output_dir
    if named.config:
        try:
            value = read_config_file(named.config).get("output_dir")
        except UsageError:
            return None
        return value if isinstance(value, str) and value else None
    return None
