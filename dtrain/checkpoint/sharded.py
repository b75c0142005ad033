"""Sharded checkpoints (FSDP2): what Accelerate's save_state writes under sharding, checked and read back.

Under `--sharding fsdp2` every rank writes only its own shards, through torch.distributed.checkpoint (DCP):
`pytorch_model_fsdp_0/` (the model) and `optimizer_0/` (its optimizer), each holding one `__R_0.distcp` file per
rank and DCP's `.metadata`, beside the usual `scheduler.bin` and `random_states_R.pkl`. The commit protocol lists
every one of these files in the manifest like any other.

Two things in that format are pickles that DCP's reader unpickles with code execution allowed: `.metadata` (the
index: which tensor chunk lives where) and the non-tensor values (the optimizer's hyperparameters), which DCP
loads with `torch.load(weights_only=False)`. `check_sharded_dir` reads both first under a restricted unpickler
that admits only DCP's own metadata classes, torch sizes and dtypes (and `weights_only=True` for the values), so
a crafted file is refused before DCP ever opens it; every DCP load in dtrain goes through it.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dtrain.errors import UsageError

SHARDED_MODEL_PREFIX, SHARDED_OPTIMIZER_PREFIX = "pytorch_model_fsdp_", "optimizer_"  # + the model's index
SHARDED_MODEL_DIR = f"{SHARDED_MODEL_PREFIX}0"
SHARDED_OPTIMIZER_DIR = f"{SHARDED_OPTIMIZER_PREFIX}0"
SHARDED_DIRS = (SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR)
# A node-local checkpoint of a sharded run (local_tier.py) holds each of its node's ranks' shards on their own:
# `shards_rank{R}/pytorch_model_fsdp_0/` etc., each a DCP directory indexing rank R's chunks only (no node holds
# the others'), which rank R alone reads back, in a run of the same world size.
LOCAL_SHARDS_PREFIX = "shards_rank"
_LOCAL_SHARDS_DIR = re.compile(rf"{LOCAL_SHARDS_PREFIX}([0-9]+)")
DCP_METADATA = ".metadata"

# Every global a DCP `.metadata` written by torch 2.x refers to: its dataclasses, sizes, dtypes, layouts, the path
# it was saved to. Nothing here runs code beyond building these values.
_DCP = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    *((_DCP, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(UsageError):
    """A checkpoint file that would run code, or point outside its checkpoint, when loaded: refused (exit 2)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not part of a DCP index")


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint directory holds sharded (DCP) model state rather than model.safetensors."""
    return (Path(checkpoint) / SHARDED_MODEL_DIR).is_dir()


def local_shards_dir(rank: int) -> str:
    return f"{LOCAL_SHARDS_PREFIX}{rank}"


def local_shard_ranks(checkpoint: Path) -> list[int]:
    """The ranks whose own shards a node-local checkpoint holds (empty: not a node-local sharded checkpoint)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return []
    found = (_LOCAL_SHARDS_DIR.fullmatch(p.name) for p in checkpoint.iterdir() if p.is_dir() and not p.is_symlink())
    return sorted(int(m.group(1)) for m in found if m)


def is_local_sharded(checkpoint: Path) -> bool:
    return bool(local_shard_ranks(checkpoint))


def read_metadata(dcp_dir: Path) -> Any:
    """DCP's index of one sharded directory, unpickled with only DCP's metadata classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = Path(dcp_dir) / DCP_METADATA
    try:
        with open(file, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except FileNotFoundError:
        raise UnsafeCheckpoint(f"{_shown(file)} is missing: not a complete sharded checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - any way a crafted or damaged pickle fails: refused, never executed
        raise UnsafeCheckpoint(f"{_shown(file)} was refused ({exc}); dtrain loads only DCP's own index") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{_shown(file)} holds a {type(metadata).__name__}, not a DCP index")
    return metadata


def check_sharded_dir(dcp_dir: Path) -> None:
    """Refuses a DCP directory that DCP would load by running code: an index beyond DCP's own classes, a value
    that is not plain data, a chunk stored outside the directory or behind a transform dtrain never writes."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    dcp_dir = Path(dcp_dir)
    metadata = read_metadata(dcp_dir)
    for index, where in (metadata.storage_data or {}).items():
        relative = str(getattr(where, "relative_path", ""))
        if not relative or "/" in relative or "\\" in relative or relative in (".", "..") \
                or not (dcp_dir / relative).is_file() or (dcp_dir / relative).is_symlink():
            raise UnsafeCheckpoint(f"{_shown(dcp_dir)}: {index.fqn} is stored in {relative!r}, which is not a "
                                   f"file of this directory")
        if getattr(where, "transform_descriptors", None):
            raise UnsafeCheckpoint(f"{_shown(dcp_dir)}: {index.fqn} is stored behind transforms "
                                   f"{where.transform_descriptors}, which dtrain never writes")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(dcp_dir / relative, "rb") as stream:
                stream.seek(where.offset)
                value = stream.read(where.length)
            try:
                torch.load(io.BytesIO(value), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - refused, never executed
                raise UnsafeCheckpoint(f"{_shown(dcp_dir / relative)}: the value of {index.fqn} was refused "
                                       f"({type(exc).__name__}); dtrain loads only plain data") from None


def check_sharded(checkpoint: Path) -> None:
    """`check_sharded_dir` for every DCP directory of a sharded checkpoint (model and optimizer), and of each
    rank's shards in a node-local one."""
    checkpoint = Path(checkpoint)
    roots = [checkpoint, *(checkpoint / local_shards_dir(rank) for rank in local_shard_ranks(checkpoint))]
    for root in roots:
        for dcp_dir in sorted(root.iterdir()):
            if dcp_dir.name.startswith((SHARDED_MODEL_PREFIX, SHARDED_OPTIMIZER_PREFIX)) and dcp_dir.is_dir() \
                    and not dcp_dir.is_symlink():
                check_sharded_dir(dcp_dir)


def full_state(dcp_dir: Path) -> dict:
    """The whole state a DCP directory holds, gathered from every rank's shards, as plain tensors (one process,
    no process group), after `check_sharded_dir`."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    check_sharded_dir(dcp_dir)
    with tempfile.TemporaryDirectory(prefix="dtrain-dcp-") as temp:
        target = Path(temp) / "state.pt"
        dcp_to_torch_save(str(dcp_dir), str(target))
        return torch.load(target, weights_only=True)


def model_state(checkpoint: Path) -> dict:
    """A sharded checkpoint's whole model, gathered on one process, each tied tensor once (the names its
    trainer_state.json records as tied)."""
    from dtrain.weights import without_aliases

    checkpoint = Path(checkpoint)
    state = full_state(checkpoint / SHARDED_MODEL_DIR)["model"]
    try:
        tied = json.loads((checkpoint / "trainer_state.json").read_text()).get("tied_weights") or []
    except (OSError, ValueError):
        tied = []
    return without_aliases(state, tied)


@contextlib.contextmanager
def model_weights_file(checkpoint: Path) -> Iterator[Path]:
    """The checkpoint's model weights as one safetensors file: its model.safetensors, or for a sharded checkpoint
    every rank's shards consolidated into a temporary file (one process, no process group, any world size)."""
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint)
    if not is_sharded(checkpoint):
        yield checkpoint / "model.safetensors"
        return
    with tempfile.TemporaryDirectory(prefix="dtrain-consolidated-") as temp:
        weights = Path(temp) / "model.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in model_state(checkpoint).items()}, str(weights),
                  metadata={"format": "pt"})
        yield weights


def _shown(path: Path) -> str:
    """A file named by its checkpoint and the path inside it."""
    path = Path(path)
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("step_"):
            return "/".join(parts[i:])
    return str(path)
