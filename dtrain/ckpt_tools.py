"""`dtrain ckpt list|verify|show|prune`: inspecting and pruning a run's checkpoints (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dtrain.checkpoint.layout import (BEST, LATEST, MANIFEST, current_lineage, parse_step, read_pointer,
                                      read_trainer_state, step_dir_name, step_dirs, verify_checkpoint)
from dtrain.checkpoint.resolve import find_latest
from dtrain.checkpoint.retention import RetentionPolicy, checkpoints_to_delete
from dtrain.errors import UsageError
from dtrain.metrics import read_records
from dtrain.utils import remove_tree


def checkpoints_dir_of(path: str | Path) -> Path:
    """Accepts a run's output dir or its checkpoints/ dir."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.is_dir():
        return p
    raise UsageError(f"{path} is not a run directory (no checkpoints/ inside)")


def select_checkpoint(path: str | Path, which: str | None = None, verify: bool = True,
                      prefer: str = "best") -> Path:
    """A checkpoint dir as given, or the `best`/`latest` one of a run (`which=None`: `prefer`; the latest when
    the run has no best).

    With `verify`, a checkpoint that is not complete (sizes and sha256) is refused with the reason."""
    p = Path(path)
    if (p / "trainer_state.json").exists() or parse_step(p.name) is not None:
        if which is not None:
            raise UsageError(f"--which {which} picks a checkpoint of a run; {p} already is one (drop --which)")
        chosen = p
    else:
        checkpoints_dir = checkpoints_dir_of(p)
        best = read_pointer(checkpoints_dir, BEST)
        if which == "best" and best is None:
            raise UsageError(f"invalid value for --which: 'best': {checkpoints_dir} has no best checkpoint "
                             f"(no eval measured the monitor); accepted here: latest")
        if best is not None and (which or prefer) == "best":
            chosen = checkpoints_dir / best
        else:
            latest = find_latest(checkpoints_dir).path
            if latest is None:
                raise UsageError(f"{checkpoints_dir} holds no complete checkpoint")
            chosen = latest
    if not chosen.is_dir():
        raise UsageError(f"{chosen} does not exist")
    if verify:
        check = verify_checkpoint(chosen, checksums=True)
        if not check.ok:
            raise UsageError(f"{chosen} is not a complete checkpoint ({check.reason})")
    return chosen


# ------------------------------------------------------------------------------------------- list, verify

def ckpt_list(args) -> None:
    ckdir = checkpoints_dir_of(args.output_dir)
    latest, best = read_pointer(ckdir, LATEST), read_pointer(ckdir, BEST)
    _, others = current_lineage(ckdir)
    other_steps = {r.step for r in others}
    rows = []
    for path in step_dirs(ckdir):
        check = verify_checkpoint(path, checksums=args.checksums)
        state = _trainer_state_or_empty(path)
        metric = state.get("checkpoint_metric") or {}
        rows.append({"name": path.name, "step": state.get("global_step"), "epoch": state.get("epoch"),
                     "metric": metric.get("name"), "value": metric.get("value"), "bytes": check.bytes,
                     "complete": check.ok, "problem": check.reason or None,
                     "latest": path.name == latest, "best": path.name == best,
                     "parent": state.get("parent"), "other_lineage": parse_step(path.name) in other_steps})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print(f"no checkpoints in {ckdir}")
        return
    print(f"{'checkpoint':<16} {'step':>8} {'epoch':>5} {'metric':>14} {'size':>10}  status")
    for r in rows:
        value = f"{r['value']:.4f}" if isinstance(r["value"], (int, float)) else "-"
        flags = " ".join(f for f in ("latest", "best") if r[f])
        if r["other_lineage"]:
            flags += " other lineage (not counted; `dtrain ckpt prune` removes it)"
        status = "complete" if r["complete"] else f"DAMAGED: {r['problem']}"
        print(f"{r['name']:<16} {_or_unknown(r['step']):>8} {_or_unknown(r['epoch']):>5} {value:>14} "
              f"{human_size(r['bytes']):>10}  {status} {flags}".rstrip())
    if other_steps:
        print(f"{len(other_steps)} checkpoint(s) belong to another lineage: they were saved after the checkpoint a "
              f"later run resumed from, and latest does not descend from them")


def ckpt_verify(args) -> int:
    check = verify_checkpoint(Path(args.path), checksums=True)
    if check.ok:
        print(f"{args.path}: complete ({human_size(check.bytes)}, every sha256 matches)")
        return 0
    print(f"{args.path}: NOT a complete checkpoint: {check.reason}")
    return 1


# ------------------------------------------------------------------------------------------- show

def describe_checkpoint(path: Path, checksums: bool = False) -> dict[str, Any]:
    """Everything `ckpt show` reports about one checkpoint, as plain data."""
    check = verify_checkpoint(path, checksums=checksums)
    state = _trainer_state_or_empty(path)
    step = state.get("global_step", parse_step(path.name))
    checkpoints_dir = path.parent
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    # The run's own log holds the training loss at this step too; a checkpoint stores only the last eval.
    logged = [r for r in read_records(checkpoints_dir.parent / "metrics.jsonl")
              if r.get("step") == step and "event" not in r]
    metrics = {k: v for r in logged for k, v in r.items() if k not in ("step", "epoch", "kind")}
    if state.get("last_eval_step") == step:
        metrics = {**state.get("last_eval", {}), **metrics}
    return {
        "path": str(path), "complete": check.ok, "problem": check.reason or None,
        "checksums_checked": checksums, "latest": read_pointer(checkpoints_dir, LATEST) == path.name,
        "best": read_pointer(checkpoints_dir, BEST) == path.name,
        "step": step, "epoch": state.get("epoch"), "step_in_epoch": state.get("step_in_epoch"),
        "samples_seen": state.get("samples_seen"), "checkpoint_metric": state.get("checkpoint_metric"),
        "parent": state.get("parent"), "run_id": state.get("run_id"),
        "metrics": metrics, "task": state.get("task"),
        "written_by": {"world_size": state.get("world_size"), "device": state.get("device"),
                       "mixed_precision": state.get("mixed_precision"),
                       "save": "async" if state.get("async") else "sync",
                       "created": manifest.get("created") or state.get("created")},
        "files": files, "manifest_files": sorted(manifest.get("files", {})),
        "config": state.get("config"),
    }


def ckpt_show(args) -> None:
    info = describe_checkpoint(select_checkpoint(args.path, args.which, verify=False, prefer="latest"), args.checksums)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return
    pointers = ", ".join(p for p in ("latest", "best") if info[p])
    print(f"checkpoint  {info['path']}" + (f"  ({pointers})" if pointers else ""))
    status = ("complete" + (" (every sha256 matches)" if info["checksums_checked"] else " (sizes match the manifest)")
              if info["complete"] else f"NOT complete: {info['problem']}")
    print(f"status      {status}")
    print(f"progress    step {info['step']}, epoch {info['epoch']} (step {info['step_in_epoch']} of the epoch), "
          f"{info['samples_seen']} samples seen; task {info['task']}")
    if info["run_id"] is not None:  # recorded since dtrain follows lineages
        print(f"lineage     run {info['run_id']}, " + (f"resumed from {info['parent']}" if info["parent"]
                                                        else "a fresh start"))
    metric = info["checkpoint_metric"] or {}
    if metric.get("value") is not None:
        print(f"monitored   {metric.get('name')} = {metric['value']:.6g}")
    if info["metrics"]:
        print("metrics     " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(info["metrics"].items())))
    w = info["written_by"]
    print(f"written by  {w['world_size']} process(es) on {w['device']}, mixed precision {w['mixed_precision']}, "
          f"{w['save']} save, {w['created']}")
    print("files")
    for name, size in info["files"].items():
        note = "" if name in info["manifest_files"] or name == MANIFEST else "  (not in the manifest)"
        print(f"  {name:<32} {human_size(size):>10}{note}")
    print(f"  {'total':<32} {human_size(sum(info['files'].values())):>10}")
    if info["config"]:
        print("config")
        print("  " + yaml.safe_dump(info["config"], sort_keys=False).rstrip().replace("\n", "\n  "))


# ------------------------------------------------------------------------------------------- prune

def plan_prune(checkpoints_dir: Path, policy: RetentionPolicy, monitor: str) -> tuple[list[int], set[int]]:
    """Steps to delete (oldest first) and the protected steps: the pure policy training uses, applied as training
    applies it to the lineage of `latest`, plus every checkpoint of another lineage."""
    lineage, others = current_lineage(checkpoints_dir, monitor)
    protected = {parse_step(name) for name in (read_pointer(checkpoints_dir, LATEST), read_pointer(checkpoints_dir, BEST))
                 if name is not None}
    other_steps = [r.step for r in others if r.step not in protected]
    return sorted(checkpoints_to_delete(lineage, policy, protected) + other_steps), protected


def ckpt_prune(args) -> None:
    checkpoints_dir = checkpoints_dir_of(args.output_dir)
    monitor, mode = _run_monitor(checkpoints_dir)
    monitor, mode = args.monitor or monitor, args.mode or mode
    policy = RetentionPolicy(args.keep_last or 0, args.keep_best or 0, args.keep_every_steps or 0, mode)
    doomed, protected = plan_prune(checkpoints_dir, policy, monitor)
    other_lineages = [r.step for r in current_lineage(checkpoints_dir)[1] if r.step in doomed]
    if not policy.enabled and not other_lineages:
        raise UsageError("ckpt prune needs a rule: --keep-last N, --keep-best K and/or --keep-every-steps M "
                         "(each an integer >= 1); without one it removes only checkpoints of other lineages, "
                         f"and {checkpoints_dir} has none")
    if any(p.name.startswith(".tmp-") for p in checkpoints_dir.iterdir()):
        print(f"warning: {checkpoints_dir} holds a .tmp- folder: a run may be saving right now")
    kept = [p.name for p in step_dirs(checkpoints_dir) if parse_step(p.name) not in doomed]
    print(f"keeping {len(kept)}: {', '.join(kept) or '-'} (latest and best are always kept; best by {monitor}, {mode})")
    if other_lineages:
        print(f"other lineages: {', '.join(step_dir_name(s) for s in other_lineages)} (saved after the checkpoint "
              f"a later run resumed from; latest does not descend from them)")
    if not doomed:
        print("nothing to delete")
        return
    for step in doomed:
        name = step_dir_name(step)
        if args.dry_run:
            print(f"would delete {name}")
            continue
        remove_tree(checkpoints_dir / name)
        print(f"deleted {name}")
    if args.dry_run:
        print(f"dry run: {len(doomed)} checkpoint(s) would be deleted; nothing was deleted")


def _run_monitor(checkpoints_dir: Path) -> tuple[str, str]:
    """The monitor and mode the run trained with (from its newest checkpoint's config)."""
    for path in reversed(step_dirs(checkpoints_dir)):
        config = _trainer_state_or_empty(path).get("config") or {}
        evaluation = config.get("eval") or {}
        if evaluation.get("monitor"):
            return evaluation["monitor"], evaluation.get("mode", "min")
    return "val_loss", "min"



# ------------------------------------------------------------------------------------------- helpers

def _trainer_state_or_empty(path: Path) -> dict[str, Any]:
    try:
        return read_trainer_state(path)
    except (OSError, ValueError):
        return {}


def _or_unknown(value: Any) -> Any:
    return "?" if value is None else value


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
