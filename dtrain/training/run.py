"""One training run of a Config: the Accelerator, the task, the Trainer, `fit()` (what `dtrain train` and each
pipeline stage do)."""

from __future__ import annotations

from accelerate.utils import set_seed

from dtrain.config import Config
from dtrain.tasks import build_task
from dtrain.training.exit_status import RunOutcome
from dtrain.training.runtime import make_accelerator
from dtrain.training.trainer import FitResult, Trainer


def train(config: Config, stop_at_step: int | None = None, resume_command: str | None = None,
          outcome: RunOutcome | None = None) -> FitResult:
    """Trains the task a Config names; returns the FitResult (raises Interrupted on a signal).
    `resume_command` replaces the printed `Resume with:` command (e.g. a pipeline's own); `outcome` collects
    what exit_status.json will say."""
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
