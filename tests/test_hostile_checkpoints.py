"""Checkpoints written by someone else: whatever a manifest, a trainer state, a pointer or a listing says, dtrain
reads, writes and deletes nothing outside the checkpoint. Every case has decoys outside (a file whose content and
mtime must not change, a directory that must still exist); it ends in a damaged verdict naming the entry (a
warned skip for `latest`, exit 2 with one line for an explicit path), never a traceback or a hang."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
from conftest import FAST, train_in_process

from dtrain.checkpoint.documents import MAX_DOCUMENT_BYTES
from dtrain.checkpoint.layout import (
    MANIFEST,
    TRAINER_STATE,
    read_pointer,
    read_trainer_state,
    step_dirs,
    verify_checkpoint,
    write_manifest,
)
from dtrain.checkpoint.names import name_problem
from dtrain.checkpoint.resolve import find_latest
from dtrain.checkpoint.storage import LocalDirectory
from dtrain.checksum import file_checksum
from dtrain.commands.cli import main as cli_main
from tests.helpers.decoys import Decoys

# ------------------------------------------------------------------------------------------- decoys, checkpoints

@pytest.fixture
def decoys(tmp_path) -> Decoys:
    return Decoys(tmp_path)


def make_checkpoint(checkpoints: Path, step: int, state: dict | None = None) -> Path:
    """A small complete checkpoint (what verify and resolution look at), with a manifest dtrain wrote."""
    path = checkpoints / f"step_{step:09d}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(256))
    (path / TRAINER_STATE).write_text(json.dumps(state or {"global_step": step, "epoch": 0}))
    write_manifest(path, step)
    (checkpoints / "latest").write_text(path.name + "\n")
    return path


def manifest_of(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def list_in_manifest(checkpoint: Path, name: str, target: Path) -> None:
    """Adds `name` to the manifest with the real size and crc32c of `target` (what an attacker can compute)."""
    manifest = manifest_of(checkpoint)
    size, value = file_checksum(target, "crc32c")
    manifest["files"][name] = {"size": size, "crc32c": value}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def finishes(action, timeout: float = 20.0):
    """Runs `action` in a thread; fails the test when it does not return in time (a fifo or device read)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=action()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout}s"
    return result["value"]


# ------------------------------------------------------------------------------------------- the name check

@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json", "random_states_0.pkl",
                                  "pytorch_model_fsdp_0/__0_0.distcp", "a/b/c.bin", "weird name with spaces"])
def test_the_name_check_accepts_the_names_checkpoints_hold(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["", "/etc/passwd", "/dev/zero", "../x", "a/../../b", "..", ".", "./a", "a/./b",
                                  "a//b", "//abs", "a/", "a\\..\\b", "a\x00b", "a\nb", "x" * 2000, 5, None])
def test_the_name_check_refuses_every_unsafe_name(name):
    assert name_problem(name) is not None


# ------------------------------------------------------------------------------------------- local verify

def test_an_entry_outside_the_checkpoint_is_refused_without_being_stated_or_read(tmp_path, decoys, monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    list_in_manifest(checkpoint, "../../decoy.txt", decoys.file)
    touched: list[str] = []
    for name in ("stat", "lstat", "open"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, _real=real, **k: (touched.append(str(p)), _real(p, *a, **k))[1])
    check = verify_checkpoint(checkpoint, checksums=True)
    monkeypatch.undo()
    assert not check.ok and "'../../decoy.txt'" in check.reason
    assert not [p for p in touched if not os.path.abspath(p).startswith(str(checkpoint))], touched
    assert decoys.intact()


@pytest.mark.parametrize("entry", ["/dev/zero", "/etc/passwd"])
def test_an_absolute_entry_is_refused_as_unsafe(tmp_path, entry):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    manifest = manifest_of(checkpoint)
    manifest["files"][entry] = {"size": 0, "crc32c": "00000000"}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    check = finishes(lambda: verify_checkpoint(checkpoint, checksums=True))
    assert not check.ok and "absolute path" in check.reason and entry in check.reason


def test_a_link_to_a_device_a_fifo_and_a_link_outside_are_refused_before_anything_is_read(tmp_path, decoys):
    checkpoints = tmp_path / "checkpoints"
    cases = {"zero.bin": lambda p: p.symlink_to("/dev/zero"), "pipe.bin": lambda p: os.mkfifo(p),
             "outside.bin": lambda p: p.symlink_to(decoys.file)}
    for step, (name, make) in enumerate(cases.items(), start=1):
        checkpoint = make_checkpoint(checkpoints, step)
        make(checkpoint / name)
        manifest = manifest_of(checkpoint)
        manifest["files"][name] = {"size": 0 if name != "outside.bin" else decoys.file.stat().st_size,
                                   "crc32c": "00000000"}
        (checkpoint / MANIFEST).write_text(json.dumps(manifest))
        check = finishes(lambda: verify_checkpoint(checkpoint, checksums=True))
        assert not check.ok and name in check.reason, (name, check.reason)
        assert ("symbolic link" if name != "pipe.bin" else "not a regular file") in check.reason
    assert decoys.intact()


def test_an_unlisted_link_or_fifo_that_a_load_would_open_by_name_makes_the_checkpoint_damaged(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    (checkpoint / "random_states_0.pkl").symlink_to("/dev/zero")  # Accelerate opens it by name, listed or not
    check = finishes(lambda: verify_checkpoint(checkpoint))
    assert not check.ok and "random_states_0.pkl is a symbolic link" in check.reason
    (checkpoint / "random_states_0.pkl").unlink()
    (checkpoint / "sub").mkdir()
    os.mkfifo(checkpoint / "sub" / "optimizer.bin")
    assert "sub/optimizer.bin is not a regular file" in finishes(lambda: verify_checkpoint(checkpoint)).reason


def test_a_symlinked_directory_inside_a_checkpoint_is_never_entered(tmp_path, decoys):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    (checkpoint / "sub").symlink_to(decoys.dir)
    list_in_manifest(checkpoint, "sub/keep.txt", decoys.dir / "keep.txt")
    check = verify_checkpoint(checkpoint, checksums=True)
    assert not check.ok and "sub/keep.txt is a symbolic link" in check.reason
    assert decoys.intact()


def test_a_step_dir_that_is_a_symlink_is_not_a_checkpoint_of_the_run(tmp_path, decoys, caplog):
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 10)
    elsewhere = make_checkpoint(tmp_path / "elsewhere", 20)  # complete, but not where the run keeps its own
    (checkpoints / "step_000000020").symlink_to(elsewhere)
    (checkpoints / "latest").write_text("step_000000020\n")
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in step_dirs(checkpoints)] == ["step_000000010"]
    assert "step_000000020 is a symbolic link" in caplog.text
    assert "symbolic link" in verify_checkpoint(checkpoints / "step_000000020").reason
    assert find_latest(LocalDirectory(checkpoints)).path == checkpoints / "step_000000010"
    # Retention or prune deleting it removes the link, never what it points to.
    LocalDirectory(checkpoints).delete("step_000000020")
    assert not os.path.lexists(checkpoints / "step_000000020") and verify_checkpoint(elsewhere, True).ok


# ------------------------------------------------------------------------------------------- documents

GARBLED_MANIFESTS = {
    "truncated": lambda m: json.dumps(m)[:-7],
    "not json": lambda m: "\x00\xffgarbage",
    "a list": lambda m: "[1, 2]",
    "NaN size": lambda m: json.dumps(m).replace('"size": 256', '"size": NaN'),
    "Infinity size": lambda m: json.dumps(m).replace('"size": 256', '"size": Infinity'),
    "huge size": lambda m: json.dumps(m).replace('"size": 256', '"size": ' + "9" * 40),
    "float size": lambda m: json.dumps(m).replace('"size": 256', '"size": 256.0'),
    "string size": lambda m: json.dumps(m).replace('"size": 256', '"size": "256"'),
    "bool size": lambda m: json.dumps(m).replace('"size": 256', '"size": true'),
    "negative size": lambda m: json.dumps(m).replace('"size": 256', '"size": -1'),
    "files a list": lambda m: json.dumps({**m, "files": list(m["files"])}),
    "entry not an object": lambda m: json.dumps({**m, "files": {**m["files"], "model.safetensors": 256}}),
    "checksum not hex": lambda m: json.dumps(m).replace('"crc32c": "', '"crc32c": "zz'),
    "NaN step": lambda m: json.dumps({**m, "step": "NaN"}).replace('"NaN"', "NaN"),
    "too deep": lambda m: "[" * 100_000 + "]" * 100_000,
    "too many digits": lambda m: json.dumps(m).replace('"size": 256', '"size": ' + "1" * 5000),
}


@pytest.mark.parametrize("kind", sorted(GARBLED_MANIFESTS))
def test_a_garbled_or_mistyped_manifest_makes_the_checkpoint_damaged(tmp_path, kind):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    (checkpoint / MANIFEST).write_text(GARBLED_MANIFESTS[kind](manifest_of(checkpoint)))
    check = verify_checkpoint(checkpoint, checksums=True)
    assert not check.ok and "manifest.json" in check.reason and "\n" not in check.reason, check.reason


def test_a_manifest_too_large_or_not_a_file_is_refused_unread(tmp_path, decoys):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    with open(checkpoint / MANIFEST, "r+b") as f:
        f.truncate(MAX_DOCUMENT_BYTES + 1)  # sparse: no time spent writing it
    assert "more than" in verify_checkpoint(checkpoint).reason
    (checkpoint / MANIFEST).unlink()
    os.mkfifo(checkpoint / MANIFEST)
    assert "not a regular file" in finishes(lambda: verify_checkpoint(checkpoint)).reason
    (checkpoint / MANIFEST).unlink()
    (checkpoint / MANIFEST).symlink_to(decoys.file)
    assert not verify_checkpoint(checkpoint).ok and decoys.intact()


GARBLED_STATES = {
    "truncated": '{"global_step": 10, "epo',
    "not an object": "[10]",
    "string step": '{"global_step": "10"}',
    "NaN step": '{"global_step": NaN}',
    "huge step": '{"global_step": 1' + "0" * 30 + "}",
    "metric a string": '{"global_step": 10, "checkpoint_metric": {"name": "val_loss", "value": "low"}}',
    "ancestry garbled": '{"global_step": 10, "ancestry": [{"run_id": 1, "step": "x"}]}',
    "config a list": '{"global_step": 10, "config": [1]}',
    "lr plan a string": '{"global_step": 10, "lr_plan": "fast"}',
    "data position a list": '{"global_step": 10, "data_position": [0]}',
    "run id a number": '{"global_step": 10, "run_id": 12}',
    # inside the objects: what the data order, the lr plan and the resume certificate read
    "data position samples a string": '{"global_step": 10, "data_position": {"kind": "map", "samples": "x"}}',
    "stream ranks a string": '{"global_step": 10, "data_position": {"kind": "stream", "ranks": "x"}}',
    "stream rank without micro-batches": '{"global_step": 10, "data_position": {"kind": "stream", "ranks": [{}]}}',
    "lr plan negative warm-up": '{"global_step": 10, "lr_plan": {"total_steps": 9, "warmup_steps": -1, '
                                '"min_lr_ratio": 0.1}}',
    "lr plan without total steps": '{"global_step": 10, "lr_plan": {"warmup_steps": 1, "min_lr_ratio": 0.1}}',
    "certificate ranks numbers": '{"global_step": 10, "resume_certificate": {"format": "f", "ranks": [1]}}',
    "certificate digest a number": '{"global_step": 10, "resume_certificate": {"format": "f", "ranks": '
                                   '[{"rng": 5}]}}',
}

VALID_INNER_STATES = {
    "map": {"data_position": {"kind": "map", "resume": "order", "epoch": 0, "samples": 160, "shuffle": True}},
    "stream": {"data_position": {"kind": "stream", "resume": "state", "epoch": 1, "world_size": 2,
                                 "replay_reason": None, "ranks": [{"micro_batches": 3, "state": {"any": [1, "x"]}},
                                                                  {"micro_batches": 3, "state": None}]}},
    "plan and certificate": {"lr_plan": {"total_steps": 10, "warmup_steps": 0, "min_lr_ratio": 0},
                             "resume_certificate": {"format": "dtrain-resume-certificate/1", "world_size": 1,
                                                    "ranks": [{"next_batch": "ab", "rng": "cd", "lr": "ef"}]}},
}


@pytest.mark.parametrize("kind", sorted(GARBLED_STATES))
def test_a_garbled_or_mistyped_trainer_state_makes_the_checkpoint_damaged(tmp_path, kind):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    (checkpoint / TRAINER_STATE).write_text(GARBLED_STATES[kind])
    write_manifest(checkpoint, 10)  # sizes and checksums recomputed: only the content is wrong
    check = verify_checkpoint(checkpoint, checksums=True)
    assert not check.ok and "trainer_state.json" in check.reason, check.reason
    with pytest.raises(ValueError):
        read_trainer_state(checkpoint)


@pytest.mark.parametrize("kind", sorted(VALID_INNER_STATES))
def test_the_objects_a_run_writes_into_its_trainer_state_pass_the_checks(tmp_path, kind):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"global_step": 10, **VALID_INNER_STATES[kind]}))
    write_manifest(checkpoint, 10)
    assert verify_checkpoint(checkpoint, checksums=True).ok


def test_a_nan_metric_that_a_diverged_run_recorded_is_still_a_checkpoint(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 10)
    (checkpoint / TRAINER_STATE).write_text('{"global_step": 10, "checkpoint_metric": {"name": "val_loss", '
                                            '"value": NaN}, "best_metric": Infinity}')
    write_manifest(checkpoint, 10)
    assert verify_checkpoint(checkpoint, checksums=True).ok


# ------------------------------------------------------------------------------------------- pointers

@pytest.mark.parametrize("content", [b"../x\n", b"/abs/step_000000010\n", b"step_000000010/../../x\n",
                                     b"\xff\xfe garbage", b"step_000000010" * 100_000, b"step_\xd9\xa1\xd9\xa1\n",
                                     b"step_000000010\nstep_000000010\n", b""])
def test_a_pointer_that_is_not_one_step_name_is_ignored_with_a_warning(tmp_path, content, caplog):
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 10)
    (checkpoints / "latest").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert read_pointer(checkpoints, "latest") is None
    assert "ignoring the pointer" in caplog.text
    assert find_latest(LocalDirectory(checkpoints)).path == checkpoints / "step_000000010"


def test_a_pointer_that_is_a_link_or_a_fifo_is_ignored_unread(tmp_path, decoys):
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 10)
    decoys.file.write_text("step_000000010\n")  # a valid name: still not followed
    (checkpoints / "best").symlink_to(decoys.file)
    assert read_pointer(checkpoints, "best") is None
    (checkpoints / "latest").unlink()
    os.mkfifo(checkpoints / "latest")
    assert finishes(lambda: read_pointer(checkpoints, "latest")) is None
    assert read_pointer(checkpoints, "missing") is None


def test_a_pointer_holding_a_step_name_is_read(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 10)
    assert read_pointer(checkpoints, "latest") == "step_000000010"


# ------------------------------------------------------------------------------------------- resolution

def test_latest_skips_a_checkpoint_with_a_bad_entry_and_names_it(tmp_path, decoys):
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 10)
    bad = make_checkpoint(checkpoints, 20)
    list_in_manifest(bad, "../../../decoy.txt", decoys.file)
    resolution = find_latest(LocalDirectory(checkpoints), checksums=True)
    assert resolution.path == checkpoints / "step_000000010"
    assert len(resolution.skipped) == 1 and "step_000000020" in resolution.skipped[0] \
        and "../../../decoy.txt" in resolution.skipped[0]
    assert decoys.intact()


# ------------------------------------------------------------------------------------------- real runs

RUN = [*FAST, "--save-every-steps", "10", "--max-steps", "20"]


@pytest.fixture
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert train_in_process(*RUN, "--output-dir", str(out)) == 0
    return out


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_latest_passes_over_a_hostile_newest_and_an_explicit_path_is_exit_2(trained_run, tmp_path, capsys,
                                                                                  caplog):
    decoys = Decoys(tmp_path)
    checkpoints = trained_run / "checkpoints"
    newest = checkpoints / "step_000000020"
    list_in_manifest(newest, "../../../decoy.txt", decoys.file)
    good = checkpoints / "step_000000010"
    before = {p.name: p.stat().st_size for p in good.iterdir()}

    caplog.set_level(logging.INFO)
    args = [*RUN, "--max-steps", "20", "--output-dir", str(trained_run)]
    assert train_in_process(*args, "--resume", "latest") == 0
    assert "skipping damaged checkpoint step_000000020" in caplog.text and "../../../decoy.txt" in caplog.text
    assert f"resumed from {good}" in caplog.text
    assert verify_checkpoint(good, checksums=True).ok and {p.name: p.stat().st_size for p in good.iterdir()} == before

    (newest / TRAINER_STATE).write_text('{"global_step": NaN}')  # the re-save replaced it: damage it again
    write_manifest(newest, 20)
    capsys.readouterr()
    assert train_in_process(*args, "--resume", str(newest)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dtrain: error:")]
    assert len(lines) == 1 and "trainer_state.json has global_step" in lines[0] and "Traceback" not in err
    assert decoys.intact()


def test_ckpt_tools_report_a_hostile_checkpoint_without_a_traceback(tmp_path, decoys, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    good = make_checkpoint(checkpoints, 10)
    bad = make_checkpoint(checkpoints, 20)
    list_in_manifest(bad, "../../../decoy.txt", decoys.file)
    (bad / "zero").symlink_to("/dev/zero")
    assert finishes(lambda: cli_main(["ckpt", "verify", str(bad)])) == 1
    assert "decoy.txt" in capsys.readouterr().out
    assert finishes(lambda: cli_main(["ckpt", "show", str(bad), "--json"])) in (0, None)
    shown = json.loads(capsys.readouterr().out)
    assert "zero" not in shown["files"] and shown["complete"] is False
    assert finishes(lambda: cli_main(["ckpt", "list", str(tmp_path / "run")])) in (0, None)
    assert "DAMAGED" in capsys.readouterr().out
    for command in (["ckpt", "export", str(bad), "--out", str(tmp_path / "m.safetensors")], ["eval", str(bad)]):
        assert cli_main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("dtrain: error:") == 1 and "decoy.txt" in err and "Traceback" not in err, err
    assert verify_checkpoint(good, checksums=True).ok and decoys.intact()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_config_file_with_python_tags_runs_nothing_and_is_exit_2(tmp_path, capsys):
    ran = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f'lr: !!python/object/apply:os.system ["touch {ran}"]\n'
                      f'seed: !!python/object/new:subprocess.Popen [["touch", "{ran}"]]\n')
    assert train_in_process(*RUN, "--output-dir", str(tmp_path / "out"), "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert err.count("dtrain: error:") == 1 and "Traceback" not in err and "not valid YAML" in err
    assert not ran.exists()
