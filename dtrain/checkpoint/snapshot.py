"""A host-memory copy of what `Accelerator.save_state` writes, for saving in the background.

Taking the snapshot is the only part of an `--async-save` checkpoint that holds the training loop. Writing it
produces the same files, with the same names and formats, as `save_state` (safetensors weights, torch.save'd
optimizer/scheduler/scaler state, `custom_checkpoint_{i}.pkl` for each object registered with
`register_for_checkpointing`, one `random_states_{rank}.pkl` per rank), so `Accelerator.load_state` loads it.
Under sharding (FSDP2) each rank's snapshot holds its own shards of the model and optimizer state instead, staged
to host memory by torch.distributed.checkpoint's stager and written as the DCP directories `save_state` writes
(`pytorch_model_fsdp_{i}/`, `optimizer_{i}/`), by every rank, over the process group it is given.
A PEFT model (a frozen base with an adapter) is listed with its trainable tensors only (adapters.py), in
`model.safetensors` under the same names, or under FSDP2 in its DCP directory without the frozen parameters.
A synchronous save uses the same listing without the copy (`take_snapshot(accelerator, None)`: references to the
live state, which nothing changes while the loop waits), so both write through the one-pass writer.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import clean_state_dict_for_safetensors

from dtrain import compat
from dtrain.checkpoint.adapters import is_adapter_model, only_trainable
from dtrain.checkpoint.names import regular_files
from dtrain.checkpoint.sharded import SHARDED_MODEL_PREFIX, SHARDED_OPTIMIZER_PREFIX, local_shards_dir
from dtrain.checkpoint.writer import SAFETENSORS, TORCH, FileDigest, write_files
from dtrain.checksum import DEFAULT_CHECKSUM
from dtrain.rng import ProcessRNG


def _numbered(name: str, ext: str, index: int) -> str:
    return f"{name}.{ext}" if index == 0 else f"{name}_{index}.{ext}"


class HostCopier:
    """Copies tensors to host memory, into buffers reused between snapshots (pinned ones for GPU tensors).

    Tensors that share a storage (tied weights: `lm_head.weight is transformer.wte.weight`) share one host
    storage in the copy, with their own offsets and strides: aliases stay aliases, so the safetensors write
    drops the same names as `save_state` does (Accelerate keeps the first name of each storage) and
    `torch.save` keeps the same sharing in the optimizer state.
    """

    def __init__(self):
        self._storages: dict[tuple, torch.Tensor] = {}  # host bytes, by the key of the first tensor on them
        self._pending_cuda = False
        # Storages whose copy may wait until `copy_deferred` (see take_snapshot(defer=True)), and those copies.
        self.defer_storages: set[int] = set()
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ready: torch.cuda.Event | None = None  # the GPU work that produced the deferred sources
        self._stream: torch.cuda.Stream | None = None
        self._shard_stager = None  # DCP's stager for sharded state (DTensors), made at the first sharded copy

    def copy_shards(self, state: dict) -> dict:
        """A host copy of a sharded state dict (DTensors: this rank's shards), into buffers reused between
        snapshots (torch.distributed.checkpoint's own stager; pinned memory for GPU tensors)."""
        if self._shard_stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            on_gpu = torch.cuda.is_available()
            self._shard_stager = DefaultStager(StagingOptions(use_pinned_memory=on_gpu, use_shared_memory=False,
                                                              use_async_staging=False, use_non_blocking_copy=on_gpu))
        return self._shard_stager.stage(state)

    def copy(self, value: Any, key: tuple = ()) -> Any:
        """A host copy of `value` (tensors, possibly nested in dicts, lists and tuples; other values as they are)."""
        return self._copy(value, key, {})

    def _copy(self, value: Any, key: tuple, copied: dict[tuple, tuple]) -> Any:
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            return value.detach().to("cpu", copy=True)  # sparse tensors have no storage to share
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value.detach(), key, copied)
        if isinstance(value, dict):
            items = {k: self._copy(v, (*key, k), copied) for k, v in value.items()}
            # A model's state_dict stays an OrderedDict: Accelerate's `save` drops aliased names only from those.
            return OrderedDict(items) if isinstance(value, OrderedDict) else items
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, (*key, i), copied) for i, v in enumerate(value))
        return value

    def _copy_tensor(self, tensor: torch.Tensor, key: tuple, copied: dict[tuple, tuple]) -> torch.Tensor:
        on_gpu = tensor.device.type != "cpu"
        storage = tensor.untyped_storage()
        storage_id = (tensor.device, storage.data_ptr(), storage.nbytes())
        layout = (tensor.dtype, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if storage.data_ptr() == 0 or storage.nbytes() == 0:
            storage_id = ("unshared", key)  # empty tensors all sit at the null address without sharing it
        if storage_id in copied:
            host_bytes, views = copied[storage_id]
            if layout in views:
                return views[layout]  # the same tensor under another name: one copy, one host tensor
        else:
            host_bytes, views = self._host_bytes(key, storage.nbytes(), on_gpu), {}
            copied[storage_id] = (host_bytes, views)
        view = torch.empty(0, dtype=tensor.dtype).set_(host_bytes.untyped_storage(), tensor.storage_offset(),
                                                       tensor.shape, tensor.stride())
        if storage.data_ptr() in self.defer_storages:  # copied by copy_deferred, during the next step
            self._deferred.append((view, tensor))
        else:
            view.copy_(tensor, non_blocking=on_gpu)
            self._pending_cuda |= on_gpu
        views[layout] = view
        return view

    def _host_bytes(self, key: tuple, nbytes: int, pinned: bool) -> torch.Tensor:
        # Buffers are reused from one snapshot to the next (allocation is much of a copy's cost); safe
        # because a new save first waits until the previous one is written.
        buffer = self._storages.get(key)
        if buffer is None or buffer.numel() != nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pinned)
            self._storages[key] = buffer
        return buffer

    def finish(self) -> None:
        if self._pending_cuda:
            torch.cuda.synchronize()
            self._pending_cuda = False
        if any(source.is_cuda for _, source in self._deferred):
            self._ready = torch.cuda.Event()
            self._ready.record()  # on the training stream, after the step that produced the sources

    def copy_deferred(self) -> None:
        """Makes the copies `copy` left for later and waits for them (GPU ones run on a side stream into pinned
        buffers, so the training stream goes on meanwhile)."""
        deferred, self._deferred = self._deferred, []
        on_gpu = [(buffer, source) for buffer, source in deferred if source.is_cuda]
        for buffer, source in deferred:
            if not source.is_cuda:
                buffer.copy_(source)
        if on_gpu:
            self._stream = self._stream or torch.cuda.Stream()
            self._stream.wait_event(self._ready)
            with torch.cuda.stream(self._stream):
                for buffer, source in on_gpu:
                    buffer.copy_(source, non_blocking=True)
            self._stream.synchronize()


@dataclass
class Snapshot:
    process_index: int
    models: list[dict] = field(default_factory=list)  # main process only
    optimizers: list[dict] = field(default_factory=list)
    schedulers: list[dict] = field(default_factory=list)
    scaler: dict | None = None
    custom: list[Any] = field(default_factory=list)  # states of registered objects (main process only)
    rng: dict[str, Any] = field(default_factory=dict)
    is_main: bool = False
    sharded: dict[str, dict] = field(default_factory=dict)  # DCP directory -> this rank's shards (FSDP2)

    def files(self) -> list[tuple[str, str, Any]]:
        """(name, format, object) of the files `save_state` would write from this process."""
        files = []
        if self.is_main:
            for i, state in enumerate(self.models):
                if isinstance(state, OrderedDict):  # what Accelerate's save does before safetensors
                    state = clean_state_dict_for_safetensors(state)
                files.append((_numbered("model", "safetensors", i), SAFETENSORS, state))
            files += [(_numbered("optimizer", "bin", i), TORCH, state) for i, state in enumerate(self.optimizers)]
            files += [(_numbered("scheduler", "bin", i), TORCH, state) for i, state in enumerate(self.schedulers)]
            # Accelerate's save_custom_state names and format
            files += [(f"custom_checkpoint_{i}.pkl", TORCH, state) for i, state in enumerate(self.custom)]
        if self.scaler is not None:
            files.append(("scaler.pt", TORCH, self.scaler))
        files.append((f"random_states_{self.process_index}.pkl", TORCH, self.rng))
        return files

    def write(self, directory: Path, algorithm: str = DEFAULT_CHECKSUM) -> dict[str, FileDigest]:
        """Writes the files `save_state` would write, from this process, in one pass (hashed while written,
        fsynced); returns their sizes and checksums for the manifest."""
        return write_files(directory, self.files(), algorithm)

    def write_sharded(self, directory: Path, process_group) -> None:
        """Writes this rank's shards into the DCP directories (collective over `process_group`: every rank
        calls it; the files are fsynced, and hashed from the page cache by the manifest)."""
        import torch.distributed.checkpoint as dcp

        for name, state in self.sharded.items():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory / name)), process_group=process_group)

    def write_rank_shards(self, directory: Path) -> list[str]:
        """Writes this rank's shards on their own, with no process group: each DCP directory under
        `shards_rank{R}/`, indexing this rank's chunks only (a node-local checkpoint: no node holds the others').
        Returns the names of the files written, relative to `directory`."""
        import torch.distributed.checkpoint as dcp

        root = Path(directory) / local_shards_dir(self.process_index)
        for name, state in self.sharded.items():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(root / name)), no_dist=True)
        return [f"{root.name}/{name}" for name in regular_files(root)]


class _NoCopy:
    defer_storages: set[int] = set()

    def copy(self, value: Any, key: tuple = ()) -> Any:
        return value

    def copy_shards(self, state: dict) -> dict:
        return state

    def finish(self) -> None:
        pass


def writes_like_save_state(accelerator: Accelerator) -> bool:
    """Whether a snapshot's files are all that `save_state` would write: no sharded state, nothing that only
    `save_state` knows how to save (its pre-hooks, prepared dataloaders, registered objects), and the main
    process alone writes the weights (no `save_on_each_node`)."""
    # Sharded state goes through save_state, except a PEFT model's: save_state would write its frozen base too.
    sharded_adapter = is_fsdp2(accelerator) and any(is_adapter_model(m) for m in compat.prepared_models(accelerator))
    return (supports_snapshot(accelerator) and (not is_fsdp2(accelerator) or sharded_adapter)
            and compat.only_dtrain_writable_state(accelerator)
            and not accelerator.project_configuration.save_on_each_node)


def writes_node_checkpoints(accelerator: Accelerator) -> bool:
    """Whether a snapshot holds everything a node-local checkpoint needs: the state `save_state` writes (registered
    objects included), of a full-state run or of a sharded (FSDP2) one, whose ranks then write their shards on
    their own (`Snapshot.write_rank_shards`)."""
    return (supports_snapshot(accelerator) and compat.snapshot_covers_state(accelerator)
            and not accelerator.project_configuration.save_on_each_node)


def supports_snapshot(accelerator: Accelerator) -> bool:
    """FSDP2 shards are staged and written by DCP; FSDP1, DeepSpeed and Megatron state only by Accelerate's own
    collective code: no background copy."""
    if is_fsdp2(accelerator):
        return True
    return str(accelerator.distributed_type) not in ("DistributedType.FSDP", "DistributedType.DEEPSPEED",
                                                     "FSDP", "DEEPSPEED", "MEGATRON_LM")


def is_fsdp2(accelerator: Accelerator) -> bool:
    return str(accelerator.distributed_type) in ("DistributedType.FSDP", "FSDP") and accelerator.is_fsdp2


def take_snapshot(accelerator: Accelerator, copier: HostCopier | None, defer: bool = False,
                  full_state: bool | None = None) -> Snapshot:
    """Copies model, optimizer, scheduler, scaler and RNG state to host memory (call on every rank).
    Without a copier it holds references to the live state instead: for a save that writes before training goes on.

    With `defer`, parameters and optimizer state - which only `optimizer.step()` changes - are copied later, by
    `copier.copy_deferred()`, which must finish before the next optimizer step; everything else (buffers, which
    a forward pass may change, scheduler, scaler, RNG) is copied now.
    `full_state`: whether this process's snapshot holds the model, optimizer and scheduler state (default: the main
    process only, as `save_state`; the node-local tier asks each node's first process for them too).
    """
    if copier is None:
        copier = _NoCopy()
    elif defer and not is_fsdp2(accelerator):  # shards are staged whole, now
        copier.defer_storages = _storages_changed_only_by_optimizer_steps(accelerator)
    try:
        snap = _take(accelerator, copier, accelerator.is_main_process if full_state is None else full_state)
    finally:
        copier.defer_storages = set()
    return snap


def _storages_changed_only_by_optimizer_steps(accelerator: Accelerator) -> set[int]:
    storages = {p.untyped_storage().data_ptr() for m in compat.prepared_models(accelerator) for p in m.parameters()}
    for optimizer in compat.prepared_optimizers(accelerator):
        for state in optimizer.state.values():
            storages |= {v.untyped_storage().data_ptr() for v in state.values() if isinstance(v, torch.Tensor)}
    return storages


def _take(accelerator: Accelerator, copier, full_state: bool) -> Snapshot:
    snap = Snapshot(process_index=accelerator.process_index, is_main=full_state)
    models = []
    if is_fsdp2(accelerator):
        snap.sharded = {name: copier.copy_shards(state) for name, state in _shards(accelerator).items()}
    else:
        models = [_model_state(accelerator, m) for m in compat.prepared_models(accelerator)]
    if snap.is_main and not snap.sharded:
        snap.models = [copier.copy(m, ("model", i)) for i, m in enumerate(models)]
        snap.optimizers = [copier.copy(o.state_dict(), ("optimizer", i))
                           for i, o in enumerate(compat.prepared_optimizers(accelerator))]
    if snap.is_main:
        snap.schedulers = [copier.copy(s.state_dict(), ("scheduler", i))
                           for i, s in enumerate(compat.prepared_schedulers(accelerator))]
        snap.custom = [_own_copy(obj.state_dict(), copier, ("custom", i))
                       for i, obj in enumerate(compat.registered_objects(accelerator))]
    if accelerator.scaler is not None:
        snap.scaler = copier.copy(accelerator.scaler.state_dict(), ("scaler",))
    # The same keys as Accelerate's save_accelerator_state, read now rather than when the file is written.
    snap.rng = {"step": accelerator.step, **ProcessRNG().state_dict()}
    copier.finish()
    return snap


def _model_state(accelerator: Accelerator, model) -> dict:
    """What `save_state` saves of a model; of a PEFT model only the tensors that train."""
    state = accelerator.get_state_dict(model, unwrap=False)
    return only_trainable(state, model) if is_adapter_model(model) else state


def _shards(accelerator: Accelerator) -> dict[str, dict]:
    """This rank's sharded model and optimizer state, under the DCP directories and keys of Accelerate's
    save_state under FSDP2 (optimizer i goes with model i, as Accelerate pairs them); of a PEFT model, only
    the parameters that train."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    models = compat.prepared_models(accelerator)
    shards = {f"{SHARDED_MODEL_PREFIX}{i}": {"model": get_model_state_dict(
        model, options=StateDictOptions(ignore_frozen_params=is_adapter_model(model)))}
        for i, model in enumerate(models)}
    for i, optimizer in enumerate(compat.prepared_optimizers(accelerator)):
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # the one Accelerate wraps
        shards[f"{SHARDED_OPTIMIZER_PREFIX}{i}"] = {"optimizer": get_optimizer_state_dict(models[i], torch_optimizer)}
    return shards


def _own_copy(value: Any, copier: HostCopier, key: tuple) -> Any:
    """A registered object's state as it is now: tensors into host buffers, every other value deep-copied, since
    the object may change while the background thread writes (its state_dict may return live references)."""
    if isinstance(value, torch.Tensor):
        return copier.copy(value, key)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _own_copy(v, copier, (*key, k))) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_own_copy(v, copier, (*key, i)) for i, v in enumerate(value))
    return copy.deepcopy(value)
