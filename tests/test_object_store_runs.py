"""Training with `--checkpoint-dir s3://...` (moto on loopback): saves, retention, resume targets, damaged
checkpoints, kill -9 during the upload, two ranks with async saves, the checkpoint tools on a URI."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, load_weights, same_tensors, train_cmd, train_in_process

from dtrain.checkpoint.object_store import ObjectStore
from dtrain.commands.cli import main as cli_main

ARGS = [*FAST, "--save-every-steps", "10", "--max-steps", "30"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def store_weights(store: ObjectStore, name: str) -> dict:
    from safetensors.torch import load

    return load(store.read_bytes(name, "model.safetensors"))


def assert_consistent(store: ObjectStore) -> list[str]:
    """Every prefix that has a manifest verifies with checksums; `latest` and `best` name one of them.
    Returns the committed checkpoints."""
    committed = [name for name in store.step_names() if store.has_manifest(name)]
    for name in committed:
        check = store.verify(name, checksums=True)
        assert check.ok, f"{name}: {check.reason}"
    assert store.read_pointer("latest") in committed, (store.read_pointer("latest"), committed)
    assert store.read_pointer("best") in (None, *committed)
    return committed


def assert_nothing_local(out: Path) -> None:
    assert not (out / "checkpoints").exists()
    assert not any((out / ".staging").iterdir()), "staging copies are removed once committed or loaded"


@pytest.fixture
def straight_30(tmp_path_factory) -> dict:
    """Weights at step 30 of an uninterrupted run with local checkpoints (the reference)."""
    out = tmp_path_factory.mktemp("straight")
    assert train_in_process(*ARGS, "--output-dir", str(out)) == 0
    return load_weights(out / "checkpoints" / "step_000000030")


# ------------------------------------------------------------------------------------------------ kill -9

KILL_STAGES = ("upload_started", "uploaded", "manifest_written", "pointers_written", "retention_done")


def test_kill_9_during_the_upload_leaves_only_committed_checkpoints_and_resumes_exactly(
        runner, s3_bucket, tmp_path, straight_30, capsys):
    """SIGKILL inside the 2nd save (step 20) at each point of the object-store commit."""
    procs = {}
    for stage in KILL_STAGES:
        uri, out = f"{s3_bucket}/{stage}", tmp_path / stage
        procs[stage] = (uri, out, runner.start(train_cmd(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri),
                                               DTRAIN_FAULT_AT=stage, DTRAIN_FAULT_AFTER_SAVES="1"))
    for stage, (_, _, proc) in procs.items():
        try:
            output, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{stage}: the faulted run did not die")
        assert proc.returncode == -9, f"{stage}: the fault did not fire (rc {proc.returncode})\n{output[-3000:]}"

    for stage, (uri, out, _) in procs.items():
        store = ObjectStore(uri)
        committed = assert_consistent(store)
        in_store = KILL_STAGES.index(stage) >= KILL_STAGES.index("manifest_written")
        assert committed == (["step_000000010", "step_000000020"] if in_store else ["step_000000010"]), stage
        if not in_store:  # the objects uploaded so far are there, without a manifest: not a checkpoint
            assert store.step_names() == ["step_000000010", "step_000000020"], stage
        pointed = "step_000000020" if KILL_STAGES.index(stage) >= KILL_STAGES.index("pointers_written") \
            else "step_000000010"
        assert store.read_pointer("latest") == pointed, stage

        code = train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri, "--resume", "latest")
        assert code == 0, f"{stage}: {capsys.readouterr().err[-3000:]}"
        assert assert_consistent(store) == ["step_000000010", "step_000000020", "step_000000030"], stage
        assert store.step_names() == ["step_000000010", "step_000000020", "step_000000030"], \
            f"{stage}: the uncommitted upload was not cleaned up"
        assert store.read_pointer("latest") == "step_000000030"
        assert same_tensors(store_weights(store, "step_000000030"), straight_30), \
            f"{stage}: resuming after the crash did not reproduce the uninterrupted run"
        assert_nothing_local(out)


# ------------------------------------------------------------------------------------------------ resume targets

def test_resume_latest_best_auto_and_a_uri_from_the_store(s3_bucket, tmp_path, straight_30, capsys, caplog):
    caplog.set_level(logging.INFO)
    uri, out = f"{s3_bucket}/run", tmp_path / "run"
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri, "--keep-last", "2") == 0
    store = ObjectStore(uri)
    best = store.read_pointer("best")
    committed = assert_consistent(store)
    assert committed[-2:] == ["step_000000020", "step_000000030"] and set(committed) <= {best, *committed[-2:]}
    assert same_tensors(store_weights(store, "step_000000030"), straight_30)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["path"] for e in events if e.get("event") == "checkpoint"][-1] == f"{uri}/step_000000030"

    # A fresh start in a store that holds checkpoints is refused, as in a directory; --resume auto continues.
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri) == 2
    assert f"{uri} already holds" in capsys.readouterr().err
    caplog.clear()
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri, "--resume", "auto") == 0
    assert f"resumed from {uri}/step_000000030" in caplog.text

    # --resume PATH as a URI: a checkpoint of the store, into another run whose checkpoints go elsewhere.
    other = tmp_path / "other"
    caplog.clear()
    assert train_in_process(*ARGS, "--output-dir", str(other), "--resume", f"{uri}/step_000000020") == 0
    assert f"resumed from {uri}/step_000000020" in caplog.text
    assert same_tensors(load_weights(other / "checkpoints" / "step_000000030"), straight_30)
    caplog.clear()
    assert train_in_process(*ARGS, "--output-dir", str(tmp_path / "third"), "--resume", uri) == 0
    assert f"resumed from {uri}/step_000000030" in caplog.text

    caplog.clear()
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri, "--resume", "best") == 0
    assert f"resumed from {uri}/{best}" in caplog.text

    caplog.clear()
    assert train_in_process(*ARGS, "--output-dir", str(tmp_path / "fresh"), "--checkpoint-dir", f"{s3_bucket}/new",
                            "--resume", "auto") == 0
    assert "resumed from" not in caplog.text
    assert train_in_process(*ARGS, "--output-dir", str(tmp_path / "x"), "--resume", f"{s3_bucket}/nothing/step_000000010") == 2
    assert "is not a usable checkpoint (manifest.json is missing" in capsys.readouterr().err


def test_a_damaged_newest_is_skipped_with_a_warning(s3_bucket, tmp_path, straight_30, caplog):
    caplog.set_level(logging.INFO)
    uri, out = f"{s3_bucket}/run", tmp_path / "run"
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri) == 0
    store = ObjectStore(uri)
    store.fs.rm_file(store._path("step_000000030", "manifest.json"))  # objects without a manifest
    store.fs.rm_file(store._path("step_000000020", "optimizer.bin"))  # a missing object
    caplog.clear()
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri, "--resume", "latest") == 0
    err = caplog.text
    assert "skipping damaged checkpoint step_000000030: manifest.json is missing" in err
    assert "skipping damaged checkpoint step_000000020: optimizer.bin is missing" in err
    assert f"resumed from {uri}/step_000000010" in err
    assert assert_consistent(store) == ["step_000000010", "step_000000020", "step_000000030"]
    assert same_tensors(store_weights(store, "step_000000030"), straight_30)


def test_a_checksum_mismatch_in_the_store_refuses_the_resume_before_or_while_downloading(s3_bucket, tmp_path, capsys):
    uri, out = f"{s3_bucket}/run", tmp_path / "run"
    assert train_in_process(*ARGS, "--max-steps", "10", "--output-dir", str(out), "--checkpoint-dir", uri) == 0
    store = ObjectStore(uri)
    data = bytearray(store.read_bytes("step_000000010", "optimizer.bin"))
    data[-1] ^= 1
    store.fs.pipe_file(store._path("step_000000010", "optimizer.bin"), bytes(data))  # same size, other bytes
    capsys.readouterr()
    assert train_in_process(*ARGS, "--max-steps", "10", "--output-dir", str(out), "--checkpoint-dir", uri,
                            "--resume", "latest") == 2  # found before anything is loaded (checked by default)
    assert "step_000000010: optimizer.bin does not match its crc32c in the manifest" in capsys.readouterr().err
    # Without that check, the download still compares every file with the manifest.
    assert train_in_process(*ARGS, "--max-steps", "10", "--output-dir", str(out), "--checkpoint-dir", uri,
                            "--resume", "latest", "--no-verify-checksums") == 2
    assert "optimizer.bin does not match the manifest" in capsys.readouterr().err
    assert store.verify("step_000000010").ok, "nothing was deleted"


# ------------------------------------------------------------------------------------------------ two ranks

@pytest.mark.slow
def test_two_ranks_with_async_saves_commit_in_the_store_and_resume_exactly(runner, s3_bucket, tmp_path):
    args = [*FAST, "--save-every-steps", "10", "--max-steps", "40", "--eval-every-steps", "0", "--keep-last", "2"]
    uri, out, straight = f"{s3_bucket}/ranks", tmp_path / "ranks", tmp_path / "straight"
    reference = runner.start(train_cmd(*args, "--output-dir", str(straight), processes=2))
    # The 3rd save (step 30) dies on both ranks once their files are uploaded, before any manifest.
    faulted = runner.run(train_cmd(*args, "--output-dir", str(out), "--checkpoint-dir", uri, "--async-save",
                                   processes=2), timeout=240, DTRAIN_FAULT_AT="uploaded", DTRAIN_FAULT_AFTER_SAVES="2")
    assert faulted.returncode != 0
    store = ObjectStore(uri)
    assert assert_consistent(store) == ["step_000000010", "step_000000020"]
    manifest_files = set(store.read_manifest("step_000000020")["files"])
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= manifest_files

    resumed = runner.run(train_cmd(*args, "--output-dir", str(out), "--checkpoint-dir", uri, "--async-save",
                                   "--resume", "latest", processes=2), timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert reference.wait(timeout=240) == 0, reference.communicate()[0][-3000:]
    assert assert_consistent(store) == ["step_000000030", "step_000000040"]  # --keep-last 2; best is step 40
    assert store.step_names() == ["step_000000030", "step_000000040"]
    assert same_tensors(store_weights(store, "step_000000040"),
                        load_weights(straight / "checkpoints" / "step_000000040"))
    assert_nothing_local(out)


# ------------------------------------------------------------------------------------------------ dtrain ckpt

def test_ckpt_commands_accept_a_uri(s3_bucket, tmp_path, capsys):
    uri = f"{s3_bucket}/tools"
    assert train_in_process(*ARGS, "--output-dir", str(tmp_path / "run"), "--checkpoint-dir", uri) == 0
    store = ObjectStore(uri)
    capsys.readouterr()

    assert cli_main(["ckpt", "list", uri, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["step_000000010", "step_000000020", "step_000000030"]
    assert all(r["complete"] for r in rows) and rows[-1]["latest"]

    assert cli_main(["ckpt", "show", uri, "--json", "--checksums"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == f"{uri}/step_000000030" and info["complete"] and info["step"] == 30
    assert set(info["manifest_files"]) < set(info["files"]) and "manifest.json" in info["files"]

    assert cli_main(["ckpt", "verify", f"{uri}/step_000000020"]) == 0
    assert "every checksum matches" in capsys.readouterr().out
    store.fs.pipe_file(store._path("step_000000020", "scheduler.bin"), b"x")
    assert cli_main(["ckpt", "verify", f"{uri}/step_000000020"]) == 1
    assert "scheduler.bin has 1 bytes" in capsys.readouterr().out

    out_file = tmp_path / "model.safetensors"
    assert cli_main(["ckpt", "export", uri, "--which", "latest", "--out", str(out_file)]) == 0
    assert same_tensors(load_weights_file(out_file), store_weights(store, "step_000000030"))
    from dtrain.commands.export import read_export_metadata

    assert read_export_metadata(out_file)["source"] == f"{uri}/step_000000030"

    assert cli_main(["ckpt", "prune", uri, "--keep-last", "1", "--dry-run"]) == 0
    assert len(store.step_names()) == 3
    assert cli_main(["ckpt", "prune", uri, "--keep-last", "1"]) == 0
    kept = store.step_names()
    assert "step_000000030" in kept and "step_000000020" not in kept  # damaged or not, it was not kept
    assert store.read_pointer("best") in kept


def load_weights_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_an_s3_uri_without_the_s3_extra_is_one_usage_error(tmp_path, monkeypatch, capsys):
    import sys

    import fsspec.registry  # noqa: F401 - the module, which the package's `registry` attribute hides

    monkeypatch.setitem(sys.modules, "s3fs", None)  # what an environment without the extra looks like
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    out = tmp_path / "run"
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", "s3://bucket/run") == 2
    err = capsys.readouterr().err
    assert err.count("dtrain: error:") == 1 and 'pip install -e ".[s3]"' in err and "Traceback" not in err


def test_a_resume_from_an_older_checkpoint_starts_a_lineage_in_the_store(s3_bucket, tmp_path, capsys):
    uri, out = f"{s3_bucket}/lineage", tmp_path / "run"
    assert train_in_process(*ARGS, "--output-dir", str(out), "--checkpoint-dir", uri) == 0
    store = ObjectStore(uri)
    first_run = store.read_trainer_state("step_000000030")["run_id"]
    # Back to step 10, saving every 15 steps now: step_20 of the first run is on another lineage; step_30 is
    # saved again (the old one deleted first, manifest first).
    assert train_in_process(*ARGS, "--save-every-steps", "15", "--output-dir", str(out), "--checkpoint-dir", uri,
                            "--resume", f"{uri}/step_000000010") == 0
    assert assert_consistent(store) == ["step_000000010", "step_000000015", "step_000000020", "step_000000030"]
    again = store.read_trainer_state("step_000000030")
    assert again["parent"] == "step_000000010" and again["run_id"] != first_run
    capsys.readouterr()
    assert cli_main(["ckpt", "list", uri, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["step_000000020"]["other_lineage"] and not rows["step_000000015"]["other_lineage"]
    assert rows["step_000000030"]["latest"]
    assert cli_main(["ckpt", "prune", uri]) == 0  # without a rule: only the other lineage goes
    assert store.step_names() == ["step_000000010", "step_000000015", "step_000000030"]
