"""exit_status.json keeps naming the run's latest checkpoint whatever ended later (a mistyped command, a refused
resume, an object store that went away), every ended invocation is a line of exit_history.jsonl, and no garbled
record makes `dtrain status` fail with a traceback."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, REPO, TRAIN, child_env, free_port, wait_for

from dtrain.commands.cli import main as cli_main
from dtrain.commands.train import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SHORT = [*FAST, "--max-steps", "12", "--save-every-steps", "6"]


def status(out: Path) -> dict:
    return json.loads((out / "exit_status.json").read_text())


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "exit_history.jsonl").read_text().splitlines()]


@pytest.fixture
def finished_run(tmp_path) -> Path:
    out = tmp_path / "run"
    assert main([*SHORT, "--output-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("mistake", [
    ["--max-stesp", "3"],                                  # an unknown flag: argparse never finishes
    ["--lr", "-1"],                                        # a bad value: the config is refused
    ["--optimizer-typo"],                                  # an unknown flag without a value
    [],                                                    # a refused start: checkpoints exist, no --resume
    ["--resume", "/nonexistent/step_000000003"],           # a refused resume
])
def test_a_command_that_never_trains_keeps_the_latest_checkpoint_and_adds_a_history_line(
        finished_run, mistake, capsys):
    assert main([*SHORT, "--output-dir", str(finished_run), *mistake]) == 2
    s = status(finished_run)
    assert (s["reason"], s["exit_code"], s["step"], s["checkpoint"]) == ("usage_error", 2, 12, "step_000000012")
    assert "--resume latest" in s["resume_command"]
    assert [(h["reason"], h["step"], h["checkpoint"]) for h in history(finished_run)] == \
        [("finished", 12, "step_000000012"), ("usage_error", 12, "step_000000012")]
    capsys.readouterr()
    assert cli_main(["status", str(finished_run), "--history"]) == 2  # the last invocation's code, as without it
    lines = capsys.readouterr().out.splitlines()
    assert "finished (exit code 0) at step 12, checkpoint step_000000012" in lines[0]
    assert "usage_error (exit code 2) at step 12, checkpoint step_000000012" in lines[1]
    assert lines[2] == "usage_error (exit code 2) at step 12"


def test_the_output_dir_of_a_config_file_receives_the_record_of_a_mistyped_flag(finished_run, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {finished_run}\n")
    assert main([*SHORT, "--config", str(config), "--max-stesp", "3"]) == 2
    assert [h["reason"] for h in history(finished_run)] == ["finished", "usage_error"]
    assert status(finished_run)["checkpoint"] == "step_000000012"


def test_a_mistyped_command_writes_nothing_where_no_run_was(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--task", "regression", "--max-stesp", "3"]) == 2  # no output dir named: the default is not guessed
    (tmp_path / "elsewhere").mkdir()
    assert main(["--task", "regression", "--max-stesp", "3", "--output-dir", "elsewhere"]) == 2
    assert main(["--task", "regression", "--lr", "-1", "--output-dir", "elsewhere"]) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["elsewhere"]


def test_a_command_refused_by_the_run_lock_adds_no_history_line(finished_run):
    before = (finished_run / "exit_history.jsonl").read_text()
    fd = os.open(finished_run / ".dtrain.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a live run would hold it
    try:
        assert main([*SHORT, "--output-dir", str(finished_run), "--max-stesp", "3"]) == 2
        assert main([*SHORT, "--output-dir", str(finished_run), "--resume", "latest"]) == 2
    finally:
        os.close(fd)
    assert (finished_run / "exit_history.jsonl").read_text() == before


# ------------------------------------------------------------------------------------------ garbled records

GARBLED = {
    "truncated": '{"reason": "finished", "exit_co',
    "NaN exit code": '{"reason": "finished", "exit_code": NaN}',
    "huge exit code": '{"reason": "finished", "exit_code": 100000000000000000000000000000}',
    "float exit code": '{"reason": "finished", "exit_code": 1e400}',
    "string exit code": '{"reason": "finished", "exit_code": "0"}',
    "boolean exit code": '{"reason": "finished", "exit_code": true}',
    "unknown reason": '{"reason": ["finished"], "exit_code": 0}',
    "negative step": '{"reason": "finished", "exit_code": 0, "step": -5}',
    "huge step": '{"reason": "finished", "exit_code": 0, "step": 1' + "0" * 5000 + '}',
    "NaN step": '{"reason": "finished", "exit_code": 0, "step": NaN}',
    "checkpoint object": '{"reason": "finished", "exit_code": 0, "checkpoint": {"a": 1}}',
    "a list": '[0, 1]',
    "deep nesting": "[" * 100_000,
    "not UTF-8": b'{"reason": "\xff\xfe"}',
    "empty": "",
}


@pytest.mark.parametrize("name", GARBLED)
def test_a_garbled_exit_status_is_exit_2_with_one_line(tmp_path, capsys, name):
    content = GARBLED[name]
    (tmp_path / "exit_status.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    for extra in ([], ["--json"], ["--history"]):
        assert cli_main(["status", str(tmp_path), *extra]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dtrain: error:") and "not a dtrain exit status" in err[0], err
        assert captured.out == ""


def test_garbled_history_lines_are_skipped_and_counted(finished_run, capsys):
    good = (finished_run / "exit_history.jsonl").read_text()
    with open(finished_run / "exit_history.jsonl", "a") as f:
        f.write(GARBLED["NaN exit code"] + "\n" + GARBLED["truncated"] + "\n\x1b[2J\n" + GARBLED["deep nesting"] + "\n")
        f.write(good)
    capsys.readouterr()
    assert cli_main(["status", str(finished_run), "--history"]) == 0
    captured = capsys.readouterr()
    listed = [line for line in captured.out.splitlines() if line.endswith(", checkpoint step_000000012")]
    assert len(listed) == 2 and all("finished (exit code 0) at step 12" in line for line in listed)
    assert "skipped 4 unreadable line(s)" in captured.err
    assert cli_main(["status", str(finished_run), "--history", "--json"]) == 0
    assert [json.loads(line)["reason"] for line in capsys.readouterr().out.splitlines()] == ["finished", "finished"]


def test_control_characters_in_a_record_are_not_printed(tmp_path, capsys):
    record = {"reason": "failed", "exit_code": 1, "step": 3, "checkpoint": "step_000000003\x1b[2J",
              "resume_command": "dtrain train \x1b]0;owned\x07", "finished_at": "now\r"}
    (tmp_path / "exit_status.json").write_text(json.dumps(record))
    assert cli_main(["status", str(tmp_path)]) == 1
    assert "\x1b" not in capsys.readouterr().out


# ------------------------------------------------------------------------------- an object store that goes away

@pytest.fixture
def own_moto():
    """A moto server of this test alone (it is stopped in the middle of a run), with the AWS settings for it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="dtrain-test")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    stopped = []
    yield env, lambda: stopped.append(server.stop())
    if not stopped:
        server.stop()


def test_a_store_that_fails_mid_run_leaves_a_status_naming_the_last_checkpoint_seen(own_moto, tmp_path):
    env, stop_store = own_moto
    out = tmp_path / "run"
    cmd = [sys.executable, TRAIN, *FAST, "--max-steps", "12", "--save-every-steps", "4",
           "--output-dir", str(out), "--checkpoint-dir", "s3://dtrain-test/run"]
    # The second save pauses before its upload; the store is stopped meanwhile, so that upload fails.
    proc = subprocess.Popen(cmd, cwd=REPO, env={**child_env(**env), "DTRAIN_FAULT_AT": "upload_started:sleep=3",
                                                "DTRAIN_FAULT_AFTER_SAVES": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and '"checkpoint"' in (out / "metrics.jsonl").read_text(),
                 timeout=120, what="the first checkpoint")
        stop_store()
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, None), output[-3000:]
    s = status(out)
    assert (s["reason"], s["checkpoint"], s["checkpoint_source"]) == ("failed", "step_000000004", "last_seen"), s
    assert s["step"] >= 4
    assert history(out)[-1] == s

    # A second start while the store is still unreachable: refused, and still naming that checkpoint.
    again = subprocess.run([*cmd, "--resume", "latest"], cwd=REPO, env=child_env(**env), capture_output=True,
                           text=True, timeout=180)
    assert again.returncode != 0
    s = status(out)
    assert (s["checkpoint"], s["checkpoint_source"], s["step"]) == ("step_000000004", "last_seen", 4), s
    assert len(history(out)) == 2
