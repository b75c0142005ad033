"""Checkpoints in an object store (S3, GCS, MinIO, anything fsspec opens): where bytes go when there is no rename.

A checkpoint is the prefix `step_%09d/` holding the files `Accelerator.save_state` writes. Its `manifest.json`
(names, sizes, checksums) is uploaded LAST and is the commit: writing one object is atomic, so a prefix without a
manifest, or whose objects do not match it, is not a checkpoint. The manifest is written create-only
(`If-None-Match: *` where the store supports it), so a commit never silently replaces another one.

Nothing is ever "renamed" (an object store's move is a copy plus a delete, and can leave both behind). Deleting
a checkpoint deletes its manifest first: from that moment it is not a checkpoint, whatever is left of it.
The `latest` and `best` pointer objects beside the prefixes are hints; resolution lists the prefixes.

This module only moves bytes; which rank does what, and when, is the commit protocol (store_commit.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from dtrain.checksum import DEFAULT_CHECKSUM, entry_checksum, new_hasher
from dtrain.checkpoint.documents import (MAX_DOCUMENT_BYTES, MAX_POINTER_BYTES, loads, parse_manifest,
                                         parse_trainer_state, pointer_target)
from dtrain.checkpoint.layout import FORMAT, MANIFEST, TRAINER_STATE, Verification, parse_step
from dtrain.checkpoint.names import inside, name_problem
from dtrain.checkpoint.s3_checksums import checksum_for_store, stored_checksum
from dtrain.compat import strip_protocol
from dtrain.errors import UsageError
from dtrain.redact import redact_uri
from dtrain.utils import atomic_write_text, create_new_file, fresh_temp_name

CHUNK = 8 << 20  # bytes read/written per call while streaming (and hashing) a file
PARALLEL_TRANSFERS = 4  # files moved at the same time by one process
PROGRESS_MIN_BYTES = 256 << 20  # transfers at least this large show a progress bar (on the main process)
WHOLE_FILE_UPLOAD_BYTES = 256 << 20  # files up to this size are uploaded from memory in one call
STREAM_PART_BYTES = 64 << 20  # the part size of larger files, streamed (a multipart upload)


def open_filesystem(uri: str):
    """(fsspec filesystem, root path inside it) for a URI; a missing backend is one clear UsageError."""
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"invalid value for checkpoint_dir: {uri!r} needs fsspec and s3fs; "
                         f'install them with pip install -e ".[s3]"') from None
    scheme = uri.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except ImportError as exc:
        extra = ('pip install -e ".[s3]"' if scheme in ("s3", "s3a")
                 else f"install the fsspec backend for {scheme}:// ({exc})")
        raise UsageError(f"invalid value for checkpoint_dir: {uri!r} needs an object store client; {extra}") from None
    except ValueError as exc:
        raise UsageError(redact_uri(f"invalid value for checkpoint_dir: {uri!r}; accepted: a directory or a URI "
                                    f"such as s3://bucket/prefix ({exc})")) from None
    except Exception as exc:  # noqa: BLE001 - some backends connect when opened: a wrong host, a closed port
        reason = (str(exc).splitlines() or [""])[0][:300] or type(exc).__name__
        raise UsageError(redact_uri(f"cannot reach the checkpoint location {uri}: {type(exc).__name__}: "
                                    f"{reason}")) from None
    for chatty in ("botocore", "aiobotocore", "s3fs"):  # "found credentials in ..." at INFO, once per process
        if logging.getLogger(chatty).level == logging.NOTSET:
            logging.getLogger(chatty).setLevel(logging.WARNING)
    return fs, root.rstrip("/")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _progress_bar(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
                disable=not show or total < PROGRESS_MIN_BYTES)


class ObjectStore:
    """The checkpoints under one URI prefix. Every method is safe to call from any rank and any thread."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = open_filesystem(self.uri)
        self._trainer_states: dict[str, dict] | None = None  # step name -> trainer state, once remembering

    def __repr__(self) -> str:
        return f"ObjectStore({self.uri!r})"

    def url(self, *names: str) -> str:
        """The URI of a checkpoint or object under the prefix (for messages and `--resume`)."""
        return "/".join([self.uri, *names])

    def _path(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def _fresh(self) -> None:
        # Listings are cached per filesystem instance; other processes write the store, so never trust them.
        self.fs.invalidate_cache()

    # ------------------------------------------------------------------------------------------ reading

    def step_names(self) -> list[str]:
        """Checkpoint-looking prefixes (`step_%09d`), oldest step first; whether each is committed is for
        `verify` to say."""
        self._fresh()
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries}
        return sorted((n for n in names if parse_step(n) is not None), key=parse_step)

    def read_bytes(self, *names: str) -> bytes:
        return self.fs.cat_file(self._path(*names))

    def read_document(self, *names: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
        """A small object (manifest, trainer state, pointer), read up to `limit` bytes: ValueError beyond."""
        data = self.fs.cat_file(self._path(*names), start=0, end=limit + 1)
        if len(data) > limit:
            raise ValueError(f"{names[-1]} has more than the {limit} bytes it may have")
        return data

    def read_json(self, *names: str) -> dict:
        value = loads(self.read_document(*names))
        if not isinstance(value, dict):
            raise ValueError(f"{'/'.join(names)} does not hold a JSON object")
        return value

    def read_trainer_state(self, step_name: str) -> dict:
        """OSError when it cannot be read, ValueError when it is not a trainer state dtrain can use.

        Kept once read after `remember_trainer_states()`."""
        if self._trainer_states is None:
            return parse_trainer_state(self.read_document(step_name, TRAINER_STATE))
        if step_name not in self._trainer_states:
            self._trainer_states[step_name] = parse_trainer_state(self.read_document(step_name, TRAINER_STATE))
        return copy.deepcopy(self._trainer_states[step_name])

    def _forget(self, step_name: str) -> None:
        if self._trainer_states is not None:
            self._trainer_states.pop(step_name, None)

    def remember_trainer_states(self) -> None:
        """For the run that holds the lock, the only writer of its checkpoints: a committed checkpoint does not
        change, and retention and `best` read every checkpoint of the lineage after each save (one request
        each), so each trainer state is read once; deleting a prefix forgets it."""
        if self._trainer_states is None:
            self._trainer_states = {}

    def read_manifest(self, step_name: str) -> dict:
        """The manifest of a checkpoint; FileNotFoundError when it has none, ValueError when it is not one (an
        unsafe name such as `../x` or `/abs` included: documents.py, names.py)."""
        return parse_manifest(self.read_document(step_name, MANIFEST), FORMAT)

    def has_manifest(self, step_name: str) -> bool:
        self._fresh()
        return self.fs.exists(self._path(step_name, MANIFEST))

    def object_sizes(self, step_name: str) -> dict[str, int]:
        """Size of every object under a checkpoint's prefix, by its name relative to the prefix."""
        self._fresh()
        base = self._path(step_name)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        base = strip_protocol(self.fs, base).rstrip("/") + "/"
        # A key such as `step_N/../x` or `step_N//abs` is listed as the store keeps it: under a name that
        # name_problem refuses, so it never matches a manifest entry that verify or a download accepts.
        return {path[len(base):]: int(info.get("size") or 0) for path, info in found.items()
                if path.startswith(base) and info.get("type", "file") == "file"}

    def verify(self, step_name: str, checksums: bool = False) -> Verification:
        """Is this prefix a committed checkpoint: a manifest, and every object it lists with its size (and, when
        asked, its checksum, which reads every byte)?"""
        try:
            manifest = self.read_manifest(step_name)
        except FileNotFoundError:
            return Verification(False, f"{MANIFEST} is missing (the save did not finish)")
        except OSError as exc:
            return Verification(False, f"{MANIFEST} is unreadable: {exc}")
        except ValueError as exc:  # each reason names the document
            return Verification(False, str(exc))
        files = manifest["files"]
        if TRAINER_STATE not in files:
            return Verification(False, f"{TRAINER_STATE} is not listed in the manifest")
        sizes = self.object_sizes(step_name)
        for name, meta in sorted(files.items()):
            if name not in sizes:
                return Verification(False, f"{name} is missing")
            if sizes[name] != meta.get("size"):
                return Verification(False, f"{name} has {sizes[name]} bytes, the manifest says {meta.get('size')}")
        if checksums:
            for name, meta in sorted(files.items()):
                listed = entry_checksum(meta)
                if listed is None:
                    return Verification(False, f"{name} has no checksum in the manifest")
                found = self.stored_checksum(step_name, name, listed[0])  # the store's own, if it keeps one
                if found is None:
                    found = self._object_checksum(step_name, name, listed[0])  # else: read every byte
                if found != listed[1]:
                    return Verification(False, f"{name} does not match its {listed[0]} in the manifest")
        try:
            self.read_trainer_state(step_name)
        except OSError as exc:
            return Verification(False, f"{TRAINER_STATE} is unreadable: {exc}")
        except ValueError as exc:
            return Verification(False, str(exc))
        return Verification(True, "", sum(int(meta["size"]) for meta in files.values()))

    def stored_checksum(self, step_name: str, name: str, algorithm: str) -> str | None:
        """The whole-object checksum the store keeps for an object in `algorithm` (lowercase hex), without
        downloading it; None where the store keeps none in that algorithm (s3_checksums.py)."""
        return stored_checksum(self.fs, self._path(step_name, name), algorithm)

    def _object_checksum(self, step_name: str, name: str, algorithm: str) -> str:
        digest = new_hasher(algorithm)
        with self.fs.open(self._path(step_name, name), "rb", block_size=CHUNK) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------------ pointers

    def read_pointer(self, name: str) -> str | None:
        """The checkpoint a pointer object (`latest`, `best`) names, or None (missing or not a step name)."""
        try:  # a few bytes more than any step name: a huge object is never read whole
            data = self.fs.cat_file(self._path(name), start=0, end=MAX_POINTER_BYTES + 1)
        except OSError:
            return None
        return pointer_target(data, self.url(name), lambda value: parse_step(value) is not None)

    def write_pointer(self, name: str, target: str) -> None:
        self.fs.pipe_file(self._path(name), (target + "\n").encode())

    def delete_pointer(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------------------------ writing

    def upload(self, local_dir: Path, step_name: str, names: Iterable[str], progress: bool = False,
               on_file_done: Callable[[str], None] | None = None,
               algorithm: str = DEFAULT_CHECKSUM) -> dict[str, dict]:
        """Uploads files of `local_dir` under the checkpoint's prefix, hashing them in the same pass (overwriting
        whatever an earlier, uncommitted attempt left there). Returns {name: {"size", algorithm}}."""
        names = sorted(names)
        total = sum((local_dir / n).stat().st_size for n in names)
        with _progress_bar(total, f"upload {step_name}", progress) as bar, \
                ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_TRANSFERS, len(names)))) as pool:
            def send(name: str) -> tuple[str, dict]:
                meta = self._upload_file(local_dir / name, self._path(step_name, name), bar.update, algorithm)
                if on_file_done is not None:
                    on_file_done(name)
                return name, meta

            return dict(pool.map(send, names))

    def upload_file(self, local_dir: Path, step_name: str, name: str, algorithm: str = DEFAULT_CHECKSUM) -> dict:
        """Uploads one file of `local_dir` under the checkpoint's prefix, hashed in the same pass (no progress
        bar: a save's files uploaded one by one as they are written). Returns {"size", algorithm}."""
        return self._upload_file(local_dir / name, self._path(step_name, name), lambda _bytes: None, algorithm)

    def _upload_file(self, source: Path, target: str, advance: Callable[[int], object], algorithm: str) -> dict:
        if source.stat().st_size <= WHOLE_FILE_UPLOAD_BYTES:
            # Read once, hash, and hand the bytes to the store's own put (one request, or concurrent parts).
            data = source.read_bytes()
            digest = new_hasher(algorithm)
            digest.update(data)
            value = digest.hexdigest()
            # The store checks the body against dtrain's checksum and refuses a corrupted upload; it keeps it.
            checksum = checksum_for_store(self.fs, algorithm, value)
            if checksum:  # one PutObject (s3fs would split a large body into parts, which take no such checksum)
                self.fs.pipe_file(target, data, chunksize=WHOLE_FILE_UPLOAD_BYTES, **checksum)
            else:
                self.fs.pipe_file(target, data)
            advance(len(data))
            return {"size": len(data), algorithm: value}
        digest, size = new_hasher(algorithm), 0  # too large to hold in memory: stream it, hashing as it goes
        with open(source, "rb") as src, self.fs.open(target, "wb", block_size=STREAM_PART_BYTES) as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                advance(len(chunk))
        return {"size": size, algorithm: digest.hexdigest()}

    def check_uploaded(self, step_name: str, files: dict[str, dict]) -> None:
        """Raises OSError unless every uploaded file is in the store with the size its uploader measured."""
        sizes = self.object_sizes(step_name)
        for name, meta in sorted(files.items()):
            if sizes.get(name) != meta["size"]:
                found = "missing" if name not in sizes else f"{sizes[name]} bytes"
                raise OSError(f"{self.url(step_name, name)} is {found} after its upload of {meta['size']} bytes")

    def commit(self, step_name: str, step: int, files: dict[str, dict]) -> int:
        """Writes the manifest, create-only: from now on the prefix is a checkpoint. Returns its bytes.
        FileExistsError when the prefix already has a manifest (delete the old checkpoint first)."""
        manifest = {"format": FORMAT, "step": step, "files": dict(sorted(files.items())), "created": _now()}
        self._write_create_only(self._path(step_name, MANIFEST), json.dumps(manifest, indent=1).encode())
        self.fs.invalidate_cache()
        return sum(int(meta["size"]) for meta in files.values())

    def _write_create_only(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data, mode="create")
            return
        except (TypeError, NotImplementedError):  # a backend without conditional writes: check, then write
            pass
        self._fresh()
        if self.fs.exists(path):
            raise FileExistsError(path)
        self.fs.pipe_file(path, data)

    def delete(self, step_name: str) -> None:
        """Deletes a checkpoint: its manifest first (it stops being one), then every other object."""
        self._forget(step_name)
        try:
            self.fs.rm_file(self._path(step_name, MANIFEST))
        except FileNotFoundError:
            pass
        self.delete_objects(step_name)

    def delete_objects(self, step_name: str) -> None:
        """Deletes whatever is under a prefix (an uncommitted upload, or what `delete` left after the manifest)."""
        self._forget(step_name)
        self._fresh()
        try:
            self.fs.rm(self._path(step_name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    # ------------------------------------------------------------------------------------------ reading back

    def download(self, step_name: str, dest: Path, want: Callable[[str], bool] = lambda name: True,
                 progress: bool = False) -> Path:
        """Downloads a committed checkpoint's files (those `want` accepts) into `dest`, checking each one's size
        and checksum against the manifest; writes the manifest there too. Returns `dest`.
        Raises OSError naming the first file that does not match."""
        manifest = self.read_manifest(step_name)  # every name checked: relative, normalized, inside
        files = {name: meta for name, meta in manifest["files"].items() if want(name)}
        dest.mkdir(parents=True, exist_ok=True)
        total = sum(int(meta["size"]) for meta in files.values())
        with _progress_bar(total, f"download {step_name}", progress) as bar, \
                ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_TRANSFERS, len(files)))) as pool:
            list(pool.map(lambda item: self._download_file(step_name, item[0], item[1], dest, bar.update),
                          sorted(files.items())))
        atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=1), durable=False)
        return dest

    def _download_file(self, step_name: str, name: str, meta: dict, dest: Path,
                       advance: Callable[[int], object]) -> None:
        problem = name_problem(name)  # read_manifest refused such names already; a download never trusts that
        if problem is not None:
            raise OSError(f"{self.url(step_name)}: {problem}")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target = inside(target, dest)  # after resolving every link: below the staging dir, or refused
        part = fresh_temp_name(target)
        algorithm, expected = entry_checksum(meta) or ("sha256", None)
        digest, size = new_hasher(algorithm), 0
        with self.fs.open(self._path(step_name, name), "rb", block_size=CHUNK) as src, \
                open(create_new_file(part), "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
                advance(len(chunk))
        if size != meta.get("size") or digest.hexdigest() != expected:
            part.unlink(missing_ok=True)
            raise OSError(f"{self.url(step_name, name)} does not match the manifest "
                          f"({size} bytes, {algorithm} {digest.hexdigest()[:16]}; the manifest says "
                          f"{meta.get('size')} bytes, {str(expected)[:16]})")
        os.replace(part, target)

