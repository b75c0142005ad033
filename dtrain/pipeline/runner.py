"""Running a pipeline: plan which stages to skip, resume or redo, then train them in order, in-process.

Under `accelerate launch` every rank runs this same code. Rank 0 alone reads the disk to decide (the plan,
each stage's starting point) and hands its decision to the other ranks, so all ranks run the same stages even
while rank 0 is writing; rank 0 alone writes pipeline files. Each stage is one `dtrain.training.run.train(config)`
with its own Accelerator. A signal during a stage is handled by the trainer exactly as in a single run
(coordinated save, exit 128+N); one that arrives between stages stops the pipeline before the next one.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from dtrain.checkpoint.location import run_checkpoints
from dtrain.checkpoint.resolve import select_checkpoint
from dtrain.config import Config
from dtrain.errors import Interrupted, UsageError
from dtrain.pipeline.spec import Pipeline, Stage
from dtrain.pipeline.state import (StageStatus, count_checkpoints, pipeline_status, read_provenance,
                                   stage_has_outputs, write_provenance, write_state_file)
from dtrain.utils import remove_tree

T = TypeVar("T")


@dataclass
class RunMode:
    fresh: bool = False  # delete every stage's outputs (after confirmation) and run all stages
    skip_done: bool = False  # a stage is done only if its final checkpoint verifies by checksum
    from_stage: str | None = None  # redo this stage, then continue with the rest
    only_stage: str | None = None  # redo this stage alone; its dependents become stale
    yes: bool = False  # confirms --fresh without a terminal


@dataclass
class PlannedStage:
    name: str
    action: str  # skip | resume | fresh
    reason: str
    resume_from: str | None = None

    def describe(self) -> str:
        what = {"skip": "skipping", "resume": f"resuming from {self.resume_from}", "fresh": "starting fresh"}
        return f"stage {self.name}: {self.reason or 'pending'} -> {what[self.action]}"


# ------------------------------------------------------------------------------------------- planning

def plan_run(pipeline: Pipeline, mode: RunMode) -> list[PlannedStage]:
    """Decides, from the stages' outputs, what each stage does in this run. Rank 0 only (it may delete)."""
    target = mode.from_stage or mode.only_stage
    if target:
        pipeline.stage(target, "--from" if mode.from_stage else "--only")
    if mode.fresh:
        _confirm_and_delete_outputs(pipeline, mode.yes)
    statuses = {s.name: s for s in pipeline_status(pipeline, checksums=mode.skip_done)}
    running = [s for s in statuses.values() if s.state == "running"]
    if running:
        raise UsageError(f"stage {running[0].name} is being run by another process ({running[0].reason}); "
                         f"wait for it or stop it first")
    if target:
        for dep in sorted(pipeline.upstream(target), key=pipeline.names.index):
            if statuses[dep].state != "done":
                raise UsageError(f"cannot redo {target}: it depends on {dep}, which is {statuses[dep].describe()}; "
                                 f"run `dtrain pipeline run {pipeline.path}` first")
    plan: list[PlannedStage] = []
    changing: set[str] = set()  # stages that start a new run now (a resume continues the same run)
    for stage in pipeline.stages:
        planned = _plan_stage(pipeline, stage, statuses[stage.name], mode, changing)
        if planned.action == "fresh":
            changing.add(stage.name)
        plan.append(planned)
    return plan


def _plan_stage(pipeline: Pipeline, stage: Stage, status: StageStatus, mode: RunMode,
                changing: set[str]) -> PlannedStage:
    name = stage.name
    if mode.only_stage and name != mode.only_stage:
        return PlannedStage(name, "skip", f"--only {mode.only_stage}")
    if mode.from_stage and pipeline.names.index(name) < pipeline.names.index(mode.from_stage):
        return PlannedStage(name, "skip", f"before --from {mode.from_stage}")
    if mode.fresh:
        return PlannedStage(name, "fresh", "--fresh")
    if name in (mode.from_stage, mode.only_stage):
        return PlannedStage(name, "fresh", "redo requested")
    rerun = [dep for dep in stage.depends_on if dep in changing]
    if rerun and status.state != "pending":
        return PlannedStage(name, "fresh", f"{rerun[0]} runs again before it")
    if status.state == "done":
        return PlannedStage(name, "skip", status.describe())
    if status.state in ("interrupted", "failed") and status.checkpoint:
        return PlannedStage(name, "resume", status.describe(), resume_from=status.checkpoint)
    return PlannedStage(name, "fresh", status.describe())


def _confirm_and_delete_outputs(pipeline: Pipeline, yes: bool) -> None:
    existing = [s for s in pipeline.stages if stage_has_outputs(s)]
    if not existing:
        return
    checkpoints = sum(count_checkpoints(s) for s in existing)
    what = (f"the outputs of {len(existing)} stage(s) ({', '.join(s.name for s in existing)}; "
            f"{checkpoints} checkpoint(s)) under {pipeline.output_dir}")
    if not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError(f"--fresh would delete {what}; pass --yes to confirm (there is no terminal to ask "
                             f"on); nothing was deleted")
        print(f"--fresh deletes {what}.", file=sys.stderr)
        if input("Delete them and start over? [y/N] ").strip().lower() not in ("y", "yes"):
            raise UsageError("--fresh was not confirmed; nothing was deleted")
    for stage in existing:
        remove_tree(stage.output_dir)
    pipeline.state_file.unlink(missing_ok=True)



# ------------------------------------------------------------------------------------------- one stage

def prepare_stage(pipeline: Pipeline, stage: Stage, planned: PlannedStage) -> Config:
    """Resolves `init_from: STAGE:which`; for a fresh start clears the stage's folder and records what it
    starts from. Returns the stage's training config. Rank 0 only."""
    init_from = resolve_init_from(pipeline, stage)
    if planned.action == "resume":
        return stage.config(init_from=init_from, resume=planned.resume_from)
    if stage.output_dir.exists():
        remove_tree(stage.output_dir)  # before stage.json, so old checkpoints never pass for the new run
    inputs = {dep: (read_provenance(pipeline.stage(dep)) or {}).get("run_id") for dep in stage.depends_on}
    write_provenance(stage, inputs, init_from)
    return stage.config(init_from=init_from)


def resolve_init_from(pipeline: Pipeline, stage: Stage) -> str | None:
    """The checkpoint `init_from: STAGE:best|latest` names (verified), as an absolute path."""
    ref = stage.init_ref
    if ref is None:
        return None
    try:
        path = select_checkpoint(run_checkpoints(pipeline.stage(ref.stage).output_dir), ref.which)
    except UsageError as exc:
        raise UsageError(f"stage {stage.name}: init_from {ref}: {exc}") from None
    return str(Path(path).resolve())


# ------------------------------------------------------------------------------------------- the run

def run_pipeline(pipeline: Pipeline, mode: RunMode, command: str) -> list[StageStatus]:
    """Runs the pipeline on every rank; `command` is how to continue it (printed after an interrupt)."""
    from dtrain.training.run import train

    device = _pipeline_device(pipeline)
    is_main = _start_processes(device)
    with _between_stages(command, is_main):
        plan = decided_by_rank_zero(lambda: plan_run(pipeline, mode))
        if is_main:
            write_state_file(pipeline)
    for planned in plan:
        say(planned.describe(), is_main)
        if planned.action == "skip":
            continue
        stage = pipeline.stage(planned.name)
        with _between_stages(command, is_main):
            config = decided_by_rank_zero(lambda: prepare_stage(pipeline, stage, planned))
        if is_main:
            write_state_file(pipeline, running=stage.name)
        try:
            # Signals now behave exactly as in a single `dtrain train`; `Resume with:` names the pipeline.
            result = train(config, resume_command=command)
        except Interrupted:
            if is_main:
                write_state_file(pipeline)
            raise
        except Exception as exc:
            if is_main:
                write_state_file(pipeline, failed={stage.name: f"{type(exc).__name__}: {exc}"})
            raise
        if is_main:
            write_state_file(pipeline)
        if result.pending_signal:  # arrived during the stage's final save: the stage is done, stop here
            _stop(result.pending_signal, command, is_main)
    return write_state_file(pipeline) if is_main else []


@contextmanager
def _between_stages(command: str, is_main: bool):
    """A signal that arrives while the pipeline decides or prepares a stage stops it at the end of the block,
    on every rank at once, rather than half-way through writing. During a stage the trainer's own handlers
    take over (they are installed for the training loop; outside it signals keep their default effect)."""
    from dtrain.training.interrupt import InterruptHandler

    with InterruptHandler(watch_parent=False) as interrupts:
        yield
        _stop_if_signalled(interrupts, command, is_main)


def _pipeline_device(pipeline: Pipeline) -> str:
    from dtrain.training.runtime import resolve_device

    devices = {s.name: resolve_device(s.config(init_from=str(s.init_ref) if s.init_ref else None).train.device)
               for s in pipeline.stages}
    if len(set(devices.values())) > 1:
        raise UsageError(f"invalid value for device: the stages ask for {', '.join(sorted(set(devices.values())))} "
                         f"({devices}); accepted: one device for every stage of a pipeline")
    return next(iter(devices.values()))


def _start_processes(device: str) -> bool:
    """Sets up the one process group that every stage shares (each stage's Accelerator gets fresh settings of
    its own, see dtrain.training.runtime); run_main closes the group at the end. Returns whether this is rank 0."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu").is_main_process


def decided_by_rank_zero(decide: Callable[[], T]) -> T:
    """Runs `decide` on rank 0 only and gives every rank its result, or the same UsageError."""
    from dtrain.distributed import is_distributed

    if not is_distributed():
        return decide()
    import torch.distributed as dist

    payload: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", decide())]
        except UsageError as exc:
            payload, error = [("usage", str(exc))], exc
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear about it, or they wait forever
            payload, error = [("error", f"{type(exc).__name__}: {exc}")], exc
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    kind, value = payload[0]
    if kind == "usage":
        raise UsageError(value)
    if kind == "error":
        raise RuntimeError(f"rank 0 failed while deciding for all ranks: {value}")
    return value


def _stop_if_signalled(interrupts, command: str, is_main: bool) -> None:
    from accelerate import PartialState

    from dtrain.distributed import is_distributed

    signum, _ = interrupts.agree(PartialState().device if is_distributed() else "cpu")
    if signum:
        _stop(signum, command, is_main)


def _stop(signum: int, command: str, is_main: bool) -> None:
    say(f"stopped by signal {signum} between stages; every finished stage is kept", is_main)
    if is_main:
        print(f"Resume with: {command}", flush=True)
    raise Interrupted(signum)


def pipeline_command(pipeline_file: str, extra: list[str] = ()) -> str:
    """The command that continues this pipeline: the same launcher and file, without redo/fresh options."""
    from dtrain.training.resume import launch_argv

    argv = launch_argv()
    prefix = argv[:argv.index("pipeline")] if "pipeline" in argv else ["dtrain"]
    if prefix[0] == "python" and len(prefix) == 2 and prefix[1].endswith("cli.py"):
        prefix = ["python", "-m", "dtrain.cli"]  # `python -m dtrain.cli` shows up as the file's path
    return shlex.join([*prefix, "pipeline", "run", pipeline_file, *extra])


def say(message: str, is_main: bool = True) -> None:
    if is_main:
        print(f"dtrain pipeline: {message}", flush=True)
