"""The object-store layer on its own: upload, manifest-last commit, verification, download, deletes, pointers.

Each behaviour runs against fsspec's in-memory store and against S3 as served by moto on loopback.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dtrain.checkpoint.location import is_uri, local_path
from dtrain.checkpoint.object_store import ObjectStore, open_filesystem
from dtrain.errors import UsageError


@pytest.fixture(params=["memory", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "memory":
        uri = f"memory://bucket-{uuid.uuid4().hex[:8]}/run/checkpoints"
        store = ObjectStore(uri)
        yield store
        if store.fs.exists(store.root):  # memory:// lives as long as the process
            store.fs.rm(store.root, recursive=True)
    else:
        yield ObjectStore(request.getfixturevalue("s3_bucket") + "/run/checkpoints")


def staged_files(directory: Path, seed: int = 0) -> dict[str, bytes]:
    """What save_state would leave in a staging dir (names and sizes alike; contents random)."""
    import random

    rnd = random.Random(seed)
    files = {"model.safetensors": rnd.randbytes(70_000), "optimizer.bin": rnd.randbytes(1234),
             "random_states_0.pkl": rnd.randbytes(300), "random_states_1.pkl": rnd.randbytes(301),
             "trainer_state.json": json.dumps({"global_step": 10, "checkpoint_metric": {"name": "val_loss",
                                                                                         "value": 1.5}}).encode()}
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def commit_checkpoint(store: ObjectStore, staging: Path, step: int = 10) -> dict[str, bytes]:
    files = staged_files(staging, seed=step)
    name = f"step_{step:09d}"
    uploaded = store.upload(staging, name, files)
    store.check_uploaded(name, uploaded)
    store.commit(name, step, uploaded)
    return files


def test_upload_then_manifest_makes_a_verified_checkpoint_with_sizes_and_checksums(store, tmp_path):
    files = commit_checkpoint(store, tmp_path / "staging")
    assert store.step_names() == ["step_000000010"]
    check = store.verify("step_000000010", checksums=True)
    assert check.ok, check.reason
    assert check.bytes == sum(len(data) for data in files.values())
    manifest = store.read_manifest("step_000000010")
    assert manifest["format"] == "dtrain-checkpoint/1" and manifest["step"] == 10
    import crc32c

    assert manifest["files"]["model.safetensors"] == {
        "size": 70_000, "crc32c": f"{crc32c.crc32c(files['model.safetensors']):08x}"}
    assert store.read_trainer_state("step_000000010")["global_step"] == 10


def test_a_prefix_without_manifest_is_not_a_checkpoint(store, tmp_path):
    files = staged_files(tmp_path / "staging")
    store.upload(tmp_path / "staging", "step_000000010", files)  # the save died before its manifest
    assert store.step_names() == ["step_000000010"]
    check = store.verify("step_000000010")
    assert not check.ok and "manifest.json is missing" in check.reason


def test_a_missing_or_resized_object_breaks_the_checkpoint(store, tmp_path):
    commit_checkpoint(store, tmp_path / "a", step=10)
    commit_checkpoint(store, tmp_path / "b", step=20)
    store.fs.rm_file(store._path("step_000000010", "optimizer.bin"))
    store.fs.pipe_file(store._path("step_000000020", "random_states_1.pkl"), b"short")
    assert store.verify("step_000000010").reason == "optimizer.bin is missing"
    assert store.verify("step_000000020").reason == "random_states_1.pkl has 5 bytes, the manifest says 301"


def test_changed_bytes_of_the_same_size_are_caught_by_checksums_and_by_download(store, tmp_path):
    files = commit_checkpoint(store, tmp_path / "staging")
    flipped = bytes([files["optimizer.bin"][0] ^ 1]) + files["optimizer.bin"][1:]
    store.fs.pipe_file(store._path("step_000000010", "optimizer.bin"), flipped)
    assert store.verify("step_000000010").ok  # sizes alone cannot see it
    assert "does not match its crc32c" in store.verify("step_000000010", checksums=True).reason
    with pytest.raises(OSError, match="optimizer.bin does not match the manifest"):
        store.download("step_000000010", tmp_path / "restore")
    assert not (tmp_path / "restore" / "optimizer.bin").exists()


def test_download_brings_back_the_wanted_files_byte_for_byte(store, tmp_path):
    files = commit_checkpoint(store, tmp_path / "staging")
    dest = store.download("step_000000010", tmp_path / "restore", want=lambda name: name != "random_states_1.pkl")
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [n for n in files if n != "random_states_1.pkl"] + ["manifest.json"])
    for name in files:
        if name != "random_states_1.pkl":
            assert (dest / name).read_bytes() == files[name]


def test_the_manifest_is_written_create_only(store, tmp_path):
    files = commit_checkpoint(store, tmp_path / "staging")
    with pytest.raises(FileExistsError):
        store.commit("step_000000010", 10, {n: {"size": len(d), "sha256": "0"} for n, d in files.items()})
    assert store.verify("step_000000010", checksums=True).ok  # the first commit stands


def test_files_too_large_for_memory_are_streamed_in_parts_with_the_same_result(store, tmp_path, monkeypatch):
    import dtrain.checkpoint.object_store as object_store

    monkeypatch.setattr(object_store, "WHOLE_FILE_UPLOAD_BYTES", 1000)  # every file but the small ones streams
    monkeypatch.setattr(object_store, "CHUNK", 4096)
    files = commit_checkpoint(store, tmp_path / "staging")
    assert store.verify("step_000000010", checksums=True).ok
    assert store.read_bytes("step_000000010", "model.safetensors") == files["model.safetensors"]


def test_a_retried_upload_overwrites_the_objects_of_the_failed_attempt(store, tmp_path):
    staged_files(tmp_path / "first", seed=1)
    store.upload(tmp_path / "first", "step_000000010", ["model.safetensors", "optimizer.bin"])  # died here
    files = commit_checkpoint(store, tmp_path / "second", step=10)
    assert store.verify("step_000000010", checksums=True).ok
    assert store.read_bytes("step_000000010", "model.safetensors") == files["model.safetensors"]


def test_upload_size_check_names_an_object_that_is_not_there(store, tmp_path):
    files = staged_files(tmp_path / "staging")
    uploaded = store.upload(tmp_path / "staging", "step_000000010", files)
    store.fs.rm_file(store._path("step_000000010", "random_states_1.pkl"))
    with pytest.raises(OSError, match="random_states_1.pkl is missing after its upload"):
        store.check_uploaded("step_000000010", uploaded)


def test_delete_removes_the_manifest_first(store, tmp_path, monkeypatch):
    commit_checkpoint(store, tmp_path / "a", step=10)
    commit_checkpoint(store, tmp_path / "b", step=20)
    store.delete("step_000000010")
    assert store.step_names() == ["step_000000020"]

    def crash(step_name):  # the process dies after the manifest went, before the other objects did
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "delete_objects", crash)
    with pytest.raises(KeyboardInterrupt):
        store.delete("step_000000020")
    assert store.step_names() == ["step_000000020"]
    assert "manifest.json is missing" in store.verify("step_000000020").reason


def test_pointer_objects_name_a_checkpoint_or_nothing(store):
    assert store.read_pointer("latest") is None
    store.write_pointer("latest", "step_000000020")
    assert store.read_pointer("latest") == "step_000000020"
    store.fs.pipe_file(store._path("best"), b"not a step\n")
    assert store.read_pointer("best") is None
    store.delete_pointer("latest")
    assert store.read_pointer("latest") is None


def test_listing_is_ordered_by_step_and_ignores_other_objects(store, tmp_path):
    for step in (100, 20, 3):
        commit_checkpoint(store, tmp_path / str(step), step=step)
    store.write_pointer("latest", "step_000000100")
    store.fs.pipe_file(store._path("notes.txt"), b"hello")
    assert store.step_names() == ["step_000000003", "step_000000020", "step_000000100"]


def test_an_empty_or_absent_prefix_has_no_checkpoints(store):
    assert store.step_names() == []
    assert not store.verify("step_000000010").ok


def test_uri_or_path():
    assert is_uri("s3://bucket/prefix") and is_uri("memory://x") and is_uri("gs://b/p")
    assert not is_uri("runs/x/checkpoints") and not is_uri("/abs/path") and not is_uri("file:///abs/path")
    assert local_path("file:///abs/path") == Path("/abs/path")
    assert local_path("runs/x") == Path("runs/x")


def test_a_missing_s3_client_is_one_usage_error_naming_the_extra(monkeypatch):
    import sys

    import fsspec.registry  # noqa: F401 - the module, which the package's `registry` attribute hides

    monkeypatch.setitem(sys.modules, "s3fs", None)  # what an environment without the extra looks like
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(UsageError, match=r'checkpoint_dir.*pip install -e "\.\[s3\]"'):
        open_filesystem("s3://bucket/prefix")


def test_large_transfers_show_a_progress_bar_when_asked(store, tmp_path, monkeypatch, capsys):
    import dtrain.checkpoint.object_store as object_store

    files = staged_files(tmp_path / "staging")
    store.upload(tmp_path / "staging", "step_000000010", files, progress=True)
    assert "upload step_000000010" not in capsys.readouterr().err  # below the size that is worth a bar
    monkeypatch.setattr(object_store, "PROGRESS_MIN_BYTES", 1000)
    store.upload(tmp_path / "staging", "step_000000010", files, progress=False)  # not the main process
    assert "upload step_000000010" not in capsys.readouterr().err
    store.upload(tmp_path / "staging", "step_000000010", files, progress=True)
    assert "upload step_000000010" in capsys.readouterr().err


def test_the_start_up_check_is_about_what_every_node_must_share(tmp_path):
    from dtrain.training.shared_dir import directory_every_node_must_see

    out = tmp_path / "run"
    assert directory_every_node_must_see(out, out / "checkpoints") == out.absolute()  # the default
    assert directory_every_node_must_see(out, tmp_path / "shared" / "ckpts") == (tmp_path / "shared" / "ckpts")
    assert directory_every_node_must_see(out, None) is None  # an object store: nothing local is shared


# ------------------------------------------------------------------------------------- the store's checksums

def test_s3_keeps_dtrains_crc32c_and_verify_compares_it_without_downloading(s3_bucket, tmp_path, monkeypatch):
    import base64

    import crc32c

    store = ObjectStore(f"{s3_bucket}/native")
    files = commit_checkpoint(store, tmp_path / "staging")
    bucket, key, _ = store.fs.split_path(store._path("step_000000010", "model.safetensors"))
    head = store.fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    # moto accepts any precomputed value, so the test checks what the store kept: dtrain's, of the right bytes
    assert base64.b64decode(head["ChecksumCRC32C"]).hex() == f"{crc32c.crc32c(files['model.safetensors']):08x}"

    def no_reading(*args, **kwargs):
        raise AssertionError("verify read an object whose checksum the store keeps")

    monkeypatch.setattr(store, "_object_checksum", no_reading)
    assert store.verify("step_000000010", checksums=True).ok
    # An object replaced behind dtrain's back has no CRC32C of dtrain's: it is read, and the change found.
    monkeypatch.undo()
    flipped = bytes([files["optimizer.bin"][0] ^ 1]) + files["optimizer.bin"][1:]
    store.fs.pipe_file(store._path("step_000000010", "optimizer.bin"), flipped)
    assert "optimizer.bin does not match its crc32c" in store.verify("step_000000010", checksums=True).reason


def test_checksums_only_when_required_sends_none_to_the_store(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    store = ObjectStore(f"{s3_bucket}/plain")
    commit_checkpoint(store, tmp_path / "staging")
    assert store.stored_checksum("step_000000010", "model.safetensors", "crc32c") is None
    assert store.verify("step_000000010", checksums=True).ok  # read back and compared instead
