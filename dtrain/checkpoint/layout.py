"""The bottom of the checkpoint package: names and files of a checkpoint, its manifest, and verifying a directory.

Nothing here knows where checkpoints are stored (location.py, storage.py) or how runs descend from each other
(records.py, lineage.py).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from dtrain.checkpoint.documents import (parse_manifest, parse_trainer_state, pointer_target, read_local,
                                         warn_once)
from dtrain.checkpoint.names import (LocalFiles, UnsafeFile, irregular_entry_problem, local_file_problem, regular_files,
                                     symlink_problem)
from dtrain.checkpoint.writer import FileDigest
from dtrain.checksum import DEFAULT_CHECKSUM, entry_checksum, file_checksum
from dtrain.utils import atomic_write_text, fsync_path

FORMAT = "dtrain-checkpoint/1"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
BEST = "best"
STEP_DIR = re.compile(r"step_([0-9]{9})")  # matched whole: no trailing newline, no other script's digits


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def temp_dir_name(step: int) -> str:
    return f".tmp-{step_dir_name(step)}"


def parse_step(name: str) -> int | None:
    match = STEP_DIR.fullmatch(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def step_dirs(checkpoints_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories (never dot-names), oldest step first.

    A `step_N` that is a symbolic link is not one: dtrain never makes one, retention would delete through it,
    and whoever can write the checkpoints dir could point it at any directory. It is ignored, with a warning."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        if parse_step(path.name) is None:
            continue
        if path.is_symlink():
            warn_once(f"ignoring {path}: {symlink_problem(path)}")
        elif path.is_dir():
            found.append(path)
    return sorted(found, key=lambda p: parse_step(p.name))


def read_pointer(checkpoints_dir: Path, name: str) -> str | None:
    """The checkpoint name the pointer file `name` holds; None when missing, or (with a warning) when it holds
    anything else or is not a regular file. Read without following a link, at most a few bytes."""
    path = checkpoints_dir / name
    try:
        data = read_local(path, limit=1024)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warn_once(f"ignoring the pointer {path}: {getattr(exc, 'strerror', None) or exc}")
        return None
    return pointer_target(data, str(path), lambda value: parse_step(value) is not None)


def write_pointer(checkpoints_dir: Path, name: str, target: str) -> None:
    atomic_write_text(checkpoints_dir / name, target + "\n")


def read_trainer_state(path: Path) -> dict:
    """A checkpoint directory's trainer state; OSError when it cannot be read, ValueError when it is not a
    trainer state dtrain can use (garbled, wrong types, not a regular file)."""
    problem = local_file_problem(path, TRAINER_STATE)
    if problem is not None:
        raise ValueError(problem)
    return parse_trainer_state(read_local(path / TRAINER_STATE))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_files(path: Path) -> list[str]:
    """The regular files of a checkpoint being written, but its manifest (symbolic links are never listed)."""
    return [name for name in regular_files(path) if name != MANIFEST]


def write_manifest(path: Path, step: int, written: Mapping[str, Any] | None = None,
                   algorithm: str = DEFAULT_CHECKSUM) -> int:
    """Writes manifest.json last, after every file is on disk. Returns the total bytes.

    `written` maps names to the size and checksum (`FileDigest`) of files that were hashed while they were
    written and are already fsynced (dtrain.checkpoint.writer); every other file (another rank's, or one that
    `save_state` wrote) is hashed from the page cache and fsynced here.
    """
    written = dict(written or {})
    names = checkpoint_files(path)
    for name in names:
        known = written.get(name)
        if known is not None and ((path / name).stat().st_size != known.size or known.algorithm != algorithm):
            written.pop(name)  # changed since it was written (or hashed otherwise): hash what is there
    written.update(hash_and_sync(path, [n for n in names if n not in written], algorithm))
    files = {name: {"size": written[name].size, algorithm: written[name].checksum} for name in names}
    manifest = {"format": FORMAT, "step": step, "files": files,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1))
    for sub in {(path / n).parent for n in names}:
        fsync_path(sub)
    return sum(meta["size"] for meta in files.values())


def hash_and_sync(path: Path, names: list[str], algorithm: str) -> dict[str, FileDigest]:
    """Size and checksum of files someone else wrote (read back from the page cache), each fsynced.

    Flushing to disk and hashing overlap: the fsyncs wait on the disk, the hashes on the CPU (the hash libraries
    release the GIL), so this costs about the larger of the two, not their sum."""
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, max(2, 2 * len(names)))) as pool:
        flushed = [pool.submit(_fsync_file, path / n) for n in names]
        hashed = dict(zip(names, pool.map(lambda n: file_checksum(path / n, algorithm), names)))
        for future in flushed:
            future.result()
    return {name: FileDigest(size, value, algorithm) for name, (size, value) in hashed.items()}


# Files that one rank writes under its own name (torch.distributed.checkpoint's shards, Accelerate's RNG state,
# per-rank files of non-DCP sharded saves); every other file of a checkpoint is written by the main process.
_RANK_FILE = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|random_states_(\d+)\.pkl|[^/]*_rank(\d+)\.bin)$")


def file_owner(name: str) -> int:
    """The rank that wrote a checkpoint file (by its name): the one that hashes it for the manifest."""
    match = _RANK_FILE.search(name)
    return int(next(group for group in match.groups() if group is not None)) if match else 0

@dataclass
class Verification:
    ok: bool
    reason: str = ""
    bytes: int = 0


def verify_checkpoint(path: Path, checksums: bool = False) -> Verification:
    """Checks that every file the manifest lists is there with its size (and its checksum when asked, in the
    algorithm its manifest entry names: sha256 for manifests of earlier versions).

    The manifest and the trainer state are untrusted input (documents.py, names.py): an unsafe name, a symbolic
    link, a device or fifo, a garbled or mistyped document makes the checkpoint damaged, with the reason."""
    path = Path(path)
    if path.is_symlink():
        return Verification(False, symlink_problem(path))
    if not path.is_dir():
        return Verification(False, f"{path} is not a directory")
    try:
        manifest = parse_manifest(read_local(path / MANIFEST), FORMAT)
    except FileNotFoundError:
        return Verification(False, f"{MANIFEST} is missing (the save did not finish)")
    except OSError as exc:
        return Verification(False, f"{MANIFEST} is unreadable: {exc.strerror or exc}")
    except ValueError as exc:  # each reason names the document
        return Verification(False, str(exc))
    if TRAINER_STATE not in manifest["files"]:
        return Verification(False, f"{TRAINER_STATE} is not listed in the manifest")
    total, files = 0, LocalFiles(path)
    for name, meta in sorted(manifest["files"].items()):
        try:
            size = files.lstat(name).st_size  # lstat from the checkpoint down: nothing outside is touched
        except UnsafeFile as exc:
            return Verification(False, str(exc))
        if size != meta["size"]:
            return Verification(False, f"{name} has {size} bytes, the manifest says {meta['size']}")
        if checksums:
            listed = entry_checksum(meta)
            if listed is None:
                return Verification(False, f"{name} has no checksum in the manifest")
            try:
                if file_checksum(files.path(name), listed[0])[1] != listed[1]:
                    return Verification(False, f"{name} does not match its {listed[0]} in the manifest")
            except OSError as exc:  # swapped for a link or a fifo since it was checked
                return Verification(False, f"{name} cannot be read ({exc.strerror or exc})")
        total += size
    stray = irregular_entry_problem(path)  # a link among the unlisted files would still be opened by name
    if stray is not None:
        return Verification(False, stray)
    try:
        read_trainer_state(path)
    except OSError as exc:
        return Verification(False, f"{TRAINER_STATE} is unreadable: {exc.strerror or exc}")
    except ValueError as exc:
        return Verification(False, str(exc))
    return Verification(True, "", total)
