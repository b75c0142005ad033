"""Loading a checkpoint's files without running code from them, and agreeing on every rank that it worked.

Accelerate 1.16's `load_state` reads the model from safetensors and the optimizer, scheduler, scaler, sampler,
dataloader and RNG state with `torch.load(weights_only=True)` (`accelerate.utils.load`), which builds only
tensors, numbers, strings, lists, dicts and a few numpy types. The one exception is the objects registered with
`register_for_checkpointing`: `load_custom_state` unpickles `custom_checkpoint_{i}.pkl` with weights_only=False,
so a crafted file would run code. `load_prepared_state` therefore lets `load_state` see neither those files nor
the registered objects, and restores each object itself: its file through the same weights_only=True loader,
then `obj.load_state_dict`. The files keep Accelerate's layout, so plain `load_state` still reads them.

A state_dict() of tensors, numbers, strings, lists and dicts loads that way (torch's own default since 2.6);
other classes would make every resume fail, so the first save refuses them instead (`check_registered_state`):
better an error minutes into a run than a checkpoint that can never be restored.

A checkpoint whose files are complete may still not load (garbage of the right size, a payload weights_only
refuses). `agreed_load` runs a load on every rank and raises the same `UnloadableCheckpoint` on all of them when
any rank failed, so no rank trains on while another gives up; the caller decides whether an older checkpoint
stands in for it (`--resume latest|auto`) or the resume is refused (an explicit path).
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from dtrain import compat
from dtrain.checkpoint.adapters import is_adapter_model
from dtrain.checkpoint.sharded import SHARDED_MODEL_PREFIX, SHARDED_OPTIMIZER_PREFIX, UnsafeCheckpoint, \
    local_shard_ranks, local_shards_dir
from dtrain.checkpoint.snapshot import is_fsdp2
from dtrain.distributed import gather_objects, is_lost_peer, run_and_agree
from dtrain.errors import CheckpointError, UsageError

CUSTOM_FILE = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")  # Accelerate's name for registered objects' files


class UnloadableCheckpoint(Exception):
    """A checkpoint whose files are there but whose contents could not be loaded (raised on every rank)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} cannot be loaded ({reason})")
        self.name, self.reason = name, reason


def safe_load(file: Path, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` with the numpy types Accelerate allows for RNG states (its own loader)."""
    from accelerate.utils import load

    return load(file, map_location=map_location, weights_only=True)


def load_prepared_state(accelerator, path: Path) -> None:
    """`accelerator.load_state(path)`, except that registered objects are restored with weights_only=True.
    A PEFT model's checkpoint holds only its trainable tensors (adapters.py): loaded with strict=False, the
    frozen base stays as the run rebuilt it (the caller has checked that the file holds every trainable one).
    A node-local checkpoint of a sharded run holds each of its ranks' shards on their own (local_tier.py):
    each rank reads its own."""
    path = Path(path)
    adapters = any(is_adapter_model(m) for m in compat.prepared_models(accelerator))
    own_shards = local_shard_ranks(path)
    if own_shards and not is_fsdp2(accelerator):
        raise ValueError("it is a node-local checkpoint of a --sharding fsdp2 run: only a run with that sharding "
                         "and world size loads it")
    if is_fsdp2(accelerator) and (adapters or own_shards):
        if own_shards and accelerator.process_index not in own_shards:
            raise ValueError(f"it holds the shards of rank(s) {own_shards}, not of rank {accelerator.process_index}")
        # The shards first, as Accelerate orders it: a DCP read of every rank's shards is collective, so a rank
        # that failed on its own files before it would leave the others waiting inside it.
        load_shards(accelerator, path / local_shards_dir(accelerator.process_index) if own_shards else path,
                    own_only=bool(own_shards))
        with compat.models_and_optimizers_hidden(accelerator):
            _load_state(accelerator, path, {})  # scheduler, scaler, RNG, registered objects
        return
    _load_state(accelerator, path, {"strict": False} if adapters else {})


def _load_state(accelerator, path: Path, kwargs: dict) -> None:
    custom_files = sorted(p.name for p in path.iterdir() if CUSTOM_FILE.match(p.name))
    objects = compat.registered_objects(accelerator)
    if len(custom_files) != len(objects):  # Accelerate refuses this too, before reading anything
        raise ValueError(f"it holds {len(custom_files)} file(s) of registered objects (custom_checkpoint_*.pkl) "
                         f"and this run registered {len(objects)} object(s) with register_for_checkpointing")
    if not objects:
        accelerator.load_state(str(path), **kwargs)
        return
    with _without_custom_files(path) as view, compat.registered_objects_hidden(accelerator):
        accelerator.load_state(str(view), **kwargs)
    for index, obj in enumerate(objects):
        file = path / f"custom_checkpoint_{index}.pkl"
        try:
            state = safe_load(file)
        except Exception as exc:  # noqa: BLE001 - named with the file: Accelerate's own message would not say
            raise ValueError(f"{file.name}: {type(exc).__name__}: {exc}") from None
        obj.load_state_dict(state)


def load_shards(accelerator, path: Path, own_only: bool = False) -> None:
    """Sharded (FSDP2) model and optimizer state from the DCP directories in `path`, as Accelerate's FSDP2 loader
    reads them; of a PEFT model only the parameters that train (its DCP directory holds no frozen ones).
    `own_only`: the directories index this rank's chunks alone (a node-local checkpoint), read with no process
    group; otherwise every rank reads its shards of a checkpoint that all ranks wrote together."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    def read(state: dict, dcp_dir: Path) -> None:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(dcp_dir)), no_dist=own_only)

    models = compat.prepared_models(accelerator)
    for i, model in enumerate(models):
        adapter = is_adapter_model(model)
        state = {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=adapter))}
        read(state, path / f"{SHARDED_MODEL_PREFIX}{i}")
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not adapter))
    for i, optimizer in enumerate(compat.prepared_optimizers(accelerator)):
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # the one Accelerate wraps
        state = {"optimizer": get_optimizer_state_dict(models[i], torch_optimizer)}
        read(state, path / f"{SHARDED_OPTIMIZER_PREFIX}{i}")
        set_optimizer_state_dict(models[i], torch_optimizer, state["optimizer"])


@contextlib.contextmanager
def _without_custom_files(path: Path) -> Iterator[Path]:
    """A view of the checkpoint (links to its entries) without the registered objects' files."""
    with tempfile.TemporaryDirectory(prefix="dtrain-load-") as temp:
        view = Path(temp) / path.name
        view.mkdir()
        for entry in path.iterdir():
            if not CUSTOM_FILE.match(entry.name):
                (view / entry.name).symlink_to(entry.resolve())
        yield view


def check_registered_state(accelerator) -> None:
    """Raises ValueError when a registered object's state_dict() would not load with weights_only=True (a custom
    class in it): such a checkpoint could never be restored. One serialization of each state, in memory."""
    import torch

    for index, obj in enumerate(compat.registered_objects(accelerator)):
        buffer = io.BytesIO()
        torch.save(obj.state_dict(), buffer)
        buffer.seek(0)
        try:
            safe_load(buffer)
        except Exception as exc:  # noqa: BLE001 - whatever the reason, the checkpoint would not load
            raise ValueError(f"the state_dict() of registered object {index} ({type(obj).__name__}) cannot be "
                             f"loaded with torch.load(weights_only=True): {short_reason(exc)}; return tensors, "
                             f"numbers, strings, lists and dicts, or allow the class with "
                             f"torch.serialization.add_safe_globals") from None


def short_reason(exc: BaseException) -> str:
    """One line for an exception: torch's weights_only refusal (a paragraph of advice around one line that says
    what was refused) reduced to that line, and a message that names its file (`optimizer.bin: ...`) kept
    without a type name before it."""
    text = str(exc)
    refused = _WEIGHTS_ONLY_ADVICE in text
    if refused:
        head, _, rest = text.partition(_WEIGHTS_ONLY_ADVICE)
        paragraphs = [p.strip() for p in rest.split("\n\n") if p.strip()]
        what = next((p for p in paragraphs[1:] if not p.startswith("Check the documentation")), "")
        text = f"{head}refused by weights_only: {what.removeprefix('WeightsUnpickler error:').strip()}"
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = line if len(line) <= 240 else line[:237] + "..."
    if refused or _NAMES_ITS_FILE.match(line) or not line:
        return line or type(exc).__name__
    return f"{type(exc).__name__}: {line}"


_WEIGHTS_ONLY_ADVICE = "Weights only load failed"
_NAMES_ITS_FILE = re.compile(r"^[\w./-]+\.(?:pkl|bin|pt|safetensors|json): ")


def agreed_load(name: str, load: Callable[[], Any], device) -> Any:
    """Runs `load` on every rank and agrees on the outcome: its result where every rank succeeded; otherwise
    every rank raises the same error. A rank's UsageError (a checkpoint of another model, a refused change) is
    raised everywhere as it is; an out-of-memory or a lost peer stays an unexpected failure (CheckpointError on
    the other ranks); anything else means the contents cannot be loaded: UnloadableCheckpoint everywhere.

    Collectives inside `load` must agree on their own failures (DCP's load does); everything else it does
    is local to the rank, so a rank that failed early never leaves another waiting in a collective."""
    result: list[Any] = []
    ok, error = run_and_agree(lambda: result.append(load()), True, device)
    if ok:
        return result[0]
    failures = gather_objects(_failure(error) if error is not None else None)
    ranked = [(rank, failure) for rank, failure in enumerate(failures) if failure is not None]
    where = (lambda rank: f" on rank {rank}") if len(failures) > 1 else (lambda rank: "")
    for kind in ("fatal", "usage", "unloadable"):
        for rank, (found, reason) in ranked:
            if found != kind:
                continue
            if kind == "fatal":
                if error is not None and _failure(error)[0] == "fatal":
                    raise error
                raise CheckpointError(f"loading {name} failed{where(rank)} ({reason})")
            if kind == "usage":
                raise UsageError(reason)
            raise UnloadableCheckpoint(name, f"{reason}{where(rank)}")
    raise CheckpointError(f"loading {name} failed on another rank")  # no reason arrived: never expected


def _failure(exc: BaseException) -> tuple[str, str]:
    """(kind, one line) for what `agreed_load` tells the other ranks."""
    import torch

    if isinstance(exc, UnsafeCheckpoint):  # a crafted sharded index: the checkpoint is unusable, not the command
        return "unloadable", str(exc)
    if isinstance(exc, UsageError):
        return "usage", str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or is_lost_peer(exc):
        return "fatal", short_reason(exc)
    return "unloadable", short_reason(exc)
