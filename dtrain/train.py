"""dtrain's entry script: `accelerate launch dtrain/train.py [ARGS]` (also torchrun, python, `dtrain train`).

Parse the config, set up Accelerate, build the task, train. Exit codes: 0 finished, 1 failed, 2 bad usage,
128+N stopped by signal N after a committed checkpoint; the main process also records the outcome in
OUTPUT_DIR/exit_status.json, since launchers replace these codes with their own.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script: import the dtrain package from the repository, and keep this folder (whose module
    # names are generic, e.g. `config`) off the import path.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from dtrain.cli_common import DtrainArgumentParser, run_main  # noqa: E402
from dtrain.config import Config, add_config_flags, config_from_args  # noqa: E402
from dtrain.exit_status import RunOutcome  # noqa: E402


def build_parser(prog: str = "dtrain train") -> DtrainArgumentParser:
    parser = DtrainArgumentParser(prog=prog, description="Train a task with checkpoints that survive interruptions.")
    add_config_flags(parser)
    return parser


def train(config: Config, stop_at_step: int | None = None, resume_command: str | None = None,
          outcome: RunOutcome | None = None):
    """Trains the task a Config names; returns the FitResult (raises Interrupted on a signal).
    `resume_command` replaces the printed `Resume with:` command (e.g. a pipeline's own); `outcome` collects
    what exit_status.json will say."""
    from accelerate.utils import set_seed

    from dtrain.runtime import make_accelerator
    from dtrain.tasks import build_task
    from dtrain.trainer import Trainer

    accelerator = make_accelerator(config)
    set_seed(config.train.seed)
    task = build_task(config.task, config.train.seed)
    trainer = Trainer(config, task, accelerator=accelerator, resume_command=resume_command)
    if outcome is not None:
        outcome.trainer = trainer
    result = trainer.fit(stop_at_step=stop_at_step)
    if outcome is not None:
        outcome.fit_reason = result.reason
    return result


def main(argv: list[str] | None = None) -> int:
    outcome = RunOutcome()

    def parse_and_train() -> None:
        config = config_from_args(build_parser().parse_args(argv))
        outcome.output_dir = config.output_dir
        train(config, outcome=outcome)

    return run_main(parse_and_train, on_exit=outcome.record)


if __name__ == "__main__":
    sys.exit(main())
