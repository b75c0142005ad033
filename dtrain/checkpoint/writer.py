"""Writing checkpoint files in one pass: serialise once, hash the bytes on their way to the file, flush early.

A durable checkpoint costs at least the disk's time for its bytes. Writing with `save_file`/`torch.save`, then
re-reading every file to hash it, then fsyncing adds the serialisation, the hashing and the write-back one after
the other. Here each chunk of serialised bytes is hashed on a helper thread while it is written, the kernel is
asked to start writing it back to disk right away (`sync_file_range`, where Linux has it), and each finished
file is fsynced on a helper thread while the next one is serialised, so the cost approaches the largest of
"serialise", "hash" and "disk" rather than their sum.

The files are the ones `Accelerator.save_state` writes, in the same formats: safetensors for model weights
(`safetensors.torch.save_file` with the metadata Accelerate's `save` gives it), `torch.save` for the rest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from dtrain.checksum import DEFAULT_CHECKSUM, new_hasher

CHUNK = 8 << 20  # hash/write/flush granularity: large enough for syscalls to be cheap, small enough to pipeline
HASH_ON_HELPER = 1 << 20  # smaller chunks are hashed inline: a thread hand-off would cost more than it overlaps

SAFETENSORS = "safetensors"
TORCH = "torch"
TEXT = "text"


@dataclass(frozen=True)
class FileDigest:
    size: int
    checksum: str  # lowercase hex, in `algorithm` (checksum.py)
    algorithm: str = DEFAULT_CHECKSUM


def _load_sync_file_range():
    """libc's sync_file_range (Linux): starts write-back of a byte range without waiting for it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class HashingFile:
    """A write-only file object that hashes what passes through it and starts its write-back early.

    `torch.save` writes its records through `write()` (memoryviews of the tensors' own memory, valid only during
    the call), so each large chunk is hashed on `hasher` while this thread writes it, and both finish before the
    next chunk. Write-back requests and the final fsync go to `flusher` (one thread, in order), because asking
    the kernel to write back can block while the disk's queue is full.
    """

    def __init__(self, path: Path, hasher: ThreadPoolExecutor, flusher: ThreadPoolExecutor,
                 algorithm: str = DEFAULT_CHECKSUM, fsync: bool = True):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)  # the umask decides
        self.algorithm = algorithm
        self._fsync = fsync  # False: no write-back requests, no fsync (a staging copy for an upload)
        self._sha = new_hasher(algorithm)
        self._hasher, self._flusher = hasher, flusher
        self.size = 0
        self._flushed_to = 0  # write-back has been asked for up to this offset

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = view.nbytes
        for start in range(0, total, CHUNK):
            chunk = view[start:start + CHUNK]
            hashing: Future | None = None
            if chunk.nbytes >= HASH_ON_HELPER:
                hashing = self._hasher.submit(self._sha.update, chunk)  # the hash libraries release the GIL
            else:
                self._sha.update(chunk)
            written = 0
            while written < chunk.nbytes:
                written += os.write(self._fd, chunk[written:])
            if hashing is not None:
                hashing.result()
            self.size += chunk.nbytes
            if self._fsync and _sync_file_range is not None and self.size - self._flushed_to >= CHUNK:
                self._flusher.submit(_sync_file_range, self._fd, self._flushed_to, self.size - self._flushed_to,
                                     _SYNC_FILE_RANGE_WRITE)
                self._flushed_to = self.size
        return total

    def flush(self) -> None:  # os.write is unbuffered; torch.save may call it
        pass

    def finish(self) -> Future:
        """Queues the fsync and close after the write-back requests; the future gives size and checksum."""
        digest = FileDigest(self.size, self._sha.hexdigest(), self.algorithm)
        return self._flusher.submit(self._sync_and_close, digest)

    def _sync_and_close(self, digest: FileDigest) -> FileDigest:
        try:
            if self._fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return digest

    def abort(self) -> Future:
        return self._flusher.submit(os.close, self._fd)


def _digest_and_sync(path: Path, algorithm: str, fsync: bool = True) -> FileDigest:
    """Size and checksum of a file just written by someone else (read back from the page cache), and fsync."""
    sha = new_hasher(algorithm)
    buffer = bytearray(CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        if fsync and _sync_file_range is not None:  # start the write-back of all of it before hashing it
            _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        size = 0
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while n := f.readinto(buffer):
                sha.update(memoryview(buffer)[:n])
                size += n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return FileDigest(size, sha.hexdigest(), algorithm)


def _announce(future: Future, name: str, on_file_written: Callable[[str], None] | None) -> Future:
    if on_file_written is not None:
        future.add_done_callback(lambda done: done.exception() is None and on_file_written(name))
    return future


def write_files(directory: Path, files: Iterable[tuple[str, str, Any]],
                algorithm: str = DEFAULT_CHECKSUM, fsync: bool = True,
                on_file_written: Callable[[str], None] | None = None) -> dict[str, FileDigest]:
    """Writes each (name, format, object) into `directory` in one pass; returns name -> size and checksum of
    what is now on disk (every file fsynced unless `fsync` is False; the directory itself is not).
    `on_file_written(name)` is called (on a helper thread) as soon as a file is complete and closed, while the
    next one is still being written: an object-store save starts uploading it then.

    `torch.save` and text go through a HashingFile. safetensors' own `save_file` writes tensors straight from
    their memory (its in-memory `save` would copy them twice), so that file is hashed back from the page cache
    on a helper thread while the next file is serialised.
    """
    directory = Path(directory)
    digests: dict[str, FileDigest] = {}
    with ThreadPoolExecutor(2, thread_name_prefix="dtrain-hash") as hasher, \
            ThreadPoolExecutor(1, thread_name_prefix="dtrain-flush") as flusher:
        pending: dict[str, Future] = {}
        try:
            for name, fmt, obj in files:
                path = directory / name
                if fmt == SAFETENSORS:
                    from safetensors.torch import save_file

                    save_file(obj, str(path), metadata={"format": "pt"})  # what Accelerate's save calls
                    pending[name] = _announce(hasher.submit(_digest_and_sync, path, algorithm, fsync), name,
                                              on_file_written)
                    continue
                file = HashingFile(path, hasher, flusher, algorithm, fsync)
                try:
                    if fmt == TORCH:
                        import torch

                        torch.save(obj, file)
                    elif fmt == TEXT:
                        file.write(obj.encode())
                    else:  # pragma: no cover - a programming error
                        raise ValueError(f"unknown checkpoint file format {fmt!r}")
                except BaseException:
                    file.abort()
                    raise
                pending[name] = _announce(file.finish(), name, on_file_written)  # the disk catches up meanwhile
        except BaseException:
            for future in pending.values():  # every file closed before the caller cleans up
                future.exception()
            raise
        for name, future in pending.items():
            digests[name] = future.result()
    return digests
