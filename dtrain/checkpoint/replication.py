"""Copies of a node's local checkpoints on other nodes, sent over torch.distributed (no shared filesystem).

After node i commits `step_N` in its tier, its first process sends the files to the first process of each of the
next K nodes (i+1, ..., i+K, around the ring) and receives those of the K nodes before it. A received copy is
committed with the local commit protocol into `node_{i}/` of the receiver's tier: files into a fresh
`.tmp-step_N`, each fsynced, the manifest last, every file checked against the manifest's checksum, then the
rename and `latest`. A node that comes back empty is sent its files the same way (tier_recovery.py).

On the wire, between two ranks of a gloo group: the length of a JSON header, the header (the owner node, the
step and each file's name and size), then each file's bytes. Files are read into memory before anything is sent,
inside the save's agreed phase, so an unreadable file fails the save on every rank instead of leaving a peer
waiting in a receive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from dtrain import faults
from dtrain.checkpoint.layout import MANIFEST, step_dir_name, temp_dir_name, verify_checkpoint
from dtrain.checkpoint.names import name_problem, regular_files
from dtrain.checkpoint.storage import LocalDirectory
from dtrain.utils import fsync_path, remove_tree

# Fault-injection points of a replica being received (dtrain/faults.py).
STAGES = ("replica_started", "replica_written", "replica_renamed")


def replicate(tier, step: int) -> None:
    """Sends this node's `step_N` to the next `tier.replicas` nodes and commits the copies it receives from the
    ones before it (each node's first process; the others return at once)."""
    nodes = tier.nodes
    if not tier.replicas or not tier.is_first:
        return
    for k in range(1, tier.replicas + 1):
        to, sender = (nodes.index + k) % nodes.count, (nodes.index - k) % nodes.count
        exchange(tier, tier.location(step), nodes.index, step, nodes.first(to), nodes.first(sender))


def exchange(tier, source: Path | None, owner: int, step: int, to: int | None, sender: int | None) -> Path | None:
    """Sends the checkpoint `source` (of node `owner`) to rank `to` while receiving one from rank `sender`, and
    commits what it receives into the tier; either side may be None. Returns the committed copy, if any."""
    outgoing = _outgoing(source, owner, step) if to is not None else []
    sends = [dist.isend(tensor, to, group=tier.group) for tensor in outgoing]
    received = _receive(tier, sender) if sender is not None else None
    for work in sends:
        work.wait()
    return received


def _outgoing(source: Path, owner: int, step: int) -> list[torch.Tensor]:
    try:
        names = regular_files(source)
        payloads = [(source / name).read_bytes() for name in names]
        header = json.dumps({"owner": owner, "step": step,
                             "files": [[name, len(data)] for name, data in zip(names, payloads)]}).encode()
    except OSError as exc:  # the receiver hears why instead of waiting for files that never come
        payloads, header = [], json.dumps({"owner": owner, "step": step, "error": str(exc)}).encode()
    tensors = [torch.tensor([len(header)], dtype=torch.int64), _as_tensor(header)]
    return tensors + [_as_tensor(data) for data in payloads if data]


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _receive(tier, sender: int) -> Path:
    length = torch.zeros(1, dtype=torch.int64)
    dist.recv(length, sender, group=tier.group)
    raw = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.recv(raw, sender, group=tier.group)
    header = json.loads(bytes(raw.numpy()).decode())
    owner, step = int(header["owner"]), int(header["step"])
    if "error" in header:
        raise OSError(f"node {owner} could not send {step_dir_name(step)}: {header['error']}")
    files = [(str(name), int(size)) for name, size in header["files"]]
    directory = tier.base / f"node_{owner}"
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / temp_dir_name(step)
    if os.path.lexists(temp):
        remove_tree(temp)
    temp.mkdir()
    # Every file must be received, whatever happens to one of them, or the sender and this rank fall out of step.
    problems = [f"{name}: {name_problem(name)}" for name, _ in files if name_problem(name)]
    manifest, started = None, False
    for name, size in files:
        data = torch.empty(size, dtype=torch.uint8)
        if size:
            dist.recv(data, sender, group=tier.group)
        if name_problem(name) or problems:
            continue
        if name == MANIFEST:
            manifest = data  # written last, once every other file is on disk
            continue
        try:
            _write(temp / name, data)
        except OSError as exc:  # keep receiving: the sender waits until every file is taken
            problems.append(f"{name}: {exc.strerror or exc}")
        if not started:
            started = True
            faults.reached("replica_started", tier.rank, tier.saves_started)
    if problems or manifest is None:
        remove_tree(temp)
        raise OSError(f"the copy of {step_dir_name(step)} from node {owner} is unusable "
                      f"({'; '.join(problems) or 'it has no manifest'})")
    faults.reached("replica_written", tier.rank, tier.saves_started)
    return commit_received(temp, manifest, directory, step, tier)


def _write(path: Path, data: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def commit_received(temp: Path, manifest: torch.Tensor, directory: Path, step: int, tier) -> Path:
    """The manifest last, every file checked against it, then the rename into place and `latest`."""
    _write(temp / MANIFEST, manifest)
    for sub in {p.parent for p in temp.rglob("*")} | {temp}:
        fsync_path(sub)
    check = verify_checkpoint(temp, checksums=True)
    if not check.ok:
        remove_tree(temp)
        raise OSError(f"the copy of {step_dir_name(step)} received from node {directory.name} is damaged "
                      f"({check.reason})")
    final = directory / step_dir_name(step)
    if os.path.lexists(final):  # already kept (a re-replication after a resume): the new copy replaces it
        remove_tree(final)
    os.rename(temp, final)
    fsync_path(directory)
    faults.reached("replica_renamed", tier.rank, tier.saves_started)
    LocalDirectory(directory).write_pointer("latest", final.name)
    return final
