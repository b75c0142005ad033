"""Shared helpers: running dtrain as real processes (with timeouts and cleanup) and comparing checkpoints."""

from __future__ import annotations

import os

# Tiny models on a 2-core machine: one thread per process avoids OpenMP spinning against the other processes
# a test starts (set before anything imports torch).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "dtrain" / "train.py")
CPU_2PROC = str(REPO / "launch_configs" / "cpu_2proc.yaml")
# A small, fast configuration of the regression task: 128 optimizer steps per epoch at batch size 16.
FAST = ["--task", "regression", "--batch-size", "16", "--n-layer", "2", "--n-embd", "32", "--log-every-steps", "5",
        "--eval-every-steps", "20", "--eval-max-batches", "4", "--warmup-steps", "5"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, **extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(*args: str, processes: int = 1) -> list[str]:
    return launch_cmd(TRAIN, *args, processes=processes)


def launch_cmd(script: str, *args: str, processes: int = 1) -> list[str]:
    """`python SCRIPT ARGS`, or with 2 processes `accelerate launch --config_file cpu_2proc.yaml SCRIPT ARGS`."""
    if processes == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
            "--main_process_port", str(free_port()), script, *args]


class Runner:
    """Starts processes in their own process group and kills whatever is left at the end of the test."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], cwd: Path | None = None, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], cwd: Path | None = None, timeout: float = 180, **env: str):
        proc = self.start(cmd, cwd, **env)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, _ = proc.communicate()
            pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")

    def kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        for proc in self.procs:
            self.kill(proc)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def runner():
    r = Runner()
    yield r
    r.cleanup()


def reset_accelerate() -> None:
    """Clears Accelerate's process-wide settings, so each in-process training starts from scratch."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def train_in_process(*argv: str) -> int:
    """`dtrain train ARGV` inside the test process (no subprocess), with fresh Accelerate settings around it."""
    from dtrain.commands.train import main

    reset_accelerate()
    try:
        return main(list(argv))
    finally:
        reset_accelerate()


@pytest.fixture
def fresh_accelerate_state():
    """For tests that train inside the pytest process: Accelerate settings never leak between tests."""
    reset_accelerate()
    yield
    reset_accelerate()


def wait_for(predicate, timeout: float = 120, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def load_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def final_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def assert_same_end(a: Path, b: Path) -> None:
    """Two runs ended at the same step with the same weights and optimizer state, bit for bit."""
    import torch
    from accelerate.utils import load as safe_load

    ca, cb = final_checkpoint(a), final_checkpoint(b)
    assert ca.name == cb.name
    assert same_tensors(load_weights(ca), load_weights(cb)), "final weights differ"
    oa, ob = safe_load(ca / "optimizer.bin"), safe_load(cb / "optimizer.bin")
    for key, state in oa["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][key][name])), f"optimizer {name}"


LAUNCHERS = ("accelerate.commands.launch", "torch.distributed.run")


def trainer_pids(out: Path) -> dict[int, int]:
    """rank -> pid of the training processes writing to `out` (not the launcher)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if any(a.endswith("train.py") for a in args) and str(out) in args and not set(LAUNCHERS) & set(args):
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            found[int(env.get("RANK", "0"))] = int(entry.name)
    return found


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- object store

@pytest.fixture(scope="session")
def moto_server():
    """An S3-compatible server (moto) on loopback for the whole session; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """`s3://dtrain-test`: an empty bucket on the moto server, with the AWS settings that reach it set for the
    test and the processes it starts (dummy credentials, a region, AWS_ENDPOINT_URL)."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=30)
    for name, value in {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    import boto3

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="dtrain-test")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached client could hold another test's settings
    yield "s3://dtrain-test"
