"""Sharded checkpoints: committing a 2-rank FSDP2 checkpoint vs the full-state (DDP) checkpoint of the same model.

The benchmark starts 2 ranks itself (`python -m torch.distributed.run --nproc_per_node 2 ... bench_sharded.py
--worker`, gloo on the CPU, a free port, a timeout; every process of the launch is in a session of its own and is
killed with it). In the workers, each side is a dtrain `Trainer(config, task)` of the charlm task, the same size
and seed on both sides:

  sharded (fsdp2)      `--sharding fsdp2`: every rank holds half of every parameter and of its AdamW state and
                       writes only its own shards (Accelerate's save_state: torch.distributed.checkpoint files
                       pytorch_model_fsdp_0/ and optimizer_0/), then dtrain's commit
  full state (ddp)     `--sharding none`: plain data parallelism, every rank holds everything, rank 0 writes
                       model.safetensors + optimizer.bin (dtrain's one-pass writer), then the same commit

Per round, in alternating order (A B, B A, ...), each side gets a fresh Trainer (a fresh Accelerator in the same
processes); `fit()` with max_steps 1 takes one optimizer step (AdamW's moments filled) and ends with its final
checkpoint, which is that Trainer's untimed warm-up save. Then `saves` timed saves: before each, untimed, rank 0
deletes the committed checkpoints, every rank runs `gc.collect()`, `malloc_trim(0)` (freed heap pages go back to
the OS, so they cannot hide a save's allocations) and `os.sync()`, and the ranks meet in a barrier; timed is only
`CheckpointManager.save()` (synchronous, async off: the whole commit, i.e. the files, the manifest with every
file's checksum, the fsyncs, the rename and the `latest` pointer; retention off). A first round of both sides is a
warm-up too and is not counted.

    MB/s                           = bytes of the committed directory (sum of its file sizes) / seconds of save()
    sharded_save_vs_full_ratio     = median MB/s (sharded) / median MB/s (full state)                (goal >= 1.0)
    extra peak                     = VmHWM right after save() - VmRSS right before it, where the peak was reset
                                     (`5` written to /proc/self/clear_refs) just before the call
    sharded_save_peak_memory_ratio = median extra peak of rank 0 during a sharded save
                                     / bytes of the full state (all parameters + AdamW state of the whole,
                                     unsharded model)                                                 (goal <= 0.6)

The full-state save's extra peak is printed beside it, and rank 1's peaks too. Figures are medians over the
rounds x saves of each side (the spread is printed next to them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)

# charlm: 12 * n_embd^2 parameters per block. Full: 12.9M parameters = 52 MB of weights + 103 MB of AdamW moments.
FULL = dict(n_layer=4, n_embd=512, n_head=8, block_size=32, batch_size=8, corpus_bytes=200_000, rounds=6, saves=3,
            timeout=420)
QUICK = dict(n_layer=2, n_embd=128, n_head=2, block_size=16, batch_size=4, corpus_bytes=20_000, rounds=2, saves=1,
             timeout=150)
SEED = 1234
RANKS = 2
SIDES = (("sharded (fsdp2)", "fsdp2"), ("full state (ddp)", "none"))
MB = 1e6


# ------------------------------------------------------------------------------------------ peak memory (Linux)

def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> int | None:
    """Resets this process's peak RSS (VmHWM) to its current RSS; returns that RSS (None: not on this system)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _load_malloc_trim():
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = (ctypes.c_size_t,), ctypes.c_int
    return function


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Freed memory back to the OS, so that a save's allocations show in its peak instead of reusing pages an
    earlier side or save left resident."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


# ------------------------------------------------------------------------------------------ the workers (2 ranks)

def make_config(spec: dict, output_dir: Path, sharding: str):
    from dtrain.config import build_config

    return build_config(flag_values={
        "output_dir": str(output_dir), "task": "charlm", "device": "cpu", "seed": SEED, "sharding": sharding,
        "n_layer": spec["n_layer"], "n_embd": spec["n_embd"], "n_head": spec["n_head"],
        "block_size": spec["block_size"], "corpus_bytes": spec["corpus_bytes"], "sample_chars": 0, "dropout": 0.0,
        "batch_size": spec["batch_size"], "epochs": 0, "max_steps": 1, "warmup_steps": 0, "eval_every_steps": 0,
        "log_every_steps": 1, "save_every_steps": 0, "save_every_epochs": 0, "save_every_seconds": 0.0,
        "keep_last": 0, "async_save": False,
        "collective_timeout_seconds": 120.0,  # a rank left alone fails after this long instead of hanging
    })


def build_task(config):
    from accelerate.utils import set_seed

    from dtrain.tasks import build_task as build

    set_seed(SEED)
    task = build(config.task, SEED)
    task.eval_data = None  # no evaluation (also not the one at the end of fit)
    task.sample = None
    return task


def state_bytes(trainer) -> tuple[int, int]:
    """(bytes of the whole model's parameters + AdamW state, bytes of them this rank holds). A DTensor's numel()
    is the global one, its to_local() this rank's shard."""
    import torch
    from torch.distributed.tensor import DTensor

    def sizes(tensor) -> tuple[int, int]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return tensor.numel() * tensor.element_size(), local.numel() * local.element_size()

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    tensors = list(trainer.model.parameters())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    pairs = [sizes(t) for t in tensors]
    return sum(whole for whole, _ in pairs), sum(held for _, held in pairs)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_save(trainer, step: int) -> dict:
    """One synchronous commit through the Trainer's CheckpointManager, on every rank; returns every rank's
    seconds and peaks (on rank 0; None on the others)."""
    import torch.distributed as dist

    acc, manager = trainer.accelerator, trainer.checkpoints
    if acc.is_main_process:  # the committed checkpoints of earlier saves: every save starts from the same disk
        for path in manager.dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
    acc.wait_for_everyone()
    release_free_memory()
    os.sync()  # no save pays for another's write-back
    state = trainer.state_dict()  # untimed: what Trainer._save hands the manager (a collective)
    inner: list[float] = []
    acc.save_state = _timing(acc.save_state, inner)  # dtrain calls it for sharded state only
    acc.wait_for_everyone()
    before = reset_peak()
    started = time.perf_counter()
    try:
        report = manager.save(step, state, None)
    finally:
        del acc.save_state  # the class's method again
    seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM") if before is not None else None
    mine = {"seconds": seconds, "rss_before": before, "peak": peak,
            "extra": peak - before if peak is not None and before is not None else None,
            "bytes": dir_bytes(Path(report.path)) if acc.is_main_process else None,
            "reported_bytes": report.bytes, "save_state_seconds": sum(inner) if inner else None}
    everyone: list = [None] * acc.num_processes
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone, "bytes": everyone[0]["bytes"]} if acc.is_main_process else None


def _timing(function, seconds: list[float]):
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    return timed


def run_side(spec: dict, root: Path, sharding: str, index: int) -> dict | None:
    from dtrain.training.trainer import Trainer

    out = root / f"{index:02d}-{sharding}"
    config = make_config(spec, out, sharding)
    trainer = Trainer(config, build_task(config))
    trainer.fit()  # one optimizer step (AdamW's moments filled), then its final checkpoint: the warm-up save
    whole, held = state_bytes(trainer)
    saves = [timed_save(trainer, 2 + i) for i in range(spec["saves"])]
    # (On an error no barrier: the rank raises, and torch.distributed.run stops the other one.)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
    del trainer  # its model and optimizer go before the next side's are built
    release_free_memory()
    if saves[0] is None:
        return None
    return {"saves": saves, "full_state_bytes": whole, "held_bytes": held}


def worker(args) -> None:
    import torch.distributed as dist

    spec = json.loads(args.spec)
    _util.set_threads(args.threads)
    root = Path(args.dir)
    (root / "pids").mkdir(exist_ok=True)
    (root / "pids" / f"rank{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))  # for the harness
    counter = iter(range(10_000))
    named = [(name, lambda sharding=sharding: run_side(spec, root, sharding, next(counter)))
             for name, sharding in SIDES]
    for _, run in named:  # one untimed round of both sides
        run()
    runs = _util.alternate(named, spec["rounds"])
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps({"runs": runs, "order": [n for n, _ in SIDES]}))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the harness

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "TORCHELASTIC_", "FSDP_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # One malloc arena: malloc_trim(0) can then hand every freed page back before a save. With glibc's
    # per-thread arenas, the tops of the helper threads' heaps (the hashing and fsync threads of an earlier save)
    # stay resident, and the next save reuses them without its peak showing them (the same on both sides).
    env.update({"PYTHONPATH": str(_util.REPO), "PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "1"})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def launch(spec: dict, root: Path, threads: int) -> dict:
    """Runs the 2 workers under torch.distributed.run; returns what rank 0 wrote. On a timeout, an error or Ctrl-C
    it stops the launch and then every worker it started (torch.distributed.run puts each worker in a session of
    its own, so they are ended by the process ids they recorded)."""
    result, log = root / "result.json", root / "launch.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(RANKS),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--worker", "--dir", str(root), "--result", str(result), "--spec", json.dumps(spec),
           "--threads", str(threads)]
    with open(log, "w") as out:  # a file, not a pipe: a stray worker holding it open cannot block the parent
        proc = subprocess.Popen(cmd, cwd=str(_util.REPO), env=worker_env(threads), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=spec["timeout"])
    except subprocess.TimeoutExpired:
        stop_launch(proc, root)
        raise SystemExit(f"bench_sharded: the 2-rank launch took longer than {spec['timeout']}s and was stopped:\n"
                         f"{_tail(log)}") from None
    except BaseException:
        stop_launch(proc, root)
        raise
    if proc.returncode != 0 or not result.exists():
        stop_launch(proc, root)  # a worker may outlive a failed launch
        raise SystemExit(f"bench_sharded: the 2-rank launch failed (exit {proc.returncode}):\n{_tail(log)}")
    return json.loads(result.read_text())


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else ""


def stop_launch(proc: subprocess.Popen, root: Path) -> None:
    """SIGTERM to torch.distributed.run (it stops its workers), SIGKILL after 10 s; then SIGKILL to every worker
    of this launch still alive, by the id it recorded (checked against its command line first)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for record in (root / "pids").glob("rank*"):
        pid = int(record.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone
        if b"--worker" in cmdline and str(root).encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def summarise(spec: dict, data: dict, wall: float) -> dict:
    runs = data["runs"]
    saves = {name: [s for run in runs[name] for s in run["saves"]] for name, _ in SIDES}
    full_bytes = {name: runs[name][0]["full_state_bytes"] for name, _ in SIDES}
    held = {name: runs[name][0]["held_bytes"] for name, _ in SIDES}
    full_state = full_bytes["full state (ddp)"]

    def rate(save: dict) -> float:
        return save["bytes"] / save["ranks"][0]["seconds"]

    def extra(save: dict, rank: int = 0):
        return save["ranks"][rank]["extra"]

    def med(name: str, value):
        return _util.median(value(s) for s in saves[name])

    sharded, full = (name for name, _ in SIDES)
    mb_s = {name: med(name, rate) for name in saves}
    peak = {name: med(name, extra) for name in saves}
    speed_ratio = _util.ratio(mb_s[sharded], mb_s[full])
    memory_ratio = _util.ratio(peak[sharded], full_state)
    # Per round: the median of each side's saves in that round, sharded / full (the spread of the ratio).
    round_ratios = [_util.ratio(_util.median(rate(s) for s in a["saves"]), _util.median(rate(s) for s in b["saves"]))
                    for a, b in zip(runs[sharded], runs[full])]

    rows = []
    for name in saves:
        rows.append([name, med(name, lambda s: s["ranks"][0]["seconds"]), mb_s[name] / MB,
                     _util.spread([rate(s) / MB for s in saves[name]]), saves[name][0]["bytes"] / MB,
                     held[name] / MB, _mb(peak[name]), _util.spread([_mb(extra(s)) for s in saves[name]]),
                     _util.ratio(peak[name], full_state), _mb(med(name, lambda s: extra(s, 1)))])
    rows.append(["sharded / full", "", speed_ratio, _util.spread(round_ratios), "", "",
                 _util.ratio(peak[sharded], peak[full]), "", "", ""])
    n = spec["rounds"] * spec["saves"]
    inner = med(sharded, lambda s: s["ranks"][0]["save_state_seconds"])
    total = med(sharded, lambda s: s["ranks"][0]["seconds"])
    notes = [f"charlm n_layer={spec['n_layer']} n_embd={spec['n_embd']} n_head={spec['n_head']} "
             f"block={spec['block_size']}, AdamW; full state (all parameters + AdamW moments, unsharded) = "
             f"{full_state / MB:.1f} MB (sharded side counts {full_bytes[sharded] / MB:.1f} MB); 2 ranks, gloo, "
             f"CPU, torch threads per rank: {spec['threads'] or 'default'}",
             f"{spec['rounds']} rounds (A B, B A, ...) after a warm-up round, each side a fresh Trainer per round "
             f"with its own warm-up save, then {spec['saves']} timed save(s): {n} per side; between saves (untimed) "
             f"the committed checkpoint is deleted, gc + malloc_trim + os.sync()",
             "MB/s = bytes of the committed directory / seconds of CheckpointManager.save() on rank 0 (sync: "
             "files, checksummed manifest, fsyncs, rename, pointer); 'sharded / full' MB/s min..max: per round",
             "extra peak = VmHWM after save() - VmRSS before it (peak reset via /proc/self/clear_refs); "
             "'/ full state' = rank 0's extra peak / the full state's bytes; last column: rank 1",
             f"sharded commit on rank 0: Accelerate's save_state (torch.distributed.checkpoint, every rank its "
             f"shards) {_util.fmt(inner)} s of {_util.fmt(total)} s; the rest is dtrain's commit (rank 0 hashes "
             f"and fsyncs every rank's files, manifest, rename, pointer)",
             f"sharded_save_vs_full_ratio (goal >= 1.0) = {_util.fmt(speed_ratio)}; "
             f"sharded_save_peak_memory_ratio (goal <= 0.6) = {_util.fmt(memory_ratio)} "
             f"(the full-state save: {_util.fmt(_util.ratio(peak[full], full_state))})",
             f"wall time {wall:.0f}s"]
    print(_util.table("sharded checkpoint commit: 2-rank FSDP2 vs full state (DDP), same model",
                      ["side", "median s", "median MB/s", "MB/s min..max", "MB committed", "MB held by rank 0",
                       "extra peak MB", "min..max MB", "/ full state", "rank 1 extra peak MB"], rows, notes))
    return {"sharded_save_vs_full_ratio": speed_ratio, "sharded_save_peak_memory_ratio": memory_ratio,
            "sharded_full_save_peak_memory_ratio": _util.ratio(peak[full], full_state),
            "sharded_save_mb_per_s": mb_s[sharded] / MB, "sharded_full_save_mb_per_s": mb_s[full] / MB,
            "sharded_save_seconds": med(sharded, lambda s: s["ranks"][0]["seconds"]),
            "sharded_save_state_seconds": inner,
            "sharded_full_save_seconds": med(full, lambda s: s["ranks"][0]["seconds"]),
            "sharded_save_extra_peak_mb": _mb(peak[sharded]), "sharded_full_save_extra_peak_mb": _mb(peak[full]),
            "sharded_save_rank1_extra_peak_mb": _mb(med(sharded, lambda s: extra(s, 1))),
            "sharded_full_state_bytes": full_state, "sharded_held_bytes_rank0": held[sharded],
            "sharded_committed_mb": saves[sharded][0]["bytes"] / MB,
            "sharded_full_committed_mb": saves[full][0]["bytes"] / MB,
            "sharded_round_ratios": [round(r, 4) for r in round_ratios if r is not None],
            "sharded_repeats": n}


def _mb(value):
    return None if value is None else value / MB


def main(argv: list[str] | None = None) -> dict | None:
    parser = _util.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None,
                        help="where to write (default: a temporary directory; it should be on the disk to measure)")
    _util.add_threads_flag(parser, "each rank")
    parser.add_argument("--worker", action="store_true", help=_hidden())
    parser.add_argument("--dir", help=_hidden())
    parser.add_argument("--result", help=_hidden())
    parser.add_argument("--spec", help=_hidden())
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.device != "cpu":
        raise SystemExit("bench_sharded: only --device cpu (2 ranks over gloo) is implemented")
    if reset_peak() is None:
        print("bench_sharded: /proc/self/clear_refs is not available here: the peak-memory figures will be null")
    spec = _util.chosen_spec(args, QUICK, FULL)
    if args.repeats:  # --repeats sets the rounds
        spec["rounds"] = args.repeats
    spec["threads"] = args.threads
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-sharded-", dir=args.workdir))
    try:
        data = launch(spec, root, args.threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return summarise(spec, data, time.perf_counter() - started)


def _hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    result = main()
    if result is not None:
        _util.emit(result)
