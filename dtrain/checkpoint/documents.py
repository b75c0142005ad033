"""Reading the small documents of a checkpoint (manifest.json, trainer_state.json, the latest/best pointers) as
the untrusted input they are: bounded in size, strict JSON, and the types dtrain relies on checked, so that a
truncated, garbled or crafted document makes the checkpoint damaged (a reason in one line), never a traceback.

JSON's NaN and Infinity are refused in a manifest (dtrain never writes them there). In a trainer state they are
accepted only where a float is expected (a metric: a diverged run records NaN itself); a counter must be an
integer in range.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from dtrain.checkpoint.names import name_problem
from dtrain.checksum import ALGORITHMS
from dtrain.utils import warn_once

MAX_DOCUMENT_BYTES = 64 << 20  # a manifest of 500,000 files; a trainer state is a few KB
MAX_POINTER_BYTES = 64  # "step_000000120\n" is 15 bytes
MAX_COUNT = 1 << 62  # steps, epochs, sample counts and sizes are far below this
_HEX = re.compile(r"[0-9a-f]{1,128}")  # a checksum as manifests hold it

def _refuse_constant(name: str) -> Any:
    raise ValueError(f"holds {name}, which is not a JSON number")


def loads(data: bytes | str, allow_nan: bool = False) -> Any:
    """Strict JSON: ValueError for anything json would accept only leniently (NaN, Infinity unless `allow_nan`)
    and for nesting too deep to parse."""
    try:
        return json.loads(data) if allow_nan else json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("is nested too deeply") from None


def read_local(path: Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, opened without following a symbolic link and
    without blocking on a fifo. OSError (FileNotFoundError when missing) or ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{Path(path).name} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{Path(path).name} has {info.st_size} bytes, more than the {limit} it may have")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{Path(path).name} has more than the {limit} bytes it may have")
    return data


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def manifest_problem(manifest: Any, format_name: str) -> str | None:
    """Why a parsed manifest.json is not one dtrain can trust the shape of, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != format_name \
            or not isinstance(manifest.get("files"), dict):
        return f"manifest.json is not a {format_name} manifest"
    if "step" in manifest and not is_count(manifest["step"]):
        return f"manifest.json has a step that is not a non-negative integer: {str(manifest['step'])[:40]}"
    for name, meta in manifest["files"].items():
        problem = name_problem(name)
        if problem is not None:
            return f"manifest.json lists an unsafe entry: {problem}"
        if not isinstance(meta, dict) or not is_count(meta.get("size")):
            return f"manifest.json has no valid size for {name} (a non-negative integer)"
        for algorithm in ALGORITHMS:
            value = meta.get(algorithm)
            if value is not None and not (isinstance(value, str) and _HEX.fullmatch(value)):
                return f"manifest.json has a {algorithm} for {name} that is not lowercase hex"
    return None


_COUNTERS = ("global_step", "epoch", "step_in_epoch", "epoch_samples_seen", "samples_seen", "world_size",
             "evals_without_improvement")
_OPTIONAL_COUNTERS = ("grad_accum", "last_eval_step", "best_step")
_OPTIONAL_TEXT = ("run_id", "parent", "task", "fingerprint", "mixed_precision", "sharding", "device", "created")
_OPTIONAL_OBJECTS = ("config", "checkpoint_metric", "last_eval", "shape", "data_position", "lr_plan",
                     "resume_certificate")
_OPTIONAL_FLAGS = ("stopped_early", "async")


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_list_of(entry_problem) -> Any:
    return lambda value: isinstance(value, list) and all(entry_problem(entry) for entry in value)


# The fields inside the trainer state's objects that dtrain reads: field -> (check, what it must be). A field that
# is absent or null is left to its reader's default, except where `_REQUIRED` names it.
_INNER_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "data_position": {
        "kind": (_is_text, "a string"), "resume": (_is_text, "a string"), "epoch": (is_count, "a non-negative integer"),
        "samples": (is_count, "a non-negative integer"), "world_size": (is_count, "a non-negative integer"),
        "shuffle": (lambda v: isinstance(v, bool), "true or false"), "replay_reason": (_is_text, "a string"),
        # a stream's ranks: each its micro-batches consumed and its loader's own (JSON) state
        "ranks": (_is_list_of(lambda r: isinstance(r, dict) and is_count(r.get("micro_batches"))),
                  "a list of {micro_batches, state}"),
    },
    "lr_plan": {
        "total_steps": (is_count, "a non-negative integer"), "warmup_steps": (is_count, "a non-negative integer"),
        "min_lr_ratio": (_is_number, "a number"),
    },
    "resume_certificate": {
        "format": (_is_text, "a string"), "world_size": (is_count, "a non-negative integer"),
        "ranks": (_is_list_of(lambda r: isinstance(r, dict) and all(_is_text(v) for v in r.values())),
                  "a list of objects of digests"),
    },
}
_REQUIRED = {"lr_plan": ("total_steps", "warmup_steps", "min_lr_ratio"), "resume_certificate": ("format",)}


def _inner_problem(state: dict) -> str | None:
    """Why a field inside data_position, lr_plan or resume_certificate is not what dtrain reads there, or None."""
    for section, fields in _INNER_FIELDS.items():
        inner = state.get(section)
        if inner is None:
            continue
        for key in _REQUIRED.get(section, ()):
            if inner.get(key) is None:
                return f"trainer_state.json has a {section} without {key}"
        for key, (check, expected) in fields.items():
            if inner.get(key) is not None and not check(inner[key]):
                return f"trainer_state.json has {section}.{key} = {str(inner[key])[:40]}, not {expected}"
    return None


def trainer_state_problem(state: Any) -> str | None:
    """Why a parsed trainer_state.json does not hold the types dtrain reads from it, or None."""
    if not isinstance(state, dict):
        return "trainer_state.json does not hold a JSON object"

    def wrong(key: str, expected: str) -> str:
        return f"trainer_state.json has {key} = {str(state[key])[:40]}, not {expected}"

    for key in _COUNTERS:
        if key in state and not is_count(state[key]):
            return wrong(key, "a non-negative integer")
    for key in _OPTIONAL_COUNTERS:
        if state.get(key) is not None and not is_count(state[key]):
            return wrong(key, "a non-negative integer")
    for key in _OPTIONAL_TEXT:
        if state.get(key) is not None and not isinstance(state[key], str):
            return wrong(key, "a string")
    for key in _OPTIONAL_OBJECTS:
        if state.get(key) is not None and not isinstance(state[key], dict):
            return wrong(key, "an object")
    for key in _OPTIONAL_FLAGS:
        if state.get(key) is not None and not isinstance(state[key], bool):
            return wrong(key, "true or false")
    if state.get("tied_weights") is not None and not isinstance(state["tied_weights"], list):
        return wrong("tied_weights", "a list")
    metric = state.get("checkpoint_metric") or {}
    if metric.get("name") is not None and not isinstance(metric["name"], str):
        return "trainer_state.json has a checkpoint_metric name that is not a string"
    if metric.get("value") is not None and not _is_number(metric["value"]):
        return "trainer_state.json has a checkpoint_metric value that is not a number"
    if state.get("best_metric") is not None and not _is_number(state["best_metric"]):
        return wrong("best_metric", "a number")
    if not all(_is_number(v) for v in (state.get("last_eval") or {}).values()):
        return "trainer_state.json has a last_eval value that is not a number"
    ancestry = state.get("ancestry")
    if ancestry is not None and not (isinstance(ancestry, list) and all(
            isinstance(a, dict) and is_count(a.get("step")) and isinstance(a.get("run_id"), (str, type(None)))
            for a in ancestry)):
        return "trainer_state.json has an ancestry that is not a list of {run_id, step}"
    return _inner_problem(state)


def parse_trainer_state(data: bytes | str) -> dict:
    """A trainer_state.json's content as a dict; ValueError naming what is wrong with it."""
    try:
        state = loads(data, allow_nan=True)
    except ValueError as exc:
        raise ValueError(f"trainer_state.json is not valid JSON ({str(exc)[:200]})") from None
    problem = trainer_state_problem(state)
    if problem is not None:
        raise ValueError(problem)
    return state


def parse_manifest(data: bytes | str, format_name: str) -> dict:
    """A manifest.json's content as a dict; ValueError naming what is wrong with it."""
    try:
        manifest = loads(data)
    except ValueError as exc:
        raise ValueError(f"manifest.json is not valid JSON ({str(exc)[:200]})") from None
    problem = manifest_problem(manifest, format_name)
    if problem is not None:
        raise ValueError(problem)
    return manifest


def pointer_target(data: bytes | None, where: str, is_step_name) -> str | None:
    """The checkpoint name a pointer's content holds, or None: missing (`data` None) silently, anything other
    than one step directory name (`../x`, `/abs`, `step_1/../../x`, garbage, too long) with a warning. It is
    never followed as a path."""
    if data is None:
        return None
    try:
        value = data.decode("ascii").strip() if len(data) <= MAX_POINTER_BYTES else None
    except UnicodeDecodeError:
        value = None
    if value is not None and is_step_name(value):
        return value
    shown = repr(data[:40]) + ("..." if len(data) > 40 else "")
    warn_once(f"ignoring the pointer {where}: it holds {shown}, not the name of a checkpoint (step_ and 9 digits)")
    return None
