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

from dtrain.checkpoint.writer import FileDigest
from dtrain.checksum import DEFAULT_CHECKSUM, entry_checksum, file_checksum
from dtrain.utils import atomic_write_text, fsync_path

FORMAT = "dtrain-checkpoint/1"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
BEST = "best"
STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def temp_dir_name(step: int) -> str:
    return f".tmp-{step_dir_name(step)}"


def parse_step(name: str) -> int | None:
    match = STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def step_dirs(checkpoints_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories (never dot-names), oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and parse_step(p.name) is not None]
    return sorted(found, key=lambda p: parse_step(p.name))


def read_pointer(checkpoints_dir: Path, name: str) -> str | None:
    try:
        value = (checkpoints_dir / name).read_text().strip()
    except OSError:
        return None
    return value if parse_step(value) is not None else None


def write_pointer(checkpoints_dir: Path, name: str, target: str) -> None:
    atomic_write_text(checkpoints_dir / name, target + "\n")


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


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
    algorithm its manifest entry names: sha256 for manifests of earlier versions)."""
    path = Path(path)
    if not path.is_dir():
        return Verification(False, f"{path} is not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return Verification(False, f"{MANIFEST} is missing (the save did not finish)")
    except (OSError, ValueError) as exc:
        return Verification(False, f"{MANIFEST} is unreadable: {exc}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return Verification(False, f"{MANIFEST} is not a {FORMAT} manifest")
    if TRAINER_STATE not in manifest["files"]:
        return Verification(False, f"{TRAINER_STATE} is not listed in the manifest")
    total = 0
    for name, meta in sorted(manifest["files"].items()):
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return Verification(False, f"{name} is missing")
        if size != meta.get("size"):
            return Verification(False, f"{name} has {size} bytes, the manifest says {meta.get('size')}")
        if checksums:
            listed = entry_checksum(meta)
            if listed is None:
                return Verification(False, f"{name} has no checksum in the manifest")
            if file_checksum(file, listed[0])[1] != listed[1]:
                return Verification(False, f"{name} does not match its {listed[0]} in the manifest")
        total += size
    return Verification(True, "", total)
