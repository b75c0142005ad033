"""Resuming across a change of sharding: a sharded (DCP) checkpoint in an unsharded run, a full-state one in a
sharded run.

Accelerate's `load_state` reads the layout of the run it is called in: `pytorch_model_fsdp_0/` and `optimizer_0/`
under FSDP, `model.safetensors` and `optimizer.bin` otherwise. `run_layout` gives it that layout: each rank
builds, on its own and without a collective, a temporary view of the checkpoint in which the model and optimizer
are rewritten in the run's layout and every other file (scheduler, RNG, registered objects, trainer state) is a
link to the original. The optimizer state changes keys on the way: a full-state `optimizer.bin` numbers
parameters in the optimizer's order, a sharded one names them (torch.distributed.checkpoint.state_dict); both
orders come from the live model and optimizer, which are built as the saving run built them.

A view needs temporary space for the whole model and optimizer state on every rank, once, at resume.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dtrain.checkpoint.sharded import SHARDED_DIRS, SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR, full_state, \
    is_local_sharded, is_sharded
from dtrain.errors import UsageError

FULL_MODEL_FILE = "model.safetensors"
FULL_OPTIMIZER_FILE = "optimizer.bin"
REWRITTEN = {*SHARDED_DIRS, FULL_MODEL_FILE, FULL_OPTIMIZER_FILE, "pytorch_model.bin"}


@contextlib.contextmanager
def run_layout(checkpoint: Path, sharded_run: bool, model, optimizer) -> Iterator[Path]:
    """The checkpoint in the layout of this run: itself when it already is; else a temporary view (see above).
    `model`, `optimizer`: the unwrapped model and the torch optimizer of this run."""
    checkpoint = Path(checkpoint)
    if is_sharded(checkpoint) == sharded_run or is_local_sharded(checkpoint):  # a node's shards: as they are
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="dtrain-convert-") as temp:
        view = Path(temp) / checkpoint.name
        view.mkdir()
        for entry in checkpoint.iterdir():
            if entry.name not in REWRITTEN:
                (view / entry.name).symlink_to(entry.resolve())
        try:
            if sharded_run:
                _write_sharded(checkpoint, view, model, optimizer)
            else:
                _write_full(checkpoint, view, model, optimizer)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UsageError(f"--resume: {checkpoint.name} cannot be converted to this run's sharding "
                             f"({'fsdp2' if sharded_run else 'none'}): {exc}") from None
        yield view


def _write_full(checkpoint: Path, view: Path, model, optimizer) -> None:
    """A sharded checkpoint's model and optimizer, gathered into `model.safetensors` and `optimizer.bin`."""
    import torch
    from safetensors.torch import save_file

    from dtrain.weights import tied_names, without_aliases

    weights = without_aliases(full_state(checkpoint / SHARDED_MODEL_DIR)["model"], tied_names(model))
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(view / FULL_MODEL_FILE),
              metadata={"format": "pt"})
    if (checkpoint / SHARDED_OPTIMIZER_DIR).is_dir():
        by_name = full_state(checkpoint / SHARDED_OPTIMIZER_DIR)["optimizer"]
        torch.save(optimizer_by_index(by_name, model, optimizer), view / FULL_OPTIMIZER_FILE)


def _write_sharded(checkpoint: Path, view: Path, model, optimizer) -> None:
    """A full-state checkpoint's model and optimizer as one-chunk DCP directories, which DCP's load splits into
    this run's shards."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from dtrain.weights import tied_names, with_aliases

    weights = with_aliases(load_file(str(checkpoint / FULL_MODEL_FILE)), tied_names(model))
    dcp.save({"model": weights}, checkpoint_id=str(view / SHARDED_MODEL_DIR), no_dist=True)
    if (checkpoint / FULL_OPTIMIZER_FILE).is_file():
        by_index = torch.load(checkpoint / FULL_OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        dcp.save({"optimizer": optimizer_by_name(by_index, model, optimizer)},
                 checkpoint_id=str(view / SHARDED_OPTIMIZER_DIR), no_dist=True)


def _parameter_names(model, optimizer) -> list[list[str]]:
    """For each parameter in the optimizer's order, every name the model has for it."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    ordered = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if id(parameter) not in names:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            ordered.append(names[id(parameter)])
    return ordered


def optimizer_by_index(by_name: dict[str, Any], model, optimizer) -> dict[str, Any]:
    """A named optimizer state (as DCP saves it) as `optimizer.load_state_dict` takes it."""
    names = _parameter_names(model, optimizer)
    index_of = {name: index for index, aliases in enumerate(names) for name in aliases}
    state = {}
    for name, value in by_name.get("state", {}).items():
        if name not in index_of:
            raise KeyError(f"the checkpoint's optimizer has state for {name!r}, which this model does not have")
        state[index_of[name]] = value
    groups = []
    for saved, live in zip(by_name.get("param_groups", []), optimizer.state_dict()["param_groups"], strict=True):
        groups.append({**saved, "params": list(live["params"])})
    return {"state": state, "param_groups": groups}


def optimizer_by_name(by_index: dict[str, Any], model, optimizer) -> dict[str, Any]:
    """An `optimizer.state_dict()` as DCP's sharded optimizer state names it (the first name of each parameter)."""
    names = [aliases[0] for aliases in _parameter_names(model, optimizer)]
    if len(by_index.get("param_groups", [])) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(by_index.get('param_groups', []))} parameter "
                         f"groups, this run's {len(optimizer.param_groups)}")
    state = {names[int(index)]: value for index, value in by_index.get("state", {}).items()}
    groups = [{**group, "params": [names[int(index)] for index in group["params"]]}
              for group in by_index["param_groups"]]
    return {"state": state, "param_groups": groups}
