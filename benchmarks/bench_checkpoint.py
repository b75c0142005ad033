"""Checkpoint cost: a dtrain checkpoint commit vs plain safetensors + torch.save of the same state, and the disk.

One model (a stack of Linear layers) with an initialised AdamW state, prepared by one Accelerator. Per round,
in a rotating order, each side writes the full state once into a fresh directory:

  dtrain sync commit     CheckpointManager.save(): Accelerate save_state into .tmp-step_N, trainer_state.json,
                         sha256 + fsync of every file, manifest.json, rename, pointer files (retention off)
  save_state alone       accelerator.save_state(dir): what dtrain's commit builds on, without the commit
  plain save             safetensors.torch.save_file(weights) + torch.save(optimizer.state_dict()), no fsync:
                         what a plain script does (the reference of sync_save_vs_raw_ratio)
  plain save + fsync     the same, then fsync of the files and the directory (the same durability as dtrain)
  disk write + fsync     one file of the same size from a bytes buffer, write + fsync: the disk's bandwidth
  dtrain async commit    only when CheckpointManager takes `async_save`: the seconds the caller is held by
                         save() (timed around the call) plus any wait for the snapshot's copy before the next
                         optimizer step, then training steps until the background save is committed, then as
                         many steps with nothing in flight: their difference is how much the background writer
                         slowed the loop down

Before every measurement the previous side's files are deleted and `os.sync()` flushes dirty pages, outside
the timed region, so no side pays for another side's write-back. Figures are medians over the rounds.

    sync_save_vs_raw_fsync_ratio = median MB/s of the dtrain sync commit / median MB/s of the plain save + fsync
    sync_save_vs_disk_ratio      = median MB/s of the dtrain sync commit / median MB/s of the disk write + fsync
    sync_save_vs_raw_ratio       = median MB/s of the dtrain sync commit / median MB/s of the plain save (page
                                   cache; kept for continuity, printed with its ceiling, see below)
    async_blocking_ratio         = median seconds save() holds the caller with async_save=True
                                   / median seconds of a synchronous save()          (null while async is missing)

The ceiling: if the disk's write-back overlapped the serialisation perfectly, a save that is on disk when it
returns would still take the disk's time, so no durable save can beat min(1, disk MB/s / plain save MB/s) here.

Checkpoint overhead on training: the same model trains `overhead_steps` steps (batch 16) three ways, alternating:
never saving, saving every 20 steps (at steps 10, 30, 50, ...) with async_save, and the same synchronously (each
save goes through CheckpointManager.save, the loop calls before_optimizer_step and polls for finished background
saves as the Trainer does, and the run's time includes waiting for the last save to commit):

    checkpoint_overhead_ratio      = median steps/s saving every 20 steps (async) / median steps/s never saving
    checkpoint_overhead_sync_ratio = the same with synchronous saves (printed beside it)
"""

from __future__ import annotations

import gc
import inspect
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)

FULL = dict(width=2048, layers=3, repeats=9,  # 12.6M parameters: 50 MB of weights + 100 MB of AdamW moments
            overhead_steps=60, overhead_repeats=3, large_width=4096, large_layers=6, large_repeats=3)
# large_*: 101M parameters, 1.2 GB of weights and moments (the `_1g` keys)
QUICK = dict(width=256, layers=2, repeats=2, overhead_steps=20, overhead_repeats=1, large_width=512,
             large_layers=2, large_repeats=1)
SAVE_EVERY = 20
MB = 1e6


def async_supported() -> bool:
    from dtrain.checkpoint import CheckpointManager

    return "async_save" in inspect.signature(CheckpointManager).parameters


def build_state(spec: dict, device: str):
    """A prepared model + AdamW with its moments filled (one real optimizer step)."""
    import torch
    from accelerate import Accelerator
    from torch import nn

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device == "cpu")
    model = nn.Sequential(*[nn.Linear(spec["width"], spec["width"]) for _ in range(spec["layers"])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss = model(torch.randn(4, spec["width"], device=accelerator.device)).square().mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator, model, optimizer


def torch_randn(*shape_and_device):
    import torch

    *shape, device = shape_and_device
    return torch.randn(*shape, device=device)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_file(path: Path) -> None:
    from dtrain.utils import fsync_path

    fsync_path(path)


class Sides:
    """Each method writes the state once and returns {"seconds", "bytes", ...}; files go under `root`."""

    def __init__(self, root: Path, spec: dict, device: str):
        from dtrain.checkpoint import CheckpointManager

        self.root, self.device, self.width = root, device, spec["width"]
        self.accelerator, self.model, self.optimizer = build_state(spec, device)
        self.step = 0
        self.sync_manager = CheckpointManager(self.accelerator, root / "sync" / "checkpoints")
        self.async_manager = (CheckpointManager(self.accelerator, root / "async" / "checkpoints", async_save=True)
                              if async_supported() else None)
        self.disk_buffer = os.urandom(self.state_bytes())

    def state_bytes(self) -> int:
        out = self.root / "probe"
        self.plain(out)
        size = dir_bytes(out)
        shutil.rmtree(out)
        return size

    def trainer_state(self) -> dict:
        return {"global_step": self.step, "epoch": 0, "step_in_epoch": self.step, "epoch_samples_seen": 0,
                "samples_seen": 0, "world_size": 1, "task": "bench", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    # -------------------------------------------------------------------------------------- the sides

    def dtrain_sync(self) -> dict:
        self.step += 1
        _util.synchronize(self.device)
        started = time.perf_counter()
        report = self.sync_manager.save(self.step, self.trainer_state(), None)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": report.bytes, "reported_blocking": report.blocking_seconds,
                "path": report.path}

    def dtrain_async(self) -> dict:
        self.step += 1
        _util.synchronize(self.device)
        started = time.perf_counter()
        report = self.async_manager.save(self.step, self.trainer_state(), None)
        held = time.perf_counter() - started
        # The loop goes on training while the save is written in the background; on a small machine the
        # writer competes with it for cores and memory bandwidth. Train until the save is committed, then the
        # same number of steps with nothing in flight: the difference is the loop time the save still cost.
        manager, final, steps, train_started = self.async_manager, None, 0, time.perf_counter()
        while hasattr(manager, "poll") and steps < 200:
            final = manager.poll()
            if final is not None or manager.background_error is not None or getattr(manager, "_in_flight", 1) is None:
                break
            self.train_step(manager)
            steps += 1
        _util.synchronize(self.device)
        with_save = time.perf_counter() - train_started
        final = final or manager.wait() or report
        until_committed = time.perf_counter() - started
        alone_started = time.perf_counter()
        for _ in range(steps):
            self.train_step()
        _util.synchronize(self.device)
        alone = time.perf_counter() - alone_started
        # The parameters and optimizer state are copied during the next step; if that copy was not done when
        # the step reached optimizer.step(), the loop waited for it: that wait holds the loop too.
        waited_before_step = max(0.0, final.blocking_seconds - report.blocking_seconds)
        held += waited_before_step
        return {"seconds": held, "bytes": final.bytes, "reported_blocking": final.blocking_seconds,
                "waited_before_step": waited_before_step,
                "total_seconds": final.total_seconds, "until_committed": until_committed, "steps_during_save": steps,
                "slowdown": with_save - alone if steps else None}

    def train_step(self, manager=None) -> None:
        x = torch_randn(16, self.width, self.accelerator.device)
        loss = self.model(x).square().mean()
        self.accelerator.backward(loss)
        if manager is not None and hasattr(manager, "before_optimizer_step"):
            manager.before_optimizer_step()  # where the Trainer lets a snapshot in progress finish
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def training_run(self, manager, steps: int) -> dict:
        """`steps` training steps, saving every SAVE_EVERY steps through `manager` (None: never saving);
        timed until the last save is committed."""
        _util.synchronize(self.device)
        started = time.perf_counter()
        for step in range(1, steps + 1):
            self.train_step(manager)
            if manager is not None:
                if hasattr(manager, "poll"):
                    manager.poll()
                if step % SAVE_EVERY == SAVE_EVERY // 2:  # steps 10, 30, 50, ...: one save per 20 steps, and
                    # the last one has 10 steps to finish in the background, as in a run that goes on
                    self.step += 1
                    manager.save(self.step, self.trainer_state(), None)
        if manager is not None and hasattr(manager, "wait"):
            manager.wait()
        _util.synchronize(self.device)
        return {"seconds": time.perf_counter() - started, "steps": steps}

    def save_state(self) -> dict:
        out = self.root / "save_state" / f"step_{self.step}"
        _util.synchronize(self.device)
        started = time.perf_counter()
        self.accelerator.save_state(str(out))
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": dir_bytes(out)}

    def plain(self, out: Path, fsync: bool = False) -> dict:
        import torch
        from safetensors.torch import save_file

        _util.synchronize(self.device)
        started = time.perf_counter()
        out.mkdir(parents=True)
        save_file(self.accelerator.unwrap_model(self.model).state_dict(), str(out / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), out / "optimizer.bin")
        if fsync:
            for name in ("model.safetensors", "optimizer.bin"):
                fsync_file(out / name)
            fsync_file(out)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": dir_bytes(out)}

    def plain_nosync(self) -> dict:
        return self.plain(self.root / "plain" / "out")

    def plain_fsync(self) -> dict:
        return self.plain(self.root / "plain_fsync" / "out", fsync=True)

    def disk(self) -> dict:
        out = self.root / "disk"
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(out / "blob", "wb") as f:
            f.write(self.disk_buffer)
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": len(self.disk_buffer)}

    def clean(self) -> None:
        """Between measurements: wait for anything in flight, delete every side's output, flush dirty pages."""
        if self.async_manager is not None:
            self.async_manager.wait()
        for name in ("save_state", "plain", "plain_fsync", "disk"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for manager in (self.sync_manager, self.async_manager):
            if manager is not None and manager.dir.is_dir():
                for path in manager.dir.iterdir():
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        gc.collect()
        os.sync()


def read_files(path: Path) -> int:
    """Reads every byte of the files under `path` (what a verification must read at least); returns the bytes."""
    total, buffer = 0, bytearray(8 << 20)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as stream:
            while n := stream.readinto(buffer):
                total += n
    return total


def verify_rows(sides: Sides, repeats: int) -> dict:
    """verify_vs_read_ratio: `dtrain ckpt verify` (every checksum) of a committed checkpoint against a plain read
    of its files, both from the page cache (what a resume right after a save, or a second verify, reads)."""
    from dtrain.checkpoint.layout import verify_checkpoint

    checkpoint = sides.dtrain_sync()["path"]
    read_files(checkpoint)  # untimed: into the page cache

    def timed(run) -> dict:
        started = time.perf_counter()
        total = run()
        return {"seconds": time.perf_counter() - started, "bytes": total}

    def verify() -> int:
        check = verify_checkpoint(checkpoint, checksums=True)
        assert check.ok, check.reason
        return check.bytes

    runs = _util.alternate([("verify (checksums)", lambda: timed(verify)),
                            ("plain read", lambda: timed(lambda: read_files(checkpoint)))], repeats)
    rate = {name: _util.median(r["bytes"] / r["seconds"] for r in rs) for name, rs in runs.items()}
    ratio = _util.ratio(rate["verify (checksums)"], rate["plain read"])
    print(_util.table("verifying a checkpoint", ["side", "MB/s", "spread"],
                      [[name, rate[name] / MB, _util.spread([r["bytes"] / r["seconds"] / MB for r in rs])]
                       for name, rs in runs.items()],
                      [f"verify_vs_read_ratio (goal >= 0.80) = verify / plain read = {_util.fmt(ratio)}"]))
    return {"verify_vs_read_ratio": ratio, "ckpt_verify_mb_per_s": rate["verify (checksums)"] / MB,
            "ckpt_read_mb_per_s": rate["plain read"] / MB}


def large_rows(spec: dict, device: str, root: Path) -> dict:
    """The two commit ratios again at about 1.2 GB (the `_1g` keys): the gap a slow checksum opened grew with
    the checkpoint's size."""
    large = {**spec, "width": spec["large_width"], "layers": spec["large_layers"]}
    sides = Sides(root / "large", large, device)
    named = [("dtrain sync commit", sides.dtrain_sync), ("plain save + fsync", sides.plain_fsync),
             ("disk write + fsync", sides.disk)]
    for _, run in named:
        sides.clean()
        run()
    runs = _util.alternate(named, spec["large_repeats"], between=sides.clean)
    sides.clean()
    rate = {name: _util.median(r["bytes"] / r["seconds"] for r in rs) for name, rs in runs.items()}
    state_mb = runs["plain save + fsync"][0]["bytes"] / MB
    fsync_ratio = _util.ratio(rate["dtrain sync commit"], rate["plain save + fsync"])
    disk_ratio = _util.ratio(rate["dtrain sync commit"], rate["disk write + fsync"])
    print(_util.table(f"committing {state_mb:.0f} MB", ["side", "MB/s", "spread"],
                      [[name, rate[name] / MB, _util.spread([r["bytes"] / r["seconds"] / MB for r in rs])]
                       for name, rs in runs.items()],
                      [f"sync_save_vs_raw_fsync_ratio_1g (goal >= 0.97) = {_util.fmt(fsync_ratio)}",
                       f"sync_save_vs_disk_ratio_1g (goal >= 0.80) = {_util.fmt(disk_ratio)}"]))
    del sides
    gc.collect()
    return {"sync_save_vs_raw_fsync_ratio_1g": fsync_ratio, "sync_save_vs_disk_ratio_1g": disk_ratio,
            "ckpt_large_state_mb": round(state_mb, 1)}


def object_store_rows(spec: dict, device: str, root: Path) -> dict:
    """The same state committed to an S3 store (moto on loopback) vs a plain upload of the same files: what the
    object-store commit (staging, sha256 while uploading, size check, manifest last, pointers) costs on top of
    moving the bytes. Needs moto and s3fs (the test extra); otherwise says so and measures nothing."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        print(f"object store: not measured ({exc.name} is not installed; pip install -e \".[test]\")")
        return {}
    import logging

    from dtrain.checkpoint import CheckpointManager

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved_env = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("dtrain-bench")
        accelerator, _, _ = build_state(spec, device)
        manager = CheckpointManager(accelerator, "s3://dtrain-bench/commit", staging_dir=root / "staging")
        files = root / "upload"
        accelerator.save_state(str(files))
        step = 0

        def commit() -> dict:
            nonlocal step
            step += 1
            started = time.perf_counter()
            report = manager.save(step, {"global_step": step, "task": "bench"}, None)
            return {"seconds": time.perf_counter() - started, "bytes": report.bytes}

        def upload() -> dict:
            started = time.perf_counter()
            fs.put(str(files), "dtrain-bench/upload/", recursive=True)
            return {"seconds": time.perf_counter() - started, "bytes": dir_bytes(files)}

        def clean() -> None:
            manager.discard_all()
            if fs.exists("dtrain-bench/upload"):
                fs.rm("dtrain-bench/upload", recursive=True)

        named = [("object store commit", commit), ("plain upload", upload)]
        for _, run in named:
            clean()
            run()
        runs = _util.alternate(named, spec["repeats"], between=clean)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        server.stop()

    def rate(name: str):
        return _util.median(r["bytes"] / r["seconds"] for r in runs[name])

    rows = [[name, _util.median(r["seconds"] for r in runs[name]), rate(name) / MB,
             _util.spread([r["bytes"] / r["seconds"] / MB for r in runs[name]]), runs[name][0]["bytes"] / MB]
            for name, _ in named]
    store_ratio = _util.ratio(rate("object store commit"), rate("plain upload"))
    print(_util.table("checkpoint save to an object store (moto S3 on loopback)",
                      ["side", "median s", "median MB/s", "MB/s min..max", "MB"], rows,
                      [f"store_commit_vs_upload_ratio = commit / plain upload (s3fs put) = {_util.fmt(store_ratio)}"]))
    return {"store_commit_vs_upload_ratio": store_ratio,
            "ckpt_store_commit_mb_per_s": rate("object store commit") / MB,
            "ckpt_store_plain_upload_mb_per_s": rate("plain upload") / MB}


def main(argv: list[str] | None = None) -> dict:
    parser = _util.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None,
                        help="where to write (default: a temporary directory; it should be on the disk to measure)")
    _util.add_threads_flag(parser)
    args = parser.parse_args(argv)
    spec = _util.chosen_spec(args, QUICK, FULL)
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-ckpt-", dir=args.workdir))
    started = time.perf_counter()
    try:
        sides = Sides(root, spec, args.device)
        named = [("dtrain sync commit", sides.dtrain_sync), ("save_state alone", sides.save_state),
                 ("plain save", sides.plain_nosync), ("plain save + fsync", sides.plain_fsync),
                 ("disk write + fsync", sides.disk)]
        if sides.async_manager is not None:
            named.append(("dtrain async commit", sides.dtrain_async))
        for _, run in named:  # one untimed round: first-call costs (imports, allocator) hit no side
            sides.clean()
            run()
        runs = _util.alternate(named, spec["repeats"], between=sides.clean)
        sides.clean()
        steps = spec["overhead_steps"]
        trainings = [("never saving", lambda: sides.training_run(None, steps)),
                     ("sync save every 20 steps", lambda: sides.training_run(sides.sync_manager, steps))]
        if sides.async_manager is not None:
            trainings.append(("async save every 20 steps", lambda: sides.training_run(sides.async_manager, steps)))
        sides.training_run(None, min(steps, 5))  # untimed warm-up of the training path
        runs.update(_util.alternate(trainings, spec["overhead_repeats"], between=sides.clean))
        sides.clean()
        verified = verify_rows(sides, spec["repeats"])
        sides.clean()
        store = object_store_rows(spec, args.device, root)
        large = large_rows(spec, args.device, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def med(name: str, key: str = "seconds"):
        return _util.median(r.get(key) for r in runs.get(name, []))

    def rate(name: str):
        return _util.median(r["bytes"] / r["seconds"] for r in runs.get(name, []))

    state_mb = runs["plain save"][0]["bytes"] / MB
    writers = [name for name, _ in named if name != "dtrain async commit"]
    rows = []
    for name in writers:
        rates = [r["bytes"] / r["seconds"] / MB for r in runs[name]]
        rows.append([name, med(name), rate(name) / MB, _util.spread(rates), runs[name][0]["bytes"] / MB])
    sync_ratio = _util.ratio(rate("dtrain sync commit"), rate("plain save"))
    fsync_ratio = _util.ratio(rate("dtrain sync commit"), rate("plain save + fsync"))
    disk_ratio = _util.ratio(rate("dtrain sync commit"), rate("disk write + fsync"))
    # If write-back overlapped serialisation perfectly, a durable save would take max(plain write, disk) seconds.
    ceiling = min(1.0, _util.ratio(rate("disk write + fsync"), rate("plain save")) or 0.0)
    notes = [f"state: {spec['layers']} x Linear({spec['width']}, {spec['width']}) + AdamW moments = "
             f"{state_mb:.1f} MB; device {args.device}; {spec['repeats']} rounds, sides in rotating order; "
             f"os.sync() between sides (untimed)",
             f"sync_save_vs_raw_fsync_ratio (goal >= 0.97) = dtrain sync / plain save + fsync (the same "
             f"durability) = {_util.fmt(fsync_ratio)}",
             f"sync_save_vs_disk_ratio (goal >= 0.80) = dtrain sync / disk write + fsync of as many bytes = "
             f"{_util.fmt(disk_ratio)}",
             f"sync_save_vs_raw_ratio (for continuity) = dtrain sync / plain save into the page cache = "
             f"{_util.fmt(sync_ratio)};",
             f"  its ceiling for any save that is on disk when it returns, here: disk / plain save = "
             f"{_util.fmt(ceiling)}"]
    print(_util.table("checkpoint save: dtrain vs plain writes vs the disk",
                      ["side", "median s", "median MB/s", "MB/s min..max", "MB"], rows, notes))

    async_ratio = effective_ratio = None
    if "dtrain async commit" in runs:
        sync_held = med("dtrain sync commit")
        held = med("dtrain async commit")
        slowdown = med("dtrain async commit", "slowdown")
        async_ratio = _util.ratio(held, sync_held)
        effective_ratio = _util.ratio(held + max(slowdown or 0.0, 0.0), sync_held)
        async_rows = [
            ["sync save(): loop held", sync_held, "", ""],
            ["async save(): loop held (around the call + wait before next step)", held,
             _util.spread([r["seconds"] for r in runs["dtrain async commit"]]), async_ratio],
            ["  of which waited before the next optimizer step", med("dtrain async commit", "waited_before_step"),
             "", ""],
            ["  its SaveReport.blocking_seconds", med("dtrain async commit", "reported_blocking"), "", ""],
            ["  committed after (SaveReport.total_seconds)", med("dtrain async commit", "total_seconds"), "", ""],
            [f"  training slowed down meanwhile ({_util.fmt(med('dtrain async commit', 'steps_during_save'))} steps)",
             slowdown, _util.spread([r["slowdown"] for r in runs["dtrain async commit"]]), ""],
            ["  held + slowdown", held + max(slowdown or 0.0, 0.0), "", effective_ratio]]
        print(_util.table("async checkpoint: seconds the training loop is held",
                          ["what", "median s", "min..max s", "/ sync held"], async_rows,
                          ["async_blocking_ratio (goal <= 0.03) = async held / sync held = " + _util.fmt(async_ratio),
                           "slowdown: the steps trained while the save was written in the background, minus the same "
                           "number of steps with nothing in flight (median; the model above, batch 16)"]))
    else:
        print("async checkpoint: not measured: this dtrain's CheckpointManager has no async_save parameter; "
              "async_blocking_ratio = null")

    def steps_per_s(name: str):
        return _util.median(r["steps"] / r["seconds"] for r in runs.get(name, []))

    never = steps_per_s("never saving")
    overhead_sync = _util.ratio(steps_per_s("sync save every 20 steps"), never)
    overhead_async = _util.ratio(steps_per_s("async save every 20 steps"), never)
    overhead_rows = [[name, steps_per_s(name), _util.spread([r["steps"] / r["seconds"] for r in runs[name]]),
                      _util.ratio(steps_per_s(name), never)] for name, _ in trainings]
    print(_util.table("checkpoint overhead: steps/s of training that saves every 20 steps",
                      ["run", "median steps/s", "min..max", "/ never saving"], overhead_rows,
                      [f"{steps} steps of the model above (batch 16) per run, {spec['overhead_repeats']} alternating "
                       f"repeats; each run is timed until its last save is committed; torch threads: "
                       f"{_util.threads_note()}",
                       f"checkpoint_overhead_ratio (goal >= 0.90) = async / never saving = "
                       f"{_util.fmt(overhead_async)}; with synchronous saves: {_util.fmt(overhead_sync)}"]))
    print(f"  wall time {time.perf_counter() - started:.0f}s")
    return {"sync_save_vs_raw_ratio": sync_ratio, "async_blocking_ratio": async_ratio,
            "sync_save_vs_disk_ratio": disk_ratio, "checkpoint_overhead_ratio": overhead_async,
            "checkpoint_overhead_sync_ratio": overhead_sync,
            "ckpt_never_saving_steps_per_s": never,
            "async_supported": "dtrain async commit" in runs,
            "async_blocking_with_slowdown_ratio": effective_ratio,
            "sync_save_vs_raw_fsync_ratio": fsync_ratio, "sync_save_ceiling_ratio": ceiling,
            "ckpt_state_mb": round(state_mb, 2),
            "ckpt_dtrain_sync_mb_per_s": rate("dtrain sync commit") / MB,
            "ckpt_save_state_mb_per_s": rate("save_state alone") / MB,
            "ckpt_plain_mb_per_s": rate("plain save") / MB,
            "ckpt_plain_fsync_mb_per_s": rate("plain save + fsync") / MB,
            "ckpt_disk_fsync_mb_per_s": rate("disk write + fsync") / MB,
            "ckpt_sync_blocking_s": med("dtrain sync commit"),
            "ckpt_async_blocking_s": med("dtrain async commit") if async_ratio is not None else None,
            "ckpt_async_total_s": med("dtrain async commit", "total_seconds") if async_ratio is not None else None,
            "ckpt_repeats": spec["repeats"], "device": args.device, **store, **verified, **large}


if __name__ == "__main__":
    _util.emit(main())
