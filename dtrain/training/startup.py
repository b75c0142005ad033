"""How a training starts: its directories and lock, the checkpoint it resumes from (or a fresh start), the checks
before the first resumed step, the config file and the trackers. Afterwards every rank holds the same state.

A resume reads the checkpoint's trainer_state.json once; each restorable piece takes its part of it
(`Trainer.load_state_dict`), the prepared objects and the RNG come from the checkpoint's files
(`CheckpointManager.load`), and the resume certificate checks, before anything is rewritten, that the next step
is the one an uninterrupted run would take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from dtrain.checkpoint import resolve_resume
from dtrain.checkpoint.convert import run_layout
from dtrain.checkpoint.layout import TRAINER_STATE, read_trainer_state
from dtrain.checkpoint.loading import UnloadableCheckpoint, agreed_load
from dtrain.checkpoint.resolve import find_latest
from dtrain.config import write_config
from dtrain.distributed import run_and_agree
from dtrain.errors import UsageError
from dtrain.redact import redact_values
from dtrain.training import certificate
from dtrain.training import resume as resume_checks
from dtrain.training.shared_dir import check_every_node_sees, directory_every_node_must_see

logger = get_logger(__name__)


def start(trainer) -> None:
    """Fresh start or resume of `trainer` (a dtrain Trainer); call on every rank."""
    checkpoints = trainer.checkpoints
    trainer.save_policy.restart_clock()
    # Taken now: by the time a signal arrives, the launcher whose command line we read may be gone.
    trainer.resume_command = trainer.resume_command or resume_checks.resume_command(trainer.config.output_dir)
    _create_directories(trainer)
    trainer.lock.acquire()
    checkpoints.restore_replaced()  # before resolving: an interrupted re-save must not hide a checkpoint
    source, tier = _resolve(trainer)
    if source is None:
        _start_fresh(trainer)
    else:
        loaded, path, saved = _load_first_loadable(trainer, source)
        # a chosen checkpoint that did not load was replaced by the persistent tier's previous one
        _resume(trainer, loaded, path, saved, tier=tier if str(loaded) == str(source) else "persistent")
        if trainer.local_saves is not None:
            trainer.local_saves.loaded(loaded, saved)  # a sharded local checkpoint is promoted now
    checkpoints.clean_stale()  # only now: a refused start must not touch a run's leftovers
    if trainer.local_saves is not None:  # what the local tier holds beyond where this run goes on is abandoned
        trainer.local_saves.forget(trainer.state.global_step if source is not None else None)
    if trainer.is_main:
        write_config(trainer.config, trainer.output_dir / "config.yaml")
    _init_trackers(trainer)
    trainer.reset_loss_window()
    data = trainer.train_data
    logger.info(f"{trainer.task.name}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
                f"{trainer.accelerator.num_processes} process(es) on {trainer.accelerator.device}, "
                f"{data.describe()}, {data.steps_per_epoch or 'unknown'} steps per epoch, "
                f"{trainer.total_steps} steps planned")


def _resolve(trainer) -> tuple[Path | str | None, str]:
    """The checkpoint to resume from (None: a fresh start) and its tier: with a node-local tier, `latest`/`auto`
    take the newest step complete for every rank in any tier (training/tiered.py)."""
    cfg, local = trainer.config.checkpoint, trainer.local_saves
    if local is None or cfg.resume not in ("latest", "auto"):
        resolution = resolve_resume(cfg.resume, trainer.checkpoints.storage, cfg.verify_checksums)
        _warn_skipped(resolution.skipped)
        return resolution.path, "persistent"
    try:  # the persistent tier may hold nothing yet while the local one does
        resolution, refused = resolve_resume(cfg.resume, trainer.checkpoints.storage, cfg.verify_checksums), None
        _warn_skipped(resolution.skipped)
    except UsageError as exc:
        resolution, refused = None, exc
    return local.resume_from(trainer, resolution, refused)


def _create_directories(trainer) -> None:
    """Rank 0 creates the directories; every rank learns whether that worked, so a failure there (a file in the
    way, no permission) stops all of them with one error instead of leaving them in a barrier."""
    output_dir = trainer.output_dir
    shared = directory_every_node_must_see(output_dir, trainer.checkpoints.dir)  # None: an object store
    created, error = run_and_agree(lambda: [d.mkdir(parents=True, exist_ok=True)
                                            for d in (output_dir, shared or output_dir)],
                                   trainer.is_main, trainer.accelerator.device)
    if not created:
        reason = f": {getattr(error, 'strerror', None) or error}" if error is not None else " on rank 0"
        raise UsageError(f"cannot create the output directory {output_dir}{reason}")
    if shared is not None:
        check_every_node_sees(shared, trainer.accelerator)


def _start_fresh(trainer) -> None:
    checkpoints, storage = trainer.checkpoints, trainer.checkpoints.storage
    existing = storage.step_names()
    if existing and not trainer.config.checkpoint.overwrite:
        raise UsageError(f"{storage.url()} already holds {len(existing)} checkpoint(s) (newest {existing[-1]}); "
                         f"resume with --resume latest, or pass --overwrite to start fresh and delete them")
    if existing:
        logger.warning(f"--overwrite: deleting {checkpoints.discard_all()} old checkpoint(s)")
    trainer.metrics.reset()
    trainer.metrics.event("start", 0, world_size=trainer.accelerator.num_processes, task=trainer.task.name,
                          fingerprint=trainer.task.fingerprint, total_steps=trainer.total_steps,
                          sharding=trainer.config.train.sharding or "none")
    trainer.train_data.seek(0)


def _warn_skipped(skipped: list[str]) -> None:
    for entry in skipped:
        logger.warning(f"skipping damaged checkpoint {entry}")


def _load_first_loadable(trainer, source: Path | str) -> tuple[Path | str, Path, dict[str, Any]]:
    """Loads `source`; under `--resume latest|auto`, a checkpoint that is complete but cannot be loaded is skipped
    like a damaged one (left in place) and the next older complete one of its lineage loaded instead, from
    scratch: whatever the failed load restored is overwritten. An explicit target is refused (exit 2).
    Returns (the checkpoint, its local directory, its trainer state); every rank gets the same answer."""
    cfg, storage = trainer.config.checkpoint, trainer.checkpoints.storage
    unloadable: list[UnloadableCheckpoint] = []
    while True:
        try:
            return (source, *_load(trainer, source))
        except UnloadableCheckpoint as exc:
            if cfg.resume not in ("latest", "auto"):
                raise UsageError(f"--resume: {source} cannot be loaded ({exc.reason})") from None
            unloadable.append(exc)
            logger.warning(f"skipping checkpoint {exc.name}: its files are complete but it cannot be loaded "
                           f"({exc.reason}); it is left in place, and the previous complete checkpoint of its "
                           f"lineage is tried")
        resolution = find_latest(storage, cfg.verify_checksums, passed_over={e.name for e in unloadable})
        _warn_skipped(resolution.skipped)
        if resolution.path is None:
            why = "; ".join([str(e) for e in unloadable] + resolution.skipped)
            raise UsageError(f"--resume {cfg.resume}: no usable checkpoint in {storage.url()} ({why})")
        source = resolution.path


def _load(trainer, source: Path | str) -> tuple[Path, dict[str, Any]]:
    """Everything a resume takes from a checkpoint's files, agreed by every rank (loading.agreed_load): the
    trainer state, the checks that it fits this run, the prepared objects, the RNG and the trainer's pieces."""
    acc = trainer.accelerator
    path = trainer.checkpoints.fetch(source)

    def load() -> dict[str, Any]:
        saved = read_trainer_state(path)  # the one read of trainer_state.json
        if not isinstance(saved, dict):
            raise ValueError(f"{TRAINER_STATE} holds a {type(saved).__name__}, not an object")
        resume_checks.check_compatible(saved, trainer.task, trainer.config, acc.unwrap_model(trainer.model), path)
        trainer.train_data.check_resume(saved.get("data_position"), saved.get("world_size", 1))
        sharded_run = trainer.config.train.sharding == "fsdp2"
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # the torch optimizer Accelerate wraps
        with run_layout(path, sharded_run, acc.unwrap_model(trainer.model), optimizer) as in_run_layout:
            trainer.checkpoints.load(in_run_layout, saved, fallback_seed=trainer.config.train.seed)
        trainer.load_state_dict(saved)  # counters, data position, LR plan, evaluation, early stopping
        return saved

    name = str(source).rstrip("/").rpartition("/")[2]  # step_N, whether a directory or an object-store URI
    return path, agreed_load(name, load, acc.device)


def _resume(trainer, source: Path | str, path: Path, saved: dict[str, Any], tier: str = "persistent") -> None:
    """Continues from a loaded checkpoint (a directory, or an object-store checkpoint downloaded to `path`)."""
    acc, state = trainer.accelerator, trainer.state
    if saved.get("world_size", 1) != acc.num_processes and trainer.train_data.kind == "map":
        logger.warning(f"world size changed from {saved.get('world_size')} to {acc.num_processes}: continuing at "
                       f"sample {state.epoch_samples_seen} of epoch {state.epoch}; the run is correct but not "
                       f"bit-identical to an uninterrupted one")
    _continue_accumulation(trainer, saved)
    _check_resume_certificate(trainer, saved.get("resume_certificate"), path)  # before anything is rewritten
    dropped = trainer.metrics.rewind(state.global_step)
    trainer.metrics.event("resume", state.global_step, world_size=acc.num_processes, checkpoint=str(source),
                          tier=tier, from_world_size=saved.get("world_size"), dropped_records=dropped)
    logger.info(f"resumed from {source} ({tier} tier) at step {state.global_step} (epoch {state.epoch}, "
                f"sample {state.epoch_samples_seen} of the epoch)")


def _continue_accumulation(trainer, saved: dict[str, Any]) -> None:
    """Accelerate syncs gradients when its restored micro-step counter is a multiple of grad_accum; a checkpoint
    is always at an optimizer-step boundary, so a new grad_accum restarts the count at 0."""
    before = saved.get("grad_accum") or ((saved.get("config") or {}).get("train") or {}).get("grad_accum")
    now = trainer.config.train.grad_accum
    if before is None or int(before) == now:
        return
    trainer.accelerator.step = 0
    logger.warning(f"grad_accum changed from {before} to {now}: each optimizer step now takes {now} micro-batches "
                   f"per rank instead of {before}; the run continues at sample {trainer.state.epoch_samples_seen} "
                   f"of epoch {trainer.state.epoch}")


def _check_resume_certificate(trainer, saved: dict[str, Any] | None, path: Path) -> None:
    """Before the first resumed step: is the next step's input what it would have been without the stop?"""
    acc = trainer.accelerator
    entry = certificate.local_entry(trainer.train_data.next_batch_digest(),
                                    trainer.lr.planned(trainer.state.global_step))
    mine = certificate.differences(saved, entry, acc.process_index, acc.num_processes)
    differ = certificate.agree_on_differences(mine, acc.device)
    if not differ:
        if saved:
            logger.info(f"resume certificate of {path.name} matches: the next step continues the run exactly")
        return
    message = (f"the resume certificate of {path.name} does not match: {certificate.describe(differ)}; "
               f"the resumed run will not be bit-identical to an uninterrupted one")
    if trainer.config.checkpoint.strict_resume:
        raise UsageError(f"--strict-resume: {message}")
    logger.warning(message)


def _init_trackers(trainer) -> None:
    config = trainer.config
    if config.eval.log_with == "none":
        return
    # After a resume from step S, TensorBoard hides what the interrupted run logged after S.
    step = trainer.state.global_step
    purge = {"tensorboard": {"purge_step": step + 1}} if step else {}
    trainer.accelerator.init_trackers(trainer.task.name.replace(":", "_"), init_kwargs=purge,
                                      config={k: v for k, v in redact_values(config.flat()).items()
                                              if isinstance(v, (int, float, str, bool))})  # no credentials
