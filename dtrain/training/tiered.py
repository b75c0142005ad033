"""The trainer's side of the node-local tier (docs/two-tier-checkpoints.md): its saves and their events, the resume
from the fastest tier that is complete, and stops that fit the time a launcher leaves after a signal.

A stop on SIGTERM/SIGUSR1 with a local tier writes the local checkpoint first (seconds), then the persistent one
only if this run's persistent saves (their 95th percentile) fit the rest of `--signal-grace-seconds`; otherwise
the persistent save is left to the next start, which promotes the local checkpoint (tier_recovery.py).
"""

from __future__ import annotations

import math
import time
from accelerate.logging import get_logger

from dtrain.checkpoint import tier_recovery
from dtrain.checkpoint.layout import parse_step
from dtrain.checkpoint.local_tier import LocalTier
from dtrain.checkpoint.resolve import Resolution
from dtrain.distributed import all_reduce_max
from dtrain.errors import UsageError

logger = get_logger(__name__)


def open_local_tier(config, accelerator, checkpoints) -> "LocalSaves | None":
    """The local tier of a run, None without `--local-checkpoint-dir`."""
    local = config.local_tier
    if not local.enabled:
        return None
    tier = LocalTier(accelerator, local.local_checkpoint_dir, local.local_replicas, config.checkpoint.checksum)
    logger.info(f"checkpoints: {tier.describe()}, and the persistent tier {checkpoints.storage.url()}")
    return LocalSaves(tier, checkpoints)


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class LocalSaves:
    def __init__(self, tier: LocalTier, checkpoints):
        self.tier = tier
        self.checkpoints = checkpoints
        self.persistent_seconds: list[float] = []  # this run's persistent saves, for the stop's budget
        self.stop_tier: str | None = None  # the tier that holds the checkpoint of a stop on a signal
        self.promote_after_load: tier_recovery.TierChoice | None = None  # a sharded local checkpoint chosen

    # ------------------------------------------------------------------------------------------ saves

    def save(self, trainer, wait: bool = False):
        """A local checkpoint of the trainer's step (every rank); logs the reports of finished ones."""
        step = trainer.state.global_step
        if self.tier.last_saved_step == step and not wait:
            return
        self.log(trainer, self.tier.wait(raise_error=False))
        self._warn_failure()
        state = self.checkpoints.checkpoint_state(trainer.state_dict(), trainer.evaluator.metric_at(step))
        self.log(trainer, self.tier.save(step, state, wait=wait))

    def poll(self, trainer) -> None:
        self.log(trainer, self.tier.poll())

    def finish(self, trainer) -> None:
        """Waits for a local save in flight (the end of training, an error): never abandon one half-way."""
        self.log(trainer, self.tier.wait(raise_error=False))
        self._warn_failure()

    def log(self, trainer, report) -> None:
        if report is None:
            return
        trainer.metrics.event("checkpoint", report.step, path=str(report.path), bytes=report.bytes, tier="local",
                              blocking_seconds=round(report.blocking_seconds, 4),
                              total_seconds=round(report.total_seconds, 4))

    def _warn_failure(self) -> None:
        """A failed local save does not stop training (the persistent tier still holds the run): it warns."""
        error = self.tier.clear_error()
        if error is not None:
            logger.warning(f"{error}; training goes on, the persistent tier is unaffected")

    def note_persistent(self, seconds: float) -> None:
        self.persistent_seconds.append(seconds)

    # ------------------------------------------------------------------------------------------ stops

    def stop(self, trainer, cause: str, grace: float) -> str:
        """Saves before a stop on a signal (every rank); returns the checkpoint, and says which tier holds it."""
        checkpoint, tier = self.save_before_stopping(trainer, cause, grace, lambda: trainer._save_before_stopping(cause))
        self.stop_tier = tier
        step = trainer.state.global_step
        if tier == "local" and trainer.is_main and trainer.stop_at_step != step:
            print(f"Stopped by {cause} at step {step}; checkpoint {checkpoint} (local tier: the next start "
                  f"promotes it to the persistent tier)", flush=True)
            print(f"Resume with: {trainer.resume_command}", flush=True)
        return checkpoint

    def save_before_stopping(self, trainer, cause: str, grace: float, save_persistent) -> tuple[str, str]:
        """The stop save on a signal: (the checkpoint, its tier). Every rank decides alike (rank 0's measure).
        `save_persistent()` commits the persistent checkpoint and returns where it is."""
        started = time.monotonic()
        step = trainer.state.global_step
        self.save(trainer, wait=True)
        if trainer.checkpoints.last_saved_step == step:  # its schedule saved this step persistently already:
            return save_persistent(), "persistent"        # that save is under way (or done), and it is finished
        used = time.monotonic() - started
        needed = p95(self.persistent_seconds)
        skip = trainer.is_main and needed is not None and needed > grace - used
        if not all_reduce_max([1.0 if skip else 0.0], trainer.accelerator.device)[0]:
            return save_persistent(), "persistent"
        logger.warning(f"{cause}: the stop checkpoint of step {step} is in the local tier only: a persistent save "
                       f"takes about {needed or 0:.1f}s (p95 of this run's), more than the {grace - used:.1f}s left "
                       f"of --signal-grace-seconds {grace:g}; the next start promotes it to the persistent tier")
        return str(self.tier.location(step)), "local"

    # ------------------------------------------------------------------------------------------ resume

    def resume_from(self, trainer, resolution: Resolution | None, refused: UsageError | None):
        """`--resume latest|auto`: the newest step complete for every rank in some tier. Returns (checkpoint,
        tier); checkpoint None: a fresh start (or `refused` is raised when the persistent tier refused it)."""
        cfg = trainer.config.checkpoint
        persistent = resolution.path if resolution is not None else None
        persistent_step = parse_step(str(persistent).rstrip("/").rpartition("/")[2]) if persistent is not None else None
        choice = tier_recovery.choose(self.tier, persistent_step, cfg.verify_checksums)
        if choice is None:
            if refused is not None:
                raise refused
            return persistent, "persistent"
        if choice.sharded:
            self.promote_after_load = choice
        else:
            tier_recovery.promote(self.checkpoints, choice, trainer.accelerator.process_index)
        return choice.path, choice.tier

    def loaded(self, source, saved: dict) -> None:
        """After the resume's load (every rank): a sharded local checkpoint is promoted now, by saving the state
        just loaded. Nothing happens when the load fell back to another checkpoint."""
        choice, self.promote_after_load = self.promote_after_load, None
        if choice is not None and str(source) == str(choice.path):
            tier_recovery.promote_loaded(self.checkpoints, choice, saved)

    def forget(self, step: int | None) -> None:
        """After the start: what the local tier holds beyond the step this run continues from is abandoned."""
        self.tier.forget(step)
