"""Where a pipeline stands, read from the stages' own outputs; and the pipeline's small state file.

The truth is on disk in each stage's folder: its checkpoints (is the newest complete one the final one?) and
`stage.json`, written when the stage starts fresh: a run id plus the run ids of the stages it consumed and
a hash of its config. A stage is stale when an upstream stage was redone after it ran (the recorded run id
differs) or its config changed. `pipeline_state.json` is a summary of that, rewritten atomically by rank 0 at
every transition, which adds only what the disk cannot tell: that a stage is running now, or failed.
Deleting it loses nothing; the next `dtrain pipeline run` rebuilds it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from dtrain.checkpoint.layout import read_trainer_state, step_dirs
from dtrain.checkpoint.location import run_checkpoints
from dtrain.checkpoint.resolve import best_checkpoint_metric, find_latest
from dtrain.pipeline.spec import Pipeline, Stage
from dtrain.utils import atomic_write_text

STATE_FORMAT = "dtrain-pipeline-state/1"
PROVENANCE = "stage.json"


@dataclass
class StageStatus:
    name: str
    state: str  # done | interrupted | stale | pending | running | failed
    step: int | None = None  # step of the newest complete checkpoint
    checkpoint: str | None = None  # that checkpoint's directory
    best: dict[str, Any] | None = None  # {"metric", "value", "step", "checkpoint"}
    reason: str = ""  # why stale, failed or damaged
    run_id: str | None = None

    def describe(self) -> str:
        text = {"done": f"done (step {self.step})", "interrupted": f"interrupted at step {self.step}",
                "running": f"running (step {self.step})" if self.step is not None else "running",
                "failed": f"failed at step {self.step}" if self.step is not None else "failed"}.get(self.state, self.state)
        return f"{text}: {self.reason}" if self.reason else text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.describe()}


# ------------------------------------------------------------------------------------------- stage.json

def read_provenance(stage: Stage) -> dict[str, Any] | None:
    try:
        data = json.loads((stage.output_dir / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_provenance(stage: Stage, inputs: dict[str, str | None], init_from: str | None) -> str:
    """Records a fresh start of `stage`: a new run id and what it was built from. Returns the run id."""
    run_id = uuid.uuid4().hex[:12]
    record = {"stage": stage.name, "run_id": run_id, "config_hash": stage.config_hash, "inputs": inputs,
              "init_from": init_from, "started": _now()}
    stage.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage.output_dir / PROVENANCE, json.dumps(record, indent=1) + "\n")
    return run_id


# ------------------------------------------------------------------------------------------- status from disk

def is_final(trainer_state: dict[str, Any]) -> bool:
    """True when a checkpoint's run had reached its end (step or epoch limit, or early stopping)."""
    config = trainer_state.get("config") or {}
    train = config.get("train", config) if isinstance(config, dict) else {}
    max_steps, epochs = int(train.get("max_steps") or 0), int(train.get("epochs") or 0)
    return bool(trainer_state.get("stopped_early")
                or (max_steps and int(trainer_state.get("global_step", 0)) >= max_steps)
                or (epochs and int(trainer_state.get("epoch", 0)) >= epochs))


def inspect_stage(stage: Stage, upstream: dict[str, StageStatus], checksums: bool = False) -> StageStatus:
    """The state of one stage from its folder, given the states of the stages before it."""
    checkpoints_dir = run_checkpoints(stage.output_dir)
    provenance = read_provenance(stage) or {}
    status = StageStatus(stage.name, "pending", run_id=provenance.get("run_id"))
    found = find_latest(checkpoints_dir, checksums)
    damaged = "; ".join(found.skipped)
    if found.path is None:
        status.reason = f"no complete checkpoint ({damaged})" if damaged else ""
        return status
    try:
        trainer_state = read_trainer_state(found.path)
    except (OSError, ValueError) as exc:
        status.reason = f"{found.path.name}: unreadable trainer state ({exc})"
        return status
    status.step, status.checkpoint = int(trainer_state.get("global_step", 0)), str(found.path)
    status.best = best_checkpoint_metric(checkpoints_dir)
    stale = _stale_reason(stage, provenance, upstream)
    if stale:
        status.state, status.reason = "stale", stale
    elif is_final(trainer_state):
        status.state = "done"
    else:
        status.state = "interrupted"
        status.reason = f"newer checkpoint damaged: {damaged}" if damaged else ""
    return status


def _stale_reason(stage: Stage, provenance: dict[str, Any], upstream: dict[str, StageStatus]) -> str:
    if provenance and provenance.get("config_hash") != stage.config_hash:
        return "its config changed since it ran"
    inputs = provenance.get("inputs") or {}
    for dep in stage.depends_on:
        dep_status = upstream[dep]
        if dep not in inputs:  # no record of what it was built from: only a finished upstream will do
            if dep_status.state != "done":
                return f"it depends on {dep}, which is {dep_status.state}"
        elif inputs[dep] != dep_status.run_id:
            return f"{dep} was redone after it ran"
        elif dep_status.state == "stale":
            return f"{dep} is stale"
        # Otherwise it was built from the same run of `dep`, even if that run is being completed or repaired.
    return ""


def pipeline_status(pipeline: Pipeline, checksums: bool = False) -> list[StageStatus]:
    """Every stage's state from disk, with `running` / `failed` taken from the state file where still true."""
    recorded = (read_state_file(pipeline) or {}).get("stages", {})
    statuses: dict[str, StageStatus] = {}
    for stage in pipeline.stages:
        status = inspect_stage(stage, statuses, checksums)
        note = recorded.get(stage.name) or {}
        if note.get("state") == "running" and _alive(note) and status.state in ("pending", "interrupted", "stale"):
            status.state, status.reason = "running", f"pid {note.get('pid')}"
        elif note.get("state") == "failed" and status.state in ("pending", "interrupted"):
            status.state, status.reason = "failed", note.get("reason", "")
        statuses[stage.name] = status
    return list(statuses.values())


def _alive(note: dict[str, Any]) -> bool:
    """Whether the process a `running` note names still runs (this process's own notes are rewritten anyway)."""
    if note.get("host") != socket.gethostname() or not isinstance(note.get("pid"), int) or note["pid"] == os.getpid():
        return False
    try:
        os.kill(note["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------- the state file

def read_state_file(pipeline: Pipeline) -> dict[str, Any] | None:
    try:
        data = json.loads(pipeline.state_file.read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: everything it said can be rebuilt from the stages
    return data if isinstance(data, dict) and data.get("format") == STATE_FORMAT else None


def write_state_file(pipeline: Pipeline, running: str | None = None,
                     failed: dict[str, str] | None = None) -> list[StageStatus]:
    """Rewrites the state file from disk (rank 0 only), marking the running or failed stage. Returns it."""
    statuses = {s.name: s for s in pipeline_status(pipeline)}
    stages = {}
    for name, status in statuses.items():
        entry = status.to_dict()
        entry.pop("name")
        if name == running:
            entry.update(state="running", pid=os.getpid(), host=socket.gethostname(), reason="")
        elif failed and name in failed:
            entry.update(state="failed", reason=failed[name])
        stages[name] = entry
    state = {"format": STATE_FORMAT, "pipeline": str(pipeline.path), "output_dir": str(pipeline.output_dir),
             "updated": _now(), "stages": stages}
    pipeline.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pipeline.state_file, json.dumps(state, indent=1) + "\n")
    return list(statuses.values())


def stage_has_outputs(stage: Stage) -> bool:
    return stage.output_dir.exists() and any(stage.output_dir.iterdir())


def count_checkpoints(stage: Stage) -> int:
    return len(step_dirs(run_checkpoints(stage.output_dir)))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
