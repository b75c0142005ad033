"""Resume start-up: process start -> first optimizer step, resuming a checkpoint vs starting fresh.

The model of bench_checkpoint.py (3 x Linear(2048, 2048) + AdamW: a 151 MB checkpoint) as a user task
(benchmarks/bench_task.py), run as a real process: `python dtrain/train.py --task benchmarks.bench_task:build`.
Timed from just before the process is started to the end of its first optimizer step (the task writes the
time then and exits), so imports, building the model, the Accelerator, the run lock, resolving and verifying the
checkpoint (sizes), loading it (`Accelerator.load_state`, RNG), the resume checks and the first step all count.

    fresh    an empty output directory
    resume   `--resume latest` of a run that saved its checkpoint at step 2 (kept from one run to the next:
             each resumed run exits at its first step, before it could save)

Alternating, several repeats, medians. The checkpoint is read from the page cache (it was just written), as
for a restart on the same machine; from a cold disk add its size / the disk's read bandwidth.

    resume_startup_ratio = median seconds to the first step (resume) / median seconds (fresh)   (goal <= 1.30)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)

FULL = dict(width=2048, layers=3, repeats=5)
QUICK = dict(width=256, layers=2, repeats=1)
TIMEOUT = 300


def command(spec: dict, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(_util.REPO / "dtrain" / "train.py"), "--task", "benchmarks.bench_task:build",
            "--n-layer", str(spec["layers"]), "--n-embd", str(spec["width"]), "--n-head", "1",
            "--batch-size", "16", "--epochs", "0", "--eval-every-steps", "0", "--log-every-steps", "1",
            "--save-every-steps", "0", "--warmup-steps", "0", "--output-dir", str(output_dir), *extra]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"PYTHONPATH": str(_util.REPO), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}, **extra)
    return env


def run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=str(_util.REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=TIMEOUT, start_new_session=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_startup: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc.stdout


def time_to_first_step(spec: dict, output_dir: Path, *extra: str) -> dict:
    stamp = output_dir.parent / f"{output_dir.name}.first-step"
    stamp.unlink(missing_ok=True)
    started = time.time()
    run(command(spec, output_dir, "--max-steps", "1000", *extra), environment(DTRAIN_BENCH_FIRST_STEP_FILE=str(stamp)))
    return {"seconds": float(stamp.read_text()) - started}


def main(argv: list[str] | None = None) -> dict:
    parser = _util.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    spec = _util.chosen_spec(args, QUICK, FULL)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-startup-"))
    try:
        saved = root / "saved"
        run(command(spec, saved, "--max-steps", "2"), environment())  # the checkpoint to resume: step 2
        checkpoint = saved / "checkpoints" / "step_000000002"
        size_mb = sum(p.stat().st_size for p in checkpoint.iterdir()) / 1e6

        def fresh() -> dict:
            shutil.rmtree(root / "fresh", ignore_errors=True)
            return time_to_first_step(spec, root / "fresh")

        def resume() -> dict:
            return time_to_first_step(spec, saved, "--resume", "latest")

        resume()  # untimed: first-call costs (bytecode caches, page cache) hit no side
        runs = _util.alternate([("fresh", fresh), ("resume", resume)], spec["repeats"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {name: _util.median(r["seconds"] for r in values) for name, values in runs.items()}
    ratio = _util.ratio(med["resume"], med["fresh"])
    rows = [["start fresh (empty output dir)", med["fresh"], _util.spread([r["seconds"] for r in runs["fresh"]])],
            [f"resume a {size_mb:.1f} MB checkpoint (--resume latest)", med["resume"],
             _util.spread([r["seconds"] for r in runs["resume"]])]]
    print(_util.table("resume start-up: process start -> first optimizer step", ["run", "median s", "min..max s"],
                      rows, [f"{spec['layers']} x Linear({spec['width']}, {spec['width']}) + AdamW, batch 16, "
                             f"`python dtrain/train.py`, {spec['repeats']} alternating repeats",
                             f"resume_startup_ratio (goal <= 1.30) = resume / fresh = {_util.fmt(ratio)}",
                             f"wall time {time.perf_counter() - started:.0f}s"]))
    return {"resume_startup_ratio": ratio, "startup_fresh_s": med["fresh"], "startup_resume_s": med["resume"],
            "startup_checkpoint_mb": round(size_mb, 2), "startup_repeats": spec["repeats"]}


if __name__ == "__main__":
    _util.emit(main())
