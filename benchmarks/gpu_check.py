"""What only a GPU shows, in one run of a few minutes on one CUDA GPU; prints one JSON line at the end.

    python benchmarks/gpu_check.py [--quick]

1. Resume is bit-exact in bf16 and in fp16 (with its GradScaler): `dtrain verify-resume` on the GPU (the
   regression task: its kernels are deterministic, so any difference is the resume's), plus the scaler state,
   which verify-resume does not compare.
2. A GPU checkpoint loads in a process that has no GPU (CUDA_VISIBLE_DEVICES=""): plain
   `Accelerator(cpu=True).load_state` gives the saved weights, and `dtrain train --device cpu --resume latest`
   continues the run.
3. An `--async-save` snapshot of GPU tensors goes into pinned host buffers; how long it holds the loop.
4. The loop and checkpoint benchmarks (bench_loop.py, bench_checkpoint.py) with `--device cuda`.
5. With 2 or more GPUs: sharded training (FSDP2 over NCCL) resumes bit-exact (`dtrain verify-resume --sharding
   fsdp2` on 2 ranks, in bf16), and an `--async-save` sharded run commits and resumes. With one GPU it says it
   skipped this (sharding needs a process per GPU).

Without CUDA it says so and exits 2. Every part runs in a process of its own; the JSON line holds `ok` (all of
1-3 passed) and every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)

TRAIN = str(_util.REPO / "dtrain" / "train.py")
REGRESSION = ["--task", "regression", "--n-layer", "2", "--n-embd", "64", "--batch-size", "16", "--seed", "7",
              "--eval-every-steps", "10", "--eval-max-batches", "2", "--log-every-steps", "5", "--warmup-steps", "5"]
TIMEOUT = 240


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    out.update({"PYTHONPATH": str(_util.REPO), "PYTHONUNBUFFERED": "1",
                "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, **extra)  # deterministic cuBLAS: a difference is the resume's
    return out


def run(cmd: list[str], timeout: float = TIMEOUT, **extra_env: str) -> subprocess.CompletedProcess:
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=str(_util.REPO), env=env(**extra_env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
    print(f"  exit {proc.returncode}\n  " + tail.replace("\n", "\n  "), flush=True)
    return proc


def resume_exact(precision: str, root: Path) -> dict:
    """verify-resume on the GPU in `precision`; also compares the GradScaler state of both ends."""
    from accelerate.utils import load as safe_load

    out = root / f"verify-{precision}"
    proc = run([sys.executable, "-m", "dtrain.cli", "verify-resume", *REGRESSION, "--device", "cuda",
                "--mixed-precision", precision, "--verify-steps", "30", "--output-dir", str(out)])
    ends = [out / "verify-resume" / name / "checkpoints" for name in ("straight", "resumed")]
    scaler_same = None
    if precision == "fp16":
        files = [sorted(e.glob("step_*/scaler.pt"))[-1:] for e in ends]
        scaler_same = bool(all(files)) and _equal(safe_load(files[0][0]), safe_load(files[1][0]))
    return {"identical": proc.returncode == 0 and "RESULT: identical" in proc.stdout and scaler_same is not False,
            "verify_resume_exit": proc.returncode, "scaler_identical": scaler_same}


def _equal(a, b) -> bool:
    from dtrain.commands.verify_resume import _equal as equal

    return equal(a, b)


def gpu_checkpoint_on_cpu(root: Path) -> dict:
    """A bf16 GPU run's checkpoint, loaded by a process that cannot see the GPU."""
    out = root / "gpu-run"
    trained = run([sys.executable, TRAIN, *REGRESSION, "--device", "cuda", "--mixed-precision", "bf16",
                   "--max-steps", "10", "--output-dir", str(out)])
    loaded = run([sys.executable, str(Path(__file__).resolve()), "--load-on-cpu",
                  str(out / "checkpoints" / "step_000000010")], CUDA_VISIBLE_DEVICES="")
    resumed = run([sys.executable, TRAIN, *REGRESSION, "--device", "cpu", "--mixed-precision", "bf16",
                   "--max-steps", "12", "--resume", "latest", "--output-dir", str(out)], CUDA_VISIBLE_DEVICES="")
    return {"ok": trained.returncode == 0 and loaded.returncode == 0 and resumed.returncode == 0
            and (out / "checkpoints" / "step_000000012").is_dir(),
            "plain_load_state_on_cpu": loaded.returncode == 0, "dtrain_resume_on_cpu_exit": resumed.returncode}


def load_on_cpu(checkpoint: str) -> int:
    """(In a process without a GPU.) Plain Accelerate loads the checkpoint; the weights are the saved ones."""
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from dtrain.config import TaskConfig
    from dtrain.tasks import regression

    assert not torch.cuda.is_available(), "this check must run where no GPU is visible"
    task = regression.build(TaskConfig(task="regression", n_layer=2, n_embd=64), 7)
    optimizer = torch.optim.AdamW(task.model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(task.model, optimizer, scheduler)
    accelerator.load_state(checkpoint)
    saved = load_file(str(Path(checkpoint) / "model.safetensors"))
    same = all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    print(f"loaded {checkpoint} on the CPU; weights identical to the file: {same}")
    return 0 if same else 1


def pinned_snapshot() -> dict:
    """An async save of a GPU model: the host buffers are pinned, and how long save() holds the caller."""
    import torch
    from accelerate import Accelerator
    from torch import nn

    from dtrain.checkpoint import CheckpointManager

    accelerator = Accelerator()
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(3)])
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(torch.randn(8, 2048, device=accelerator.device)).square().mean())
    optimizer.step()
    root = Path(tempfile.mkdtemp(prefix="dtrain-gpu-check-"))
    try:
        manager = CheckpointManager(accelerator, root / "checkpoints", async_save=True)
        held = []
        for step in (1, 2, 3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            manager.save(step, {"global_step": step})
            held.append(time.perf_counter() - started)
            manager.wait()
        buffers = list(manager._copier._storages.values())  # noqa: SLF001 - what this check is about
        pinned = bool(buffers) and all(b.is_pinned() for b in buffers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"buffers_pinned": pinned, "async_held_s_median": _util.median(held[1:])}  # the first allocates


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded(root: Path) -> dict:
    """FSDP2 over NCCL on 2 GPUs: verify-resume, then an async sharded run stopped after its first save and
    resumed."""
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"}

    def torchrun(*args: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), *args]

    verify = run(torchrun("-m", "dtrain.cli", "verify-resume", *REGRESSION, "--device", "cuda", "--sharding",
                          "fsdp2", "--mixed-precision", "bf16", "--verify-steps", "20",
                          "--output-dir", str(root / "fsdp-verify")))
    out = root / "fsdp-async"
    args = [TRAIN, *REGRESSION, "--device", "cuda", "--sharding", "fsdp2", "--async-save", "--max-steps", "30",
            "--save-every-steps", "10", "--output-dir", str(out)]
    stopped = run(torchrun(*args), DTRAIN_FAULT_AT="state_written", DTRAIN_FAULT_AFTER_SAVES="1")
    resumed = run(torchrun(*args, "--resume", "latest"))
    return {"verify_resume_identical": verify.returncode == 0 and "RESULT: identical" in verify.stdout,
            "async_killed_mid_write": stopped.returncode != 0,
            "async_resumed": resumed.returncode == 0 and (out / "checkpoints" / "step_000000030").is_dir()}


def benchmark(script: str, quick: bool) -> dict:
    proc = run([sys.executable, str(_util.REPO / "benchmarks" / script), "--device", "cuda",
                *(["--quick"] if quick else [])], timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        return json.loads(last) if proc.returncode == 0 else {"error": f"exit {proc.returncode}"}
    except ValueError:
        return {"error": "no JSON line"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmarks at their tiny sizes")
    parser.add_argument("--load-on-cpu", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_on_cpu:
        return load_on_cpu(args.load_on_cpu)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is available here (torch.cuda.is_available() is False); "
              "run this on a machine with one", flush=True)
        return 2
    started = time.perf_counter()
    result: dict = {"gpu": torch.cuda.get_device_name(0), "machine": _util.machine()}
    root = Path(tempfile.mkdtemp(prefix="dtrain-gpu-check-"))
    try:
        result["resume_exact_bf16"] = resume_exact("bf16", root)
        result["resume_exact_fp16"] = resume_exact("fp16", root)
        result["gpu_checkpoint_on_cpu"] = gpu_checkpoint_on_cpu(root)
        result["sharded"] = sharded(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["async_snapshot"] = pinned_snapshot()
    for script in ("bench_loop.py", "bench_checkpoint.py"):
        result[script.removesuffix(".py")] = benchmark(script, args.quick)
    result["ok"] = bool(result["resume_exact_bf16"]["identical"] and result["resume_exact_fp16"]["identical"]
                        and result["gpu_checkpoint_on_cpu"]["ok"] and result["async_snapshot"]["buffers_pinned"]
                        and ("skipped" in result["sharded"] or all(result["sharded"].values())))
    result["seconds"] = round(time.perf_counter() - started, 1)
    _util.emit(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
