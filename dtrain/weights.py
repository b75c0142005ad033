"""Model weights in safetensors files, with shared (tied) tensors handled the way safetensors and Accelerate do.

A model may hold one tensor under several names: a language model whose output layer reuses the token embedding
(`lm_head.weight is transformer.wte.weight`) is the usual case. safetensors cannot store aliases, so
`Accelerator.save_state` (like `safetensors.torch.save_model` and transformers' `save_pretrained`) writes each
shared tensor once, under one of its names, and drops the others. A file therefore fits a model when every
tensor of the model is in it under one of its names, not when the names match one for one; and loading it
must write through the saved name into the shared tensor, so the model's ties stay intact.

Tensors are grouped by storage as Accelerate groups them when it saves (device, storage address, storage size),
so what counts as "one tensor" here is exactly what a checkpoint writes once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from dtrain.errors import UsageError

Shape = tuple[int, ...]

# The dtypes an export may cast floating weights to (`dtrain ckpt export --dtype`).
EXPORT_DTYPES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str) -> torch.dtype:
    """One of EXPORT_DTYPES as a torch dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def shared_groups(state_dict: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names that refer to one storage (two or more each), in state_dict order: the first is the name
    `Accelerator.save_state` keeps."""
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        if hasattr(tensor, "to_local"):  # a DTensor (sharded): its shard on this rank is what may be shared
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        if storage.data_ptr() == 0 or storage.nbytes() == 0:
            continue  # empty tensors share the null address without sharing anything
        by_storage.setdefault((tensor.device, storage.data_ptr(), storage.nbytes()), []).append(name)
    return [names for names in by_storage.values() if len(names) > 1]


@dataclass
class WeightsFit:
    """How the tensors of a weights file compare with a model's, aliases taken into account."""

    mismatched: list[str] = field(default_factory=list)  # "name: file (a, b) vs model (c, d)"
    missing: list[str] = field(default_factory=list)  # model tensors the file has under none of their names
    unexpected: list[str] = field(default_factory=list)  # file names the model does not have
    duplicated: list[list[str]] = field(default_factory=list)  # one shared model tensor stored under several names
    aliased: dict[str, str] = field(default_factory=dict)  # model name not in the file -> the file's name for it

    def problems(self) -> list[str]:
        return (self.mismatched + [f"{name}: missing in the checkpoint" for name in self.missing]
                + [f"{name}: not in the model" for name in self.unexpected])


def compare(saved: Mapping[str, Shape], model: nn.Module) -> WeightsFit:
    """Compares a file's tensor names and shapes (`saved`) with the model's, counting tied names as one."""
    state = model.state_dict()
    alias_of = {name: group for group in shared_groups(state) for name in group}
    fit = WeightsFit()
    for name, tensor in state.items():
        if name in saved:
            if tuple(saved[name]) != tuple(tensor.shape):
                fit.mismatched.append(f"{name}: checkpoint {tuple(saved[name])} vs model {tuple(tensor.shape)}")
            continue
        stored_as = [alias for alias in alias_of.get(name, ()) if alias in saved]
        if stored_as:
            fit.aliased[name] = stored_as[0]
        else:
            fit.missing.append(name)
    fit.unexpected = [name for name in saved if name not in state]
    for group in shared_groups(state):
        present = [name for name in group if name in saved]
        if len(present) > 1:
            fit.duplicated.append(present)
    return fit


def saved_shapes(path: str | Path) -> dict[str, Shape]:
    """Names and shapes of a safetensors file's tensors, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def check_fits(path: str | Path, model: nn.Module) -> WeightsFit:
    """Raises UsageError naming the first real mismatches (shape, missing, unexpected) between a safetensors
    file and a model; a tied name the file stores under another of its names is not one."""
    fit = compare(saved_shapes(path), model)
    problems = fit.problems()
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"{path} does not fit the model: {'; '.join(problems[:3])}{more}")
    return fit


def load_weights(model: nn.Module, path: str | Path) -> WeightsFit:
    """Loads a safetensors file into `model` with its ties intact (`safetensors.torch.load_model` semantics:
    each shared tensor is filled once, through whichever of its names the file holds). Files that hold a
    tied tensor under several names load too. Floating tensors are cast to the model's dtype."""
    from safetensors.torch import load_file

    fit = check_fits(path, model)
    # Not strict: the names check_fits found stored under an alias are "missing" here, and filled all the same,
    # because load_state_dict copies into the model's existing tensors and a tied pair is one tensor.
    model.load_state_dict(load_file(str(path)), strict=False)
    return fit


def tied_names(model: nn.Module) -> list[list[str]]:
    """Names of the model's state that are one parameter or buffer registered under several names, in
    state_dict order (the first is the one a checkpoint keeps). Read from the module tree itself, so it holds
    for sharded models too (FSDP2 keeps a tied parameter one DTensor)."""
    by_object: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        by_object.setdefault(id(value), []).append(name)
    return [names for names in by_object.values() if len(names) > 1]


def without_aliases(state: dict[str, torch.Tensor], tied: list[list[str]]) -> dict[str, torch.Tensor]:
    """`state` with each tied tensor kept once, under the first of its names that `state` holds."""
    state = dict(state)
    for group in tied:
        present = [name for name in group if name in state]
        for alias in present[1:]:
            del state[alias]
    return state


def with_aliases(state: dict[str, torch.Tensor], tied: list[list[str]]) -> dict[str, torch.Tensor]:
    """`state` with every name of a tied tensor filled from the one name `state` holds it under."""
    state = dict(state)
    for group in tied:
        present = next((name for name in group if name in state), None)
        for alias in group:
            if present is not None and alias not in state:
                state[alias] = state[present]
    return state
