"""Runs every dtrain benchmark and prints one JSON object with all ratios as the LAST line of stdout.

    python benchmarks/run.py            # the full suite, sized for a 2-core CPU machine (about 15 minutes)
    python benchmarks/run.py --quick    # a tiny run that only checks the suite works (well under a minute or two)
    python benchmarks/run.py --gpu      # also repeats the loop and checkpoint benchmarks on the GPU, if any

Each benchmark runs in its own Python process (bench_loop.py, bench_checkpoint.py, bench_resume.py,
bench_startup.py, bench_goodput.py, bench_sharded.py, which starts 2 ranks of its own, bench_peft.py, which trains
a LoRA and a full fine-tune; each also runs alone), so
one cannot disturb another's state (Accelerate's singletons, allocator, page cache pressure).
Every table compares both sides measured in the same process, alternating, as medians of several repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402

HERE = Path(__file__).resolve().parent
# (key, comparison, goal, what it compares)
GOALS = [("loop_overhead_ratio", ">=", 0.98, "dtrain loop steps/s / plain Accelerate loop steps/s"),
         ("sync_save_vs_raw_fsync_ratio", ">=", 0.97, "dtrain sync commit MB/s / plain save + fsync MB/s"),
         ("sync_save_vs_disk_ratio", ">=", 0.80, "dtrain sync commit MB/s / raw write + fsync MB/s, same bytes"),
         ("sync_save_vs_raw_fsync_ratio_1g", ">=", 0.97, "the same at about 1.2 GB"),
         ("sync_save_vs_disk_ratio_1g", ">=", 0.80, "the same at about 1.2 GB"),
         ("verify_vs_read_ratio", ">=", 0.80, "checksum verification MB/s / plain read MB/s of a checkpoint"),
         ("store_commit_vs_upload_ratio", ">=", 0.90, "object-store commit MB/s / plain s3fs upload MB/s (moto)"),
         ("async_blocking_ratio", "<=", 0.03, "loop held by an async save / held by a sync save"),
         ("checkpoint_overhead_ratio", ">=", 0.90, "steps/s saving (async) every 20 steps / never saving"),
         ("resume_skip_ratio", "<=", 1.10, "time to first batch deep in an epoch / at its start"),
         ("resume_startup_ratio", "<=", 1.30, "process start -> first step, resuming / fresh"),
         ("goodput_ratio", ">=", 0.80, "steps kept / (clean steps/s x wall time) under kill -9"),
         ("stream_state_vs_start_ratio", "<=", 1.5, "stream: first batch 90% in from its state / at its start"),
         ("sharded_save_vs_full_ratio", ">=", 1.0, "FSDP2 sharded commit MB/s / full-state (DDP) commit MB/s, 2 ranks"),
         ("local_save_blocking_ratio", "<=", 0.05, "loop held by a node-local tier save / by a sync persistent save"),
         ("goodput_tiered_ratio", ">=", 0.90,
          "goodput under kill -9, local tier every 5 steps + persistent every 100 (as goodput_ratio)"),
         ("sharded_save_peak_memory_ratio", "<=", 0.6,
          "rank 0's extra peak RSS in a sharded save / full state bytes (params + AdamW)")]
# Printed beside the goals, for reference (no goal of their own).
REFERENCE = [("sync_save_vs_raw_ratio", "sync_save_ceiling_ratio",
              "dtrain sync commit MB/s / plain save into the page cache MB/s (ceiling: disk / plain save)"),
             ("checkpoint_overhead_sync_ratio", None, "steps/s saving (sync) every 20 steps / never saving"),
             ("goodput_plain_accelerate", None, "goodput of a plain Accelerate loop under the same kills"),
             ("goodput_persistent_only", None, "goodput of dtrain saving every 100 steps, no local tier, same kills"),
             ("sharded_full_save_peak_memory_ratio", None,
              "rank 0's extra peak RSS in a full-state (DDP) save / full state bytes"),
             ("peft_checkpoint_bytes_ratio", None,
              "bytes of a LoRA run's checkpoint / a full fine-tune's, same model (7B: docs/huggingface.md)")]
SCRIPTS = ("bench_loop.py", "bench_checkpoint.py", "bench_resume.py", "bench_startup.py", "bench_goodput.py",
           "bench_sharded.py", "bench_peft.py", "bench_local_tier.py")
GPU_SCRIPTS = ("bench_loop.py", "bench_checkpoint.py")  # the others measure the host side: no GPU part


def run_bench(script: str, extra: list[str]) -> dict:
    """Runs one benchmark script, echoing its output, and returns the JSON object of its last line."""
    cmd = [sys.executable, str(HERE / script), *extra]
    print(f"\n$ python {' '.join([f'benchmarks/{script}', *extra])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(_util.REPO))
    last = ""
    for line in proc.stdout:
        if line.strip():
            if last:
                print(last, flush=True)
            last = line.rstrip("\n")
    if proc.wait() != 0:
        if last:
            print(last, flush=True)
        raise SystemExit(f"benchmarks/run.py: {script} failed with exit code {proc.returncode}")
    try:
        result = json.loads(last)
    except ValueError:
        print(last, flush=True)
        raise SystemExit(f"benchmarks/run.py: {script} did not end with a JSON line") from None
    print(f"  -> {', '.join(f'{k}={_util.fmt(v)}' for k, v in result.items() if k.endswith('ratio'))}")
    return result


def verdict(value, op: str, goal: float) -> str:
    if value is None:
        return "n/a"
    return "met" if (value >= goal if op == ">=" else value <= goal) else "NOT met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--gpu", action="store_true", help="also run on the GPU (where CUDA exists)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    common = ["--quick"] if args.quick else []
    result: dict = {}
    for script in SCRIPTS:
        part = run_bench(script, common)
        part.pop("device", None)
        result.update(part)
    result["device"] = "cpu"

    gpu_note = None
    if args.gpu:
        import torch

        if torch.cuda.is_available():
            for script in GPU_SCRIPTS:
                part = run_bench(script, [*common, "--device", "cuda"])
                part.pop("device", None)
                result.update({f"gpu_{k}": v for k, v in part.items()})
            result["gpu"] = torch.cuda.get_device_name(0)
        else:
            gpu_note = "--gpu: no CUDA GPU on this machine, GPU runs skipped"
            result["gpu"] = None

    rows = [[key, result.get(key), f"{op} {goal}", verdict(result.get(key), op, goal), what]
            for key, op, goal, what in GOALS]
    rows += [[key, result.get(key), "report" if ceiling is None else f"ceiling {_util.fmt(result.get(ceiling))}",
              "", what] for key, ceiling, what in REFERENCE]
    if "gpu_loop_overhead_ratio" in result:
        rows += [[f"gpu_{key}", result.get(f"gpu_{key}"), f"{op} {goal}",
                  verdict(result.get(f"gpu_{key}"), op, goal), what]
                 for key, op, goal, what in GOALS if f"gpu_{key}" in result]
    notes = [f"{'quick (tiny sizes, the figures mean little)' if args.quick else 'full'} run, "
             f"{time.perf_counter() - started:.0f}s; machine {_util.machine()}"]
    if result.get("async_blocking_ratio") is None:
        notes.append("async_blocking_ratio is null: this dtrain has no async_save in CheckpointManager")
    if gpu_note:
        notes.append(gpu_note)
    print()
    print(_util.table("summary", ["ratio", "value", "goal", "", "compares"], rows, notes))
    result["quick"] = args.quick
    result["machine"] = _util.machine()
    _util.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
