"""`dtrain ckpt list|verify|show|prune`: inspecting and pruning a run's checkpoints (no torch needed).

Each command takes a run's output dir, its checkpoints dir, or an object store URI (`s3://bucket/prefix`, the
`--checkpoint-dir` of the run); `verify`, `show` and `export` also take one checkpoint (`.../step_000000120`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from dtrain.checkpoint.documents import loads, read_local
from dtrain.checkpoint.layout import BEST, LATEST, MANIFEST, TRAINER_STATE, parse_step, step_dir_name
from dtrain.checkpoint.location import (is_uri, local_path, split_checkpoint_uri, storage_and_name,
                                        storage_of_run)
from dtrain.checkpoint.names import name_problem, regular_files
from dtrain.checkpoint.records import current_lineage
from dtrain.checkpoint.resolve import select_checkpoint
from dtrain.checkpoint.retention import RetentionPolicy, checkpoints_to_delete
from dtrain.checkpoint.sharded import SHARDED_MODEL_DIR
from dtrain.checkpoint.storage import CheckpointLocation, CheckpointStorage
from dtrain.errors import UsageError
from dtrain.utils import human_size
from dtrain.training.metrics import read_records


@contextlib.contextmanager
def local_copy(location: CheckpointLocation,
               files: tuple[str, ...] = ("model.safetensors", TRAINER_STATE, f"{SHARDED_MODEL_DIR}/")
               ) -> Iterator[Path]:
    """A checkpoint as a local directory: a directory as it is; an object-store checkpoint's `files` (a name
    ending in / : every file below it) downloaded to a temporary directory (checked against its manifest) for as long as the
    block runs. By default the model's weights, whole or sharded, and the trainer state."""
    if not (isinstance(location, str) and is_uri(location)):
        yield local_path(location)
        return
    store, name = split_checkpoint_uri(location)
    with tempfile.TemporaryDirectory(prefix="dtrain-ckpt-") as temp:
        try:
            yield store.download(name, Path(temp) / name, want=lambda file: any(file == f or (f.endswith("/") and file.startswith(f)) for f in files))
        except (OSError, ValueError) as exc:  # ValueError: a manifest replaced by an unusable one since verify
            raise UsageError(f"cannot download {location}: {exc}") from None


# ------------------------------------------------------------------------------------------- list, verify

def ckpt_list(args) -> None:
    storage = storage_of_run(args.output_dir)
    latest, best = storage.read_pointer(LATEST), storage.read_pointer(BEST)
    _, others = current_lineage(storage)
    other_steps = {r.step for r in others}
    rows = []
    for name in storage.step_names():
        check = storage.verify(name, checksums=args.checksums)
        state = _trainer_state_or_empty(storage, name)
        metric = state.get("checkpoint_metric") or {}
        rows.append({"name": name, "step": state.get("global_step"), "epoch": state.get("epoch"),
                     "metric": metric.get("name"), "value": metric.get("value"), "bytes": check.bytes,
                     "complete": check.ok, "problem": check.reason or None,
                     "latest": name == latest, "best": name == best,
                     "parent": state.get("parent"), "other_lineage": parse_step(name) in other_steps,
                     "tier": "persistent"})
    local = _local_rows(args.local_checkpoint_dir, args.checksums) if getattr(args, "local_checkpoint_dir", None) \
        else []
    if args.json:
        rows += local
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print(f"no checkpoints in {storage.url()}")
        if not local:
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
    print("checked: every file's checksum" if args.checksums else
          "checked: every file's size (--checksums reads every byte and compares checksums)")
    if other_steps:
        print(f"{len(other_steps)} checkpoint(s) belong to another lineage: they were saved after the checkpoint a "
              f"later run resumed from, and latest does not descend from them")
    for r in local:
        status = "complete" if r["complete"] else f"DAMAGED: {r['problem']}"
        print(f"local {r['node']}/{r['name']:<16} {_or_unknown(r['step']):>8} {human_size(r['bytes']):>10}  {status}"
              f"{' latest' if r['latest'] else ''}  ({r['dir']})")


def _local_rows(template: str, checksums: bool) -> list[dict[str, Any]]:
    """The checkpoints of a node-local tier: `node_{i}/step_N` for each node it keeps (its own, its peers')."""
    from dtrain.checkpoint.layout import read_pointer, step_dirs, verify_checkpoint

    pattern = template.replace("{node_rank}", "*").replace("{rank}", "*")
    rows = []
    for base in sorted(Path(p) for p in glob.glob(pattern)):
        for node in sorted(base.glob("node_*")):
            latest = read_pointer(node, LATEST)
            for path in step_dirs(node):
                check = verify_checkpoint(path, checksums)
                rows.append({"tier": "local", "dir": str(base), "node": node.name, "name": path.name,
                             "step": parse_step(path.name), "bytes": check.bytes, "complete": check.ok,
                             "problem": check.reason or None, "latest": path.name == latest})
    return rows


def ckpt_verify(args) -> int:
    storage, name = storage_and_name(args.path)
    check = storage.verify(name, checksums=True)
    if check.ok:
        print(f"{args.path}: complete ({human_size(check.bytes)}, every checksum matches)")
        return 0
    print(f"{args.path}: NOT a complete checkpoint: {check.reason}")
    return 1


# ------------------------------------------------------------------------------------------- show

def describe_checkpoint(path: CheckpointLocation, checksums: bool = False) -> dict[str, Any]:
    """Everything `ckpt show` reports about one checkpoint (a directory or an object-store URI), as plain data."""
    storage, name = storage_and_name(path)
    check = storage.verify(name, checksums=checksums)
    state = _trainer_state_or_empty(storage, name)
    step = state.get("global_step", parse_step(name))
    if storage.is_remote:
        try:
            manifest = storage.read_json(name, MANIFEST)
        except (OSError, ValueError):
            manifest = {}
        files = {file: size for file, size in sorted(storage.object_sizes(name).items())
                 if name_problem(file) is None}  # a key such as step_N/../x is no file of the checkpoint
        logged = []  # the run's metrics.jsonl stays in its local output dir
    else:
        path = local_path(path)
        try:
            manifest = loads(read_local(path / MANIFEST))  # never through a link, never a fifo or device
        except (OSError, ValueError):
            manifest = {}
        # Regular files only, listed without following links (a link to /dev/zero or /etc is never read).
        files = {file: (path / file).lstat().st_size for file in regular_files(path)}
        # The run's own log holds the training loss at this step too; a checkpoint stores only the last eval.
        log = path.parent.parent / "metrics.jsonl"
        logged = [r for r in (read_records(log) if log.is_file() and not log.is_symlink() else [])
                  if isinstance(r, dict) and r.get("step") == step and "event" not in r]
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
        manifest = {}  # garbled: the status line says why (verify)
    metrics = {k: v for r in logged for k, v in r.items() if k not in ("step", "epoch", "kind")}
    if state.get("last_eval_step") == step:
        metrics = {**(state.get("last_eval") or {}), **metrics}
    return {
        "path": str(path), "complete": check.ok, "problem": check.reason or None,
        "checksums_checked": checksums, "latest": storage.read_pointer(LATEST) == name,
        "best": storage.read_pointer(BEST) == name,
        "step": step, "epoch": state.get("epoch"), "step_in_epoch": state.get("step_in_epoch"),
        "samples_seen": state.get("samples_seen"), "checkpoint_metric": state.get("checkpoint_metric"),
        "parent": state.get("parent"), "run_id": state.get("run_id"),
        "metrics": metrics, "task": state.get("task"),
        "written_by": {"world_size": state.get("world_size"), "device": state.get("device"),
                       "mixed_precision": state.get("mixed_precision"), "sharding": state.get("sharding", "none"),
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
    status = ("complete" + (" (every checksum matches)" if info["checksums_checked"] else " (sizes match the manifest)")
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
          f"sharding {w['sharding']}, {w['save']} save, {w['created']}")
    print("files")
    for name, size in info["files"].items():
        note = "" if name in info["manifest_files"] or name == MANIFEST else "  (not in the manifest)"
        print(f"  {name:<32} {human_size(size):>10}{note}")
    print(f"  {'total':<32} {human_size(sum(info['files'].values())):>10}")
    if info["config"]:
        print("config")
        print("  " + yaml.safe_dump(info["config"], sort_keys=False).rstrip().replace("\n", "\n  "))


# ------------------------------------------------------------------------------------------- prune

def plan_prune(storage: CheckpointStorage | Path, policy: RetentionPolicy, monitor: str) -> tuple[list[int], set[int]]:
    """Steps to delete (oldest first) and the protected steps: the pure policy training uses, applied as training
    applies it to the lineage of `latest`, plus every checkpoint of another lineage."""
    storage = storage if hasattr(storage, "step_names") else storage_of_run(storage)
    lineage, others = current_lineage(storage, monitor)
    protected = {parse_step(name) for name in (storage.read_pointer(LATEST), storage.read_pointer(BEST))
                 if name is not None}
    other_steps = [r.step for r in others if r.step not in protected]
    return sorted(checkpoints_to_delete(lineage, policy, protected) + other_steps), protected


def ckpt_prune(args) -> None:
    storage = storage_of_run(args.output_dir)
    monitor, mode = _run_monitor(storage)
    monitor, mode = args.monitor or monitor, args.mode or mode
    policy = RetentionPolicy(args.keep_last or 0, args.keep_best or 0, args.keep_every_steps or 0, mode)
    doomed, protected = plan_prune(storage, policy, monitor)
    other_lineages = [r.step for r in current_lineage(storage)[1] if r.step in doomed]
    if not policy.enabled and not other_lineages:
        raise UsageError("ckpt prune needs a rule: --keep-last N, --keep-best K and/or --keep-every-steps M "
                         "(each an integer >= 1); without one it removes only checkpoints of other lineages, "
                         f"and {storage.url()} has none")
    if not storage.is_remote and any(p.name.startswith(".tmp-") for p in storage.dir.iterdir()):
        print(f"warning: {storage.url()} holds a .tmp- folder: a run may be saving right now")
    kept = [name for name in storage.step_names() if parse_step(name) not in doomed]
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
        storage.delete(name)  # in an object store, the manifest first
        print(f"deleted {name}")
    if args.dry_run:
        print(f"dry run: {len(doomed)} checkpoint(s) would be deleted; nothing was deleted")


def _run_monitor(storage: CheckpointStorage) -> tuple[str, str]:
    """The monitor and mode the run trained with (from its newest checkpoint's config)."""
    for name in reversed(storage.step_names()):
        config = _trainer_state_or_empty(storage, name).get("config") or {}
        evaluation = config.get("eval")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("monitor"), str) and evaluation["monitor"]:
            mode = evaluation.get("mode", "min")
            return evaluation["monitor"], mode if mode in ("min", "max") else "min"
    return "val_loss", "min"



# ------------------------------------------------------------------------------------------- helpers

def _trainer_state_or_empty(storage: CheckpointStorage, name: str) -> dict[str, Any]:
    try:
        return storage.read_trainer_state(name)
    except (OSError, ValueError):
        return {}


def _or_unknown(value: Any) -> Any:
    return "?" if value is None else value


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
