"""`dtrain train [ARGS]` (and `accelerate launch dtrain/train.py [ARGS]`): parse the flags, train, record the exit.

Exit codes: 0 finished, 1 failed, 2 bad usage, 128+N stopped by signal N after a committed checkpoint; the main
process also records the outcome in OUTPUT_DIR/exit_status.json, since launchers replace these codes with their own.
"""

from __future__ import annotations

from dtrain.commands.common import DtrainArgumentParser, run_main
from dtrain.config import add_config_flags, config_from_args
from dtrain.training.exit_status import RunOutcome


def build_parser(prog: str = "dtrain train") -> DtrainArgumentParser:
    parser = DtrainArgumentParser(prog=prog, description="Train a task with checkpoints that survive interruptions.")
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    outcome = RunOutcome()

    def parse_and_train() -> None:
        from dtrain.training.run import train  # torch and Accelerate load only once the flags are good

        config = config_from_args(build_parser().parse_args(argv))
        outcome.output_dir = config.output_dir
        train(config, outcome=outcome)

    return run_main(parse_and_train, on_exit=outcome.record)
