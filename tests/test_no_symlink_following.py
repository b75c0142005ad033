"""dtrain never writes or deletes through a symbolic link it did not create: the lock file, samples, temp files,
staging and trash entries, checkpoints that retention deletes; downloads from an object store land only below
their staging dir, whatever the keys say. Every case has decoys (a file whose content and mtime must not change,
a directory that must still exist) and checks the run's own checkpoints are intact."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from types import SimpleNamespace

import pytest
from conftest import FAST, REPO, train_in_process

from dtrain.checkpoint.local_commit import LocalCommit
from dtrain.checkpoint.object_store import ObjectStore
from dtrain.checkpoint.storage import LocalDirectory, RemoteStore
from dtrain.checkpoint.store_commit import StoreCommit
from dtrain.errors import UsageError
from dtrain.lock import RunLock
from dtrain.utils import atomic_write_text, remove_owned_tree, remove_tree
from tests.helpers.decoys import Decoys

ONE_PROCESS = SimpleNamespace(is_main_process=True, is_local_main_process=True, process_index=0,
                              local_process_index=0, num_processes=1, device="cpu")


@pytest.fixture
def decoys(tmp_path) -> Decoys:
    return Decoys(tmp_path)


@pytest.fixture
def umask():
    """Sets the process umask for a test, and puts the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# ------------------------------------------------------------------------------------------- the lock

def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, decoys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".dtrain.lock").symlink_to(decoys.file)
    with pytest.raises(UsageError, match="is a symbolic link"):
        RunLock(out, ONE_PROCESS).acquire()
    assert decoys.intact()


@pytest.mark.parametrize("mask, mode", [(0o027, 0o640), (0o002, 0o664)])
def test_files_dtrain_creates_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    lock = RunLock(tmp_path, ONE_PROCESS)
    lock.acquire()
    lock.release()
    atomic_write_text(tmp_path / "pointer", "step_000000001\n")
    for name in (".dtrain.lock", "pointer"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# ------------------------------------------------------------------------------------------- written files

def test_atomic_writes_replace_a_planted_link_and_never_write_through_a_guessable_temp_name(tmp_path, decoys):
    target = tmp_path / "latest"
    target.symlink_to(decoys.file)
    (tmp_path / f".latest.tmp-{os.getpid()}").symlink_to(decoys.dir / "keep.txt")  # the old temp name
    atomic_write_text(target, "step_000000001\n")
    assert not target.is_symlink() and target.read_text() == "step_000000001\n"
    assert decoys.intact()


def test_a_sample_is_written_beside_a_planted_link_never_through_it(tmp_path, decoys, caplog):
    from dtrain.training.evaluation import Evaluator

    evaluator = Evaluator.__new__(Evaluator)  # only the sample writing: no task data, no loader
    evaluator.accelerator = ONE_PROCESS
    evaluator.config = SimpleNamespace(train=SimpleNamespace(seed=0))
    evaluator.task = SimpleNamespace(sample=lambda model, generator: "generated text")
    evaluator.samples_dir = tmp_path / "samples"
    evaluator.samples_dir.mkdir()
    (evaluator.samples_dir / "step_000000010.txt").symlink_to(decoys.file)
    assert evaluator._write_sample(None, 10) == "generated text"
    assert (evaluator.samples_dir / "step_000000010.txt").read_text() == "generated text"
    assert decoys.intact()
    # A samples dir that is itself a link is not written into at all.
    evaluator.samples_dir = tmp_path / "samples-link"
    evaluator.samples_dir.symlink_to(decoys.dir)
    with caplog.at_level(logging.WARNING):
        evaluator._write_sample(None, 20)
    assert sorted(p.name for p in decoys.dir.iterdir()) == ["keep.txt"] and decoys.intact()


# ------------------------------------------------------------------------------------------- deletes

def test_deleting_a_link_removes_the_link_only(tmp_path, decoys):
    link = tmp_path / "step_000000010"
    link.symlink_to(decoys.dir)
    remove_tree(link)
    assert not os.path.lexists(link) and decoys.intact()
    link.symlink_to(decoys.dir)
    remove_owned_tree(link, tmp_path)
    assert not os.path.lexists(link) and decoys.intact()


def test_a_tree_outside_its_expected_parent_is_never_deleted(tmp_path, decoys):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "sub").symlink_to(decoys.dir.parent)  # staging/sub/decoy-dir is really tmp/decoy-dir
    with pytest.raises(OSError, match="refusing to delete"):
        remove_owned_tree(staging / "sub" / "decoy-dir", staging)
    assert decoys.intact()


def test_start_up_cleaning_of_a_checkpoints_dir_removes_planted_links_only(tmp_path, decoys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in (".trash-step_000000005-1234", ".tmp-step_000000010", ".latest.tmp-99"):
        (checkpoints / name).symlink_to(decoys.dir if "latest" not in name else decoys.file)
    (checkpoints / ".trash-step_000000020-replaced").symlink_to(decoys.dir)  # never "put back" as step_20
    LocalCommit(LocalDirectory(checkpoints), ONE_PROCESS, lambda point: None).clean_stale()
    assert sorted(os.listdir(checkpoints)) == [] and decoys.intact()


def test_start_up_cleaning_of_a_linked_staging_dir_deletes_only_what_dtrain_names(tmp_path, decoys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".staging").symlink_to(decoys.dir)  # also what a user gets with a staging dir on a fast disk
    (decoys.dir / "user-data").mkdir()
    (decoys.dir / "step_000000010.rank0").mkdir()  # a staging copy dtrain left there
    (decoys.dir / "restore.node0").symlink_to(tmp_path / "decoy-dir")  # a link among them: unlinked only
    commit = StoreCommit(RemoteStore("memory://no-symlinks"), ONE_PROCESS, out / ".staging", lambda point: None)
    commit.clean_stale()
    assert sorted(p.name for p in decoys.dir.iterdir()) == ["keep.txt", "user-data"] and decoys.intact()


def test_retention_of_a_step_dir_that_is_a_link_never_deletes_its_target(tmp_path, decoys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "step_000000010").symlink_to(decoys.dir)
    LocalDirectory(checkpoints).delete("step_000000010")
    assert not os.path.lexists(checkpoints / "step_000000010") and decoys.intact()


# ------------------------------------------------------------------------------------------- the code itself

def test_every_tree_delete_goes_through_the_guarded_helpers():
    """shutil.rmtree follows a link in a parent component: only utils.py may call it, behind its checks."""
    calls = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "dtrain").rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if "shutil.rmtree(" in line and path.name != "utils.py"]
    assert calls == []


def test_no_file_is_created_with_a_hard_coded_mode_or_chmod():
    """Files follow the user's umask: every os.open that creates one asks for 0o666, nothing calls chmod."""
    found = []
    for path in (REPO / "dtrain").rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"os\.open\([^)]*O_CREAT[^)]*\)", text):
            if not match.group(0).rstrip(")").endswith(("0o666", "CREATE_MODE")):
                found.append(f"{path.relative_to(REPO)}: {match.group(0)}")
        found += [f"{path.relative_to(REPO)}: chmod" for line in text.splitlines() if "chmod(" in line]
    assert found == []


# ------------------------------------------------------------------------------------------- object stores

def test_a_download_never_writes_outside_its_staging_dir(tmp_path, decoys):
    store = ObjectStore("memory://no-escape")
    dest = tmp_path / "staging" / "step_000000010"
    dest.mkdir(parents=True)
    for name in ("../../decoy.txt", "/" + str(decoys.file).lstrip("/")):
        with pytest.raises(OSError, match="absolute|normalized"):
            store._download_file("step_000000010", name, {"size": 5}, dest, lambda n: None)
    (dest / "sub").symlink_to(decoys.dir)  # a link inside the staging dir: resolved, and refused
    store.fs.pipe_file(store._path("step_000000010", "sub", "keep.txt"), b"pwned")
    with pytest.raises(OSError, match="outside"):
        store._download_file("step_000000010", "sub/keep.txt", {"size": 5}, dest, lambda n: None)
    assert decoys.intact()


def test_a_pointer_object_naming_a_path_is_ignored_with_a_warning(caplog):
    store = ObjectStore("memory://pointers")
    for content in (b"../x\n", b"/abs\n", b"step_000000001/../../x", b"x" * 10_000_000):
        store.fs.pipe_file(store._path("latest"), content)
        with caplog.at_level(logging.WARNING):
            assert store.read_pointer("latest") is None
    store.fs.pipe_file(store._path("latest"), b"step_000000001\n")
    assert store.read_pointer("latest") == "step_000000001"
    assert "ignoring the pointer memory://pointers/latest" in caplog.text


ARGS = [*FAST, "--save-every-steps", "10", "--max-steps", "20"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_hostile_keys_in_a_store_manifest_are_skipped_and_written_nowhere(s3_bucket, tmp_path, caplog):
    """Keys `step_N/../../<tmp>/pwned.sh` and `step_N//<tmp>/pwned-abs.sh`, listed in the manifest with their
    real sizes and checksums: `--resume latest` passes over step_N with a warning and resumes the one before.
    The run's staging dir is a link to another disk throughout: only dtrain's own entries there are deleted."""
    import boto3

    from dtrain.checksum import new_hasher

    decoys = Decoys(tmp_path)
    uri, out = f"{s3_bucket}/run", tmp_path / "run"
    out.mkdir()
    fast_disk = tmp_path / "fast-disk"
    fast_disk.mkdir()
    (fast_disk / "other-users-data").mkdir()
    (out / ".staging").symlink_to(fast_disk)
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri) == 0
    assert sorted(p.name for p in fast_disk.iterdir()) == ["other-users-data"]

    store = ObjectStore(uri)
    payload = b"#!/bin/sh\necho pwned\n"
    digest = new_hasher("crc32c")
    digest.update(payload)
    relative = "../" * 30 + str(tmp_path / "pwned.sh").lstrip("/")
    absolute = "/" + str(tmp_path / "pwned-abs.sh").lstrip("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    manifest = json.loads(store.read_bytes("step_000000020", "manifest.json"))
    for name in (relative, absolute):
        s3.put_object(Bucket="dtrain-test", Key=f"run/step_000000020/{name}", Body=payload)
        manifest["files"][name] = {"size": len(payload), "crc32c": digest.hexdigest()}
    store.fs.pipe_file(store._path("step_000000020", "manifest.json"), json.dumps(manifest).encode())

    caplog.set_level(logging.INFO)
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri, "--resume", "latest") == 0
    assert "skipping damaged checkpoint step_000000020: manifest.json lists an unsafe entry" in caplog.text
    assert f"resumed from {uri}/step_000000010" in caplog.text
    assert not (tmp_path / "pwned.sh").exists() and not (tmp_path / "pwned-abs.sh").exists()
    assert store.verify("step_000000010", checksums=True).ok and store.verify("step_000000020", checksums=True).ok
    assert sorted(p.name for p in fast_disk.iterdir()) == ["other-users-data"] and decoys.intact()


def test_metrics_files_are_never_appended_through_a_planted_link(tmp_path):
    from dtrain.training.metrics import MetricsLog

    decoy = tmp_path / "decoy.txt"
    decoy.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(decoy)
    metrics = MetricsLog(out)
    from dtrain.errors import UsageError

    with pytest.raises(UsageError, match="metrics.jsonl is a symbolic link"):
        metrics.event("start", 0)
    assert decoy.read_text() == "keep me\n"
