"""One training run of a Config: the Accelerator, the task, the Trainer, `fit()` (what `dtrain train` and each
pipeline stage do)."""

from __future__ import annotations

from accelerate.utils import set_seed

from dtrain import redact
from dtrain.config import Config
from dtrain.tasks import build_task
from dtrain.training import resume as resume_checks
from dtrain.training.exit_status import RunOutcome
from dtrain.training.runtime import make_accelerator
from dtrain.training.trainer import FitResult, Trainer


def train(config: Config, stop_at_step: int | None = None, resume_command: str | None = None,
          outcome: RunOutcome | None = None) -> FitResult:
    """Trains the task a Config names; returns the FitResult (raises Interrupted on a signal).
    `resume_command` replaces the printed `Resume with:` command (e.g. a pipeline's own); `outcome` collects
    what exit_status.json will say."""
    config.validate()
    redact.remember_secrets(config.to_dict())  # before any message could repeat a password without its URI
    _check_reachable(config.checkpoint.checkpoint_dir)
    # Printed after an interrupt and recorded in exit_status.json: without the credentials of any URI in it.
    resume_command = redact.redact_uri(resume_command or resume_checks.resume_command(config.output_dir))
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


def _check_reachable(location: str | None) -> None:
    """An object store that cannot even be opened (a wrong host, a closed port: some fsspec backends connect
    when opened) is bad usage, one line with the credentials masked (object_store.open_filesystem), before any
    model is built. fsspec keeps the opened filesystem, so the run's own opening reuses it."""
    from dtrain.checkpoint.location import is_uri, open_storage

    if location and is_uri(location):
        open_storage(location)
