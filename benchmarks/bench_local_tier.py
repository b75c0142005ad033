"""The node-local tier's cost to the loop: how long a local-tier save holds training, against a synchronous save
to the persistent tier of the same state (the same 12.6M-parameter model + AdamW as bench_checkpoint.py).

    local_save_blocking_ratio = median seconds a local-tier save holds the loop (the host copy, and any wait for
                                it at the next optimizer step) / median seconds a synchronous persistent save does

The local tier is a directory under /dev/shm when it exists (a RAM disk, as in production), else the work dir.
`goodput_tiered_ratio` (the kill -9 schedule with both tiers) is measured by bench_goodput.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)
from bench_checkpoint import FULL, QUICK, Sides  # noqa: E402


def local_save(sides: Sides, tier) -> dict:
    """One local-tier save, then training until it has committed: the seconds the loop was held."""
    sides.step += 1
    started = time.perf_counter()
    tier.save(sides.step, sides.trainer_state())
    held = time.perf_counter() - started
    report, steps = None, 0
    while report is None and steps < 500:
        sides.train_step(tier)  # calls tier.before_optimizer_step(): a copy not yet done holds the loop there
        report = tier.poll()
        steps += 1
    report = report or tier.wait()
    return {"seconds": max(held, report.blocking_seconds), "total": report.total_seconds, "bytes": report.bytes}


def main(argv: list[str] | None = None) -> int:
    parser = _util.base_parser(__doc__.splitlines()[0])
    _util.add_threads_flag(parser)
    args = parser.parse_args(argv)
    spec = _util.chosen_spec(args, QUICK, FULL)
    from dtrain.checkpoint.local_tier import LocalTier

    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-local-"))
    local_root = Path(tempfile.mkdtemp(prefix="dtrain-bench-local-", dir=shm if shm.is_dir() else root))
    try:
        sides = Sides(root, spec, args.device)
        tier = LocalTier(sides.accelerator, str(local_root))
        results = _util.alternate([("local", lambda: local_save(sides, tier)), ("sync", sides.dtrain_sync)],
                                  spec["repeats"])
        local = _util.median(r["seconds"] for r in results["local"])
        sync = _util.median(r["seconds"] for r in results["sync"])
        rows = [["local tier (async, RAM disk)" if shm.is_dir() else "local tier (async)", local,
                 _util.median(r["total"] for r in results["local"]), _util.spread([r["seconds"] for r in results["local"]])],
                ["persistent, synchronous", sync, sync, _util.spread([r["seconds"] for r in results["sync"]])]]
        print(_util.table(f"loop held by a save, {results['local'][0]['bytes'] / 1e6:.0f} MB of state, "
                          f"{spec['repeats']} repeats", ["save", "held (s, median)", "until committed (s)", "spread"],
                          rows))
        print(json.dumps({"local_save_blocking_ratio": _util.ratio(local, sync)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(local_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
