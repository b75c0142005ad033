"""Credentials in a URI are never recorded or printed: config.yaml, metrics.jsonl, exit_status.json, the
checkpoints' trainer_state.json, log lines and error messages show `scheme://user:***@host/...`."""

from __future__ import annotations

import io
import logging
import sys
import uuid
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN

from dtrain import redact
from dtrain.commands.common import run_main
from dtrain.commands.train import main
from dtrain.errors import UsageError
from dtrain.redact import redact_uri, redact_values


@pytest.mark.parametrize("text, expected", [
    ("memory://svc:PASSWORD@bucket/prefix", "memory://svc:***@bucket/prefix"),
    ("ftp://user:p%40ss@127.0.0.1:1/x", "ftp://user:***@127.0.0.1:1/x"),
    ("s3://key:pa@ss@host:9000/b", "s3://key:***@host:9000/b"),  # an unencoded '@' in the password
    ("https://ghp_0123456789@github.com/o/r", "https://***@github.com/o/r"),  # a user field alone is a token
    ("cannot reach s3://a:LONGSECRET1@h/b and gs://c:LONGSECRET2@h/d.", "cannot reach s3://a:***@h/b and gs://c:***@h/d."),
    ("https://h/o?X-Amz-Signature=abc123&part=2&X-Amz-Security-Token=t0k", "https://h/o?X-Amz-Signature=***&part=2&X-Amz-Security-Token=***"),
    ("https://h/o?access_key=AK&secret=SK&token=T&sig=S", "https://h/o?access_key=***&secret=***&token=***&sig=***"),
    ("s3://bucket/prefix/step_000000012", "s3://bucket/prefix/step_000000012"),
    ("/plain/path/with@sign and user@example.com", "/plain/path/with@sign and user@example.com"),
])
def test_redact_uri_masks_userinfo_and_secret_query_values(text, expected):
    assert redact_uri(text) == expected


def test_a_password_is_masked_also_where_a_library_repeats_it_without_the_scheme():
    secret = f"pw{uuid.uuid4().hex}"
    redact.remember_secrets({"checkpoint": {"checkpoint_dir": f"memory://svc:{secret}@bucket/p"}})
    # fsspec's memory filesystem names its paths `/svc:PASSWORD@bucket/...` in its errors
    assert secret not in redact_uri(f"FileNotFoundError: /svc:{secret}@bucket/p/latest")


def test_redact_values_copies_nested_structures_and_leaves_the_original_alone():
    original = {"checkpoint": {"checkpoint_dir": "s3://k:TOPSECRET@h/b"}, "list": ["ftp://u:TOPSECRET@h", 3, None]}
    redacted = redact_values(original)
    assert redacted == {"checkpoint": {"checkpoint_dir": "s3://k:***@h/b"}, "list": ["ftp://u:***@h", 3, None]}
    assert original["checkpoint"]["checkpoint_dir"] == "s3://k:TOPSECRET@h/b"  # the run still needs them


def test_log_lines_and_error_messages_are_redacted(capsys):
    secret = f"sec{uuid.uuid4().hex}"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("dtrain.test_redaction")
    log.addHandler(handler)
    try:
        redact.install()
        log.warning("resumed from %s", f"s3://key:{secret}@host/bucket/step_000000004")
    finally:
        log.removeHandler(handler)
    assert secret not in stream.getvalue() and "s3://key:***@host/bucket" in stream.getvalue()

    def refuse():
        raise UsageError(f"cannot reach ftp://user:{secret}@127.0.0.1:1/x")

    assert run_main(refuse) == 2
    err = capsys.readouterr().err
    assert secret not in err and "ftp://user:***@127.0.0.1:1/x" in err


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_a_run_with_credentials_in_its_checkpoint_uri_records_and_prints_none(
        tmp_path, capsys, caplog, fresh_accelerate_state):
    import fsspec

    password = f"PASSWORD{uuid.uuid4().hex[:8]}"
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    uri, out = f"memory://svc:{password}@{bucket}/prefix", tmp_path / "run"
    args = [*FAST, "--save-every-steps", "2", "--eval-every-steps", "2", "--output-dir", str(out),
            "--checkpoint-dir", uri]
    caplog.set_level(logging.INFO)
    assert main([*args, "--max-steps", "4"]) == 0
    assert main([*args, "--max-steps", "4"]) == 2  # refused: the store holds checkpoints (its URI in the message)
    assert main([*args, "--max-steps", "6", "--resume", "latest"]) == 0
    captured = capsys.readouterr()

    assert "svc:***@" in (out / "config.yaml").read_text()  # recorded, masked
    assert "svc:***@" in captured.err  # the refusal names the store
    memory = fsspec.filesystem("memory")
    stored = [path for path in memory.find(f"/svc:{password}@{bucket}") if path.endswith("trainer_state.json")]
    assert len(stored) == 3 and all(b"svc:***@" in memory.cat_file(p) for p in stored)
    leaks = [str(p) for p in files_under(out) if password.encode() in p.read_bytes()]
    leaks += [p for p in memory.find(f"/svc:{password}@{bucket}") if password.encode() in memory.cat_file(p)]
    leaks += [name for name, text in (("stdout", captured.out), ("stderr", captured.err), ("log", caplog.text))
              if password in text]
    assert leaks == []


def test_an_unreachable_uri_is_exit_2_with_one_line_and_no_secret(runner, tmp_path):
    result = runner.run([sys.executable, TRAIN, *FAST, "--max-steps", "2", "--output-dir", str(tmp_path / "run"),
                         "--checkpoint-dir", "ftp://user:s3cr3tpass@127.0.0.1:1/x"], cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "ftp://user:***@127.0.0.1:1/x" in errors[0], lines
    assert "Traceback" not in result.stdout and "s3cr3tpass" not in result.stdout
    assert not any(b"s3cr3tpass" in p.read_bytes() for p in files_under(tmp_path))


def test_ckpt_tools_on_an_unreachable_uri_are_exit_2_with_no_secret(capsys):
    from dtrain.commands.cli import main

    assert main(["ckpt", "list", "ftp://svc:HUNTER2PASSWORD@127.0.0.1:1/ckpts"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtrain: error:") and len(err.strip().splitlines()) == 1
    assert "HUNTER2PASSWORD" not in err and "svc:***@" in err
