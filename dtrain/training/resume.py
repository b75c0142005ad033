"""Checks before resuming (task, model shape, config drift, data fingerprint) and the `Resume with:` command."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from dtrain.checkpoint.adapters import is_adapter_model, trainable_names
from dtrain.checkpoint.sharded import SHARDED_MODEL_DIR, is_sharded, model_weights_file
from dtrain.config import Config
from dtrain.errors import UsageError
from dtrain.redact import redact_values

logger = get_logger(__name__)

# Fields whose change only matters for what comes next, never for loading: no warning needed.
IGNORED_FIELDS = {"resume", "overwrite", "output_dir", "checkpoint_dir", "verify_checksums", "allow_config_change",
                  "quick", "strict_resume", "allow_inexact_resume", "async_save", "signal_grace_seconds",
                  "agree_every_steps", "log_with", "num_workers", "device", "max_time", "local_checkpoint_dir",
                  "local_save_every_steps", "local_save_every_seconds", "local_replicas"}  # where and how long


def check_compatible(saved: dict[str, Any], task, config: Config, model, path: Path) -> None:
    """Raises UsageError for a checkpoint that cannot be loaded; warns about changes that can."""
    if saved.get("task") not in (None, task.name):
        raise UsageError(f"--resume: {path} was written by task {saved.get('task')!r}, this run trains {task.name!r}")
    _check_same_base(saved, task, path)
    shape_changes = _differences(saved.get("shape") or {}, task.shape)
    if shape_changes and not config.checkpoint.allow_config_change:
        raise UsageError(f"--resume: the model shape changed since {path.name} ({'; '.join(shape_changes)}); "
                         f"set them back, or pass --allow-config-change")
    _check_same_sharding(saved, config, path)
    check_tensors_fit(path, model)
    old_config = saved.get("config")
    if isinstance(old_config, dict):
        old_flat = _flatten(old_config)
        now = redact_values(config.flat())  # the checkpoint recorded its config with credentials masked
        changes = [c for c in _differences(old_flat, now) if c.split(":")[0] not in IGNORED_FIELDS]
        if changes:
            logger.warning(f"config changed since {path.name}: {'; '.join(changes)}")
    if saved.get("fingerprint") and saved["fingerprint"] != task.fingerprint:
        logger.warning(f"the training data changed since {path.name}: {saved['fingerprint']} -> {task.fingerprint}")


def _check_same_base(saved: dict[str, Any], task, path: Path) -> None:
    """A PEFT checkpoint holds only the adapter: it continues only on the frozen base it was trained on."""
    before, now = (saved.get("shape") or {}).get("frozen_base"), task.shape.get("frozen_base")
    if before != now and (before or now):
        if not before or not now:
            what = "an adapter on a frozen base" if before else "the whole model"
            raise UsageError(f"--resume: {path.name} holds {what} and this run trains "
                             f"{'the whole model' if before else 'an adapter on a frozen base'}; resume it as it "
                             f"was trained (--peft)")
        raise UsageError(f"--resume: the frozen base model changed since {path.name} (its fingerprint was "
                         f"{before}, the base this run built has {now}); resume with the --model it was trained "
                         f"on")


def _check_same_sharding(saved: dict[str, Any], config: Config, path: Path) -> None:
    """A sharded checkpoint holds each rank's shards (torch.distributed.checkpoint), a full-state one whole
    tensors: across a change, the checkpoint is converted on load (checkpoint/convert.py); said once."""
    written = saved.get("sharding") or ("fsdp2" if is_sharded(path) else "none")
    now = config.train.sharding or "none"
    if written != now:
        logger.warning(f"{path.name} was written with sharding {written!r} and this run uses {now!r}: its model and "
                       f"optimizer state are converted as they load; the run is correct but not bit-identical "
                       f"to an uninterrupted one")


def check_tensors_fit(path: Path, model, weights: Path | None = None) -> None:
    """Compares the saved weights' names and shapes with the model's (tied names count as one tensor), naming
    the first real mismatches."""
    from dtrain.weights import check_fits

    weights = weights or path / "model.safetensors"
    if not weights.exists():
        return  # sharded (FSDP) layouts are checked by Accelerate itself
    if is_adapter_model(model):
        _check_adapter_fits(weights, model)
        return
    fit = check_fits(weights, model)
    if fit.duplicated:
        # Accelerate's load_state (safetensors' load_model, strict) refuses a tied tensor saved twice.
        names = "; ".join(" and ".join(group) for group in fit.duplicated)
        raise UsageError(f"{weights} holds tied tensors under several names ({names}), which Accelerate's "
                         f"load_state refuses (an --async-save checkpoint of an older dtrain); start from its "
                         f"weights with --init-from {path} instead")


def _check_adapter_fits(weights: Path, model) -> None:
    """A PEFT checkpoint must hold every trainable tensor of the model, with its shape (it is loaded not
    strictly: a missing one would silently start from scratch). Frozen tensors in it (a checkpoint written by
    Accelerate's own save_state) load onto the base they were checked to be."""
    from dtrain.weights import saved_shapes

    saved, state = saved_shapes(weights), model.state_dict()
    problems = [f"{name}: missing in the checkpoint" for name in sorted(trainable_names(model) - saved.keys())]
    problems += [f"{name}: not in the model" for name in saved if name not in state]
    problems += [f"{name}: checkpoint {shape} vs model {tuple(state[name].shape)}" for name, shape in saved.items()
                 if name in state and tuple(shape) != tuple(state[name].shape)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"{weights} does not fit the model's adapter: {'; '.join(problems[:3])}{more}")


def load_initial_weights(model, source: str) -> None:
    """`--init-from`: a fresh run that starts from another run's weights (optimizer and steps start anew)."""
    from dtrain.weights import load_weights

    path = Path(source)
    if path.is_dir() and is_sharded(path):
        with model_weights_file(path) as weights:  # every rank gathers the shards itself: no collective needed
            load_weights(model, weights)
        return
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise UsageError(f"invalid value for init_from: {source!r}; accepted: a checkpoint directory "
                         f"holding model.safetensors or sharded {SHARDED_MODEL_DIR}/, or a .safetensors file")
    load_weights(model, weights)


def _flatten(config_dict: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in config_dict.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def resume_command(output_dir: str) -> str:
    """The command that started this run, with `--resume latest` (and the output dir made explicit)."""
    argv = launch_argv()
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--resume", "--output-dir"):
            skip = True
            continue
        if arg.startswith(("--resume=", "--output-dir=")) or arg in ("--overwrite", "--no-overwrite"):
            continue
        args.append(arg)
    return shlex.join([argv[0], *args, "--output-dir", output_dir, "--resume", "latest"])


def launch_argv() -> list[str]:
    """argv of the launcher (accelerate launch / torchrun) when there is one, else of this process."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            parent = [a.decode() for a in raw.split(b"\0") if a]
            for i, arg in enumerate(parent[:2]):
                if os.path.basename(arg) in ("accelerate", "torchrun"):
                    return [os.path.basename(arg), *parent[i + 1:]]
            modules = {"torch.distributed.run": ["torchrun"], "accelerate.commands.launch": ["accelerate", "launch"]}
            if len(parent) > 2 and parent[1] == "-m" and parent[2] in modules:
                return [*modules[parent[2]], *parent[3:]]
        except OSError:
            pass
    if os.path.basename(sys.argv[0]) == "dtrain":
        return ["dtrain", *sys.argv[1:]]
    return ["python", *sys.argv]
