"""The one-pass commit: files hashed while written are exactly what `save_state` writes, and the manifest's
checksums are those of the bytes on disk."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from torch import nn

from conftest import load_weights, same_tensors
from dtrain.checkpoint import CheckpointManager
from dtrain.checkpoint.layout import MANIFEST, verify_checkpoint
from dtrain.checkpoint.writer import SAFETENSORS, TEXT, TORCH, write_files


def _prepared(seed: int = 0):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(2):  # a filled optimizer state and a moved scheduler
        accelerator.backward(model(torch.randn(4, 64)).square().mean())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return accelerator, model, optimizer, scheduler


def reference_checksum(path: Path, algorithm: str) -> str:
    """The file's checksum computed in one call by the algorithm's own library (the CONTRACT's hex form)."""
    data = path.read_bytes()
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    if algorithm == "crc32c":
        import crc32c

        return f"{crc32c.crc32c(data):08x}"
    if algorithm == "crc64nvme":
        from awscrt import checksums

        return f"{checksums.crc64nvme(data):016x}"
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128(data).hexdigest()
    import blake3

    return blake3.blake3(data).hexdigest()


@pytest.mark.parametrize("algorithm", ["crc32c", "crc64nvme", "xxh3_128", "blake3", "sha256"])
def test_write_files_returns_the_size_and_checksum_of_what_is_on_disk(tmp_path, algorithm):
    big = {"w": torch.randn(1024, 1024), "b": torch.arange(10)}  # 4 MB: hashed on the helper thread, in chunks
    digests = write_files(tmp_path, [("model.safetensors", SAFETENSORS, {"w": big["w"]}),
                                     ("state.bin", TORCH, big), ("note.json", TEXT, '{"a": 1}')], algorithm)
    assert set(digests) == {"model.safetensors", "state.bin", "note.json"}
    for name, digest in digests.items():
        assert digest.size == (tmp_path / name).stat().st_size
        assert (digest.algorithm, digest.checksum) == (algorithm, reference_checksum(tmp_path / name, algorithm))
    assert torch.equal(torch.load(tmp_path / "state.bin", weights_only=True)["w"], big["w"])


def test_sync_commit_writes_the_files_save_state_writes_and_plain_accelerate_loads_them(tmp_path,
                                                                                        fresh_accelerate_state):
    accelerator, model, optimizer, scheduler = _prepared()
    reference = tmp_path / "save_state"
    accelerator.save_state(str(reference))
    report = CheckpointManager(accelerator, tmp_path / "checkpoints").save(7, {"global_step": 7})
    checkpoint = report.path
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
        [p.name for p in reference.iterdir()] + ["trainer_state.json", MANIFEST])
    # The safetensors file is byte for byte Accelerate's; the torch.save'd ones hold the same state.
    assert (checkpoint / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        assert _nested_equal(accelerate_load(checkpoint / name), accelerate_load(reference / name)), name
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        # the default checksum: CRC32C, 8 hex digits
        assert meta == {"size": (checkpoint / name).stat().st_size,
                        "crc32c": reference_checksum(checkpoint / name, "crc32c")}, name
    assert report.bytes == sum(meta["size"] for meta in manifest["files"].values())
    assert verify_checkpoint(checkpoint, checksums=True).ok

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator.backward(model(torch.randn(4, 64)).square().mean())
    optimizer.step()  # move away from the checkpoint, then load it back with plain Accelerate
    accelerator.load_state(str(checkpoint))
    assert same_tensors(model.state_dict(), weights)
    assert same_tensors(load_weights(checkpoint), weights)


class _Counter:
    def __init__(self):
        self.count = 3

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_objects_only_save_state_knows_are_still_saved_and_listed(tmp_path, fresh_accelerate_state):
    accelerator, *_ = _prepared()
    accelerator.register_for_checkpointing(_Counter())
    report = CheckpointManager(accelerator, tmp_path / "checkpoints").save(3, {"global_step": 3})
    manifest = json.loads((report.path / MANIFEST).read_text())
    assert "custom_checkpoint_0.pkl" in manifest["files"]
    assert verify_checkpoint(report.path, checksums=True).ok


def _nested_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    try:
        import numpy as np

        if isinstance(a, np.ndarray):
            return np.array_equal(a, b)
    except ImportError:  # pragma: no cover
        pass
    return a == b


@pytest.mark.parametrize("async_save", [False, True])
def test_a_file_changed_after_it_was_hashed_is_hashed_again_from_disk(tmp_path, fresh_accelerate_state, async_save):
    from dtrain.checkpoint import manager as manager_module

    accelerator, *_ = _prepared()
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints", async_save=async_save)
    original = manager_module.CheckpointManager._write_snapshot

    def write_then_append(self, temp, state, snapshot):
        original(self, temp, state, snapshot)
        with open(temp / "trainer_state.json", "a") as f:  # a size the writer did not see
            f.write("\n")

    manager_module.CheckpointManager._write_snapshot = write_then_append
    try:
        manager.save(5, {"global_step": 5})
        report = manager.wait() if async_save else None
    finally:
        manager_module.CheckpointManager._write_snapshot = original
    path = tmp_path / "checkpoints" / "step_000000005"
    assert verify_checkpoint(path, checksums=True).ok
    assert report is None or report.step == 5


def test_a_staging_copy_for_an_upload_is_not_fsynced_and_a_local_checkpoint_is(tmp_path, monkeypatch):
    import dtrain.checkpoint.writer as writer_module

    synced = []
    monkeypatch.setattr(writer_module.os, "fsync", lambda fd: synced.append(fd))
    files = [("model.safetensors", SAFETENSORS, {"w": torch.randn(64, 64)}), ("state.bin", TORCH, {"a": 1})]
    (tmp_path / "a").mkdir()
    write_files(tmp_path / "a", files, fsync=False)
    assert synced == []  # the upload, then the manifest in the store, is what makes it durable
    (tmp_path / "b").mkdir()
    write_files(tmp_path / "b", files)
    assert len(synced) == 2


def test_each_written_file_is_announced_once_it_is_complete_on_disk(tmp_path):
    announced = {}
    files = [("model.safetensors", SAFETENSORS, {"w": torch.randn(256, 256)}), ("state.bin", TORCH, {"a": 1}),
             ("trainer_state.json", TEXT, "{}")]
    digests = write_files(tmp_path, files, fsync=False,
                          on_file_written=lambda name: announced.setdefault(name, (tmp_path / name).stat().st_size))
    deadline = time.monotonic() + 10  # the last callback may run just after write_files returns
    while len(announced) < len(files) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert announced == {name: digest.size for name, digest in digests.items()}


def test_an_object_store_save_uploads_rank_0s_files_as_they_are_written(s3_bucket, tmp_path, monkeypatch,
                                                                       fresh_accelerate_state):
    from dtrain.checkpoint.object_store import ObjectStore

    accelerator, *_ = _prepared()
    one_by_one, batched = [], []
    upload_file, upload = ObjectStore.upload_file, ObjectStore.upload
    monkeypatch.setattr(ObjectStore, "upload_file",
                        lambda self, *a, **k: one_by_one.append(a[2]) or upload_file(self, *a, **k))
    monkeypatch.setattr(ObjectStore, "upload", lambda self, d, s, names, **k: batched.extend(names) or
                        upload(self, d, s, names, **k))
    manager = CheckpointManager(accelerator, f"{s3_bucket}/early", staging_dir=tmp_path / "staging")
    manager.save(5, {"global_step": 5})
    store = ObjectStore(f"{s3_bucket}/early")
    listed = store.read_manifest("step_000000005")["files"]
    assert sorted(one_by_one) == sorted(listed) and batched == []  # every file went up while the save wrote
    assert store.verify("step_000000005", checksums=True).ok


def test_a_failed_early_upload_fails_the_save_and_commits_nothing(s3_bucket, tmp_path, monkeypatch,
                                                                 fresh_accelerate_state):
    from dtrain.checkpoint.object_store import ObjectStore
    from dtrain.errors import CheckpointError

    accelerator, *_ = _prepared()
    manager = CheckpointManager(accelerator, f"{s3_bucket}/failed", staging_dir=tmp_path / "staging")
    manager.save(5, {"global_step": 5})
    upload_file = ObjectStore.upload_file

    def fail_the_optimizer(self, local_dir, step_name, name, *args, **kwargs):
        if name.startswith("optimizer"):
            raise OSError("the store refused the body")
        return upload_file(self, local_dir, step_name, name, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "upload_file", fail_the_optimizer)
    with pytest.raises(CheckpointError, match="the store refused the body"):
        manager.save(6, {"global_step": 6})
    store = ObjectStore(f"{s3_bucket}/failed")
    assert not store.has_manifest("step_000000006") and store.read_pointer("latest") == "step_000000005"
    assert list((tmp_path / "staging").iterdir()) == []  # nothing left reading or written in staging
    monkeypatch.setattr(ObjectStore, "upload_file", upload_file)
    manager.save(6, {"global_step": 6})  # the retry deletes what the failed attempt uploaded, then commits
    assert store.verify("step_000000006", checksums=True).ok
