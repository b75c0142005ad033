"""Goodput under failures: training kept per second of wall time when the job is killed with SIGKILL now and then.

Four jobs train the same model (the Linear stack of bench_task.py, batch 16) one after the other for the same
wall-clock time under the same seeded schedule of `kill -9` of the whole job (process group) - about one every
20-30 s, every other one aimed at a save in progress (the harness waits, up to a few seconds, until it sees one
being written) - and each is restarted at once by the harness, as a cluster's restart policy would:

  dtrain   `python dtrain/train.py --task benchmarks.bench_task:build --save-every-steps N --async-save
           --resume auto --keep-last 2`
  plain    a hand-written Accelerate loop (this file, `--worker plain`) that saves with `save_state()` every N
           steps, with Accelerate's automatic checkpoint naming and `total_limit=2`, registers a small progress
           object for its step count, and on start calls `load_state()` (the newest checkpoint) and sets the
           checkpoint counter after it, as Accelerate's error message tells users to
  dtrain tiered            the dtrain command with the node-local tier: `--local-checkpoint-dir DIR
           --local-save-every-steps 5` (DIR in /dev/shm when it is writable, else in the work directory) and
           `--save-every-steps 100 --async-save` for the persistent tier; a restart resumes from the newest step
           complete in either tier and promotes a local one to the persistent tier
  dtrain persistent only   the same persistent saves (every 100 steps, async), no local tier: what the tiered
           job would keep without its local tier

A restart that crashes is restarted again (its time is what it costs); a restart that silently resumes from an
older step loses those steps. At the end each job is killed and its final lineage is read: dtrain's is what
`--resume latest` would load (for the tiered job: the newer of the persistent tier's latest complete checkpoint
and the local tier's newest complete one, which is what its next start resumes from); plain's is the checkpoint
`load_state()` would load, or, if that one does not load, the newest one that does (what a person would fall
back to by hand; the crashed restarts are counted).

    goodput = optimizer steps in the final checkpoint's lineage / (clean steps/s x wall time)
    goodput_ratio = dtrain goodput (printed beside the plain Accelerate loop's)     (goal: dtrain >= 0.80)
    goodput_tiered_ratio = dtrain tiered goodput (printed beside persistent only's and plain Accelerate's)
                                                                                     (goal: tiered >= 0.90)

"clean steps/s" is the plain loop trained without saving, killing or restarting (`--worker clean`): the rate
a job that never fails and never saves would reach. Every job is measured against it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)

# save_every: dtrain's and plain's saves; the tiered job saves locally every local_every steps and persistently
# every tiered_every steps (persistent only: the same persistent saves, no local tier).
FULL = dict(width=1024, layers=3, save_every=50, local_every=5, tiered_every=100, duration=120.0, clean_seconds=15.0,
            kill_every=(20.0, 30.0), aim_patience=8.0)
QUICK = dict(width=256, layers=2, save_every=100, local_every=5, tiered_every=100, duration=12.0, clean_seconds=3.0,
             kill_every=(7.0, 8.5), aim_patience=2.0)  # checks that the harness works; start-up alone takes
# seconds, so the figures mean little
SEED = 1234
BATCH = 16


# ------------------------------------------------------------------------------------------ the plain worker

class Progress:
    """The plain loop's step count, saved by Accelerate with its checkpoint (register_for_checkpointing)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def plain_worker(directory: Path, width: int, layers: int, save_every: int, clean_seconds: float = 0.0) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from bench_task import SAMPLES, build_model, reconstruction_loss

    set_seed(SEED)
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(directory), automatic_checkpoint_naming=True, total_limit=2))
    model = build_model(width, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    checkpoints = directory / "checkpoints"
    if not clean_seconds and checkpoints.is_dir() and any(checkpoints.iterdir()):
        accelerator.load_state()  # the newest checkpoint_<n>
        newest = max(int(p.name.rsplit("_", 1)[1]) for p in checkpoints.iterdir() if p.name.startswith("checkpoint_"))
        accelerator.project_configuration.iteration = newest + 1
    print(f"plain: starting at step {progress.step}", flush=True)
    data = torch.randn(SAMPLES, width, generator=torch.Generator().manual_seed(SEED))
    started = time.perf_counter()
    measured_from, measured_steps = None, 0
    while True:
        i = progress.step % (SAMPLES // BATCH)
        loss = reconstruction_loss(model, (data[i * BATCH:(i + 1) * BATCH],))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        if clean_seconds:
            elapsed = time.perf_counter() - started
            if measured_from is None and elapsed >= min(2.0, clean_seconds / 3):  # after a warm-up
                measured_from, measured_steps = time.perf_counter(), progress.step
            if elapsed >= clean_seconds:
                rate = (progress.step - measured_steps) / (time.perf_counter() - measured_from)
                print(json.dumps({"clean_steps_per_s": rate}), flush=True)
                return
        elif progress.step % save_every == 0:
            accelerator.save_state()


def plain_probe(directory: Path, width: int, layers: int) -> int:
    """The step the plain job's next restart would continue from; falls back past checkpoints that fail to
    load, as a person would. Returns 0 when none loads."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from bench_task import build_model

    checkpoints = sorted((directory / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
    for path in reversed(checkpoints):
        _util_reset_accelerate()
        accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(directory)))
        model = build_model(width, layers)
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
        progress = Progress()
        accelerator.register_for_checkpointing(progress)
        try:
            accelerator.load_state(str(path))
            return progress.step
        except Exception as exc:  # noqa: BLE001 - a broken checkpoint: fall back to the one before
            print(f"plain: {path.name} does not load ({type(exc).__name__}: {exc})", flush=True)
    return 0


def _util_reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # noqa: SLF001


# ------------------------------------------------------------------------------------------ the harness

@dataclass
class Outcome:
    name: str
    seconds: float
    steps: int = 0
    kills: int = 0
    aimed_hits: int = 0
    starts: int = 0
    failed_starts: int = 0
    notes: list[str] = field(default_factory=list)


def kill_schedule(duration: float, every: tuple[float, float], seed: int) -> list[tuple[float, bool]]:
    """(seconds after the start, aimed at a save in progress) for each kill; the same for both jobs."""
    rng, at, out = random.Random(seed), 0.0, []
    while True:
        at += rng.uniform(*every)
        if at >= duration - 2.0:
            return out
        out.append((at, len(out) % 2 == 1))


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"PYTHONPATH": os.pathsep.join([str(_util.REPO), str(Path(__file__).parent)]),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


class Job:
    """One job: its command, restarted whenever it dies; every process of it in a session of its own."""

    def __init__(self, cmd: list[str], log: Path):
        self.cmd, self.log = cmd, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=str(_util.REPO), env=worker_env(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole job: every process of its group
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None


def drive(name: str, job: Job, save_in_progress, schedule: list[tuple[float, bool]], duration: float,
          aim_patience: float) -> Outcome:
    outcome = Outcome(name, duration)
    started = time.monotonic()
    pending = list(schedule)
    try:
        job.start()
        outcome.starts += 1
        while (now := time.monotonic() - started) < duration:
            if job.proc.poll() is not None:  # it died by itself: a crash at start-up or later
                outcome.failed_starts += job.proc.returncode != 0
                job.start()
                outcome.starts += 1
                continue
            if pending and now >= pending[0][0]:
                at, aimed = pending[0]
                in_save = aimed and save_in_progress()
                if aimed and not in_save and now < at + aim_patience:
                    time.sleep(0.002)
                    continue
                job.kill()
                outcome.kills += 1
                outcome.aimed_hits += in_save
                pending.pop(0)
                job.start()
                outcome.starts += 1
                continue
            time.sleep(0.002 if pending and pending[0][1] and now >= pending[0][0] - 0.5 else 0.02)
    finally:
        job.kill()
    return outcome


def dtrain_job(spec: dict, out: Path, save_every: int | None = None, local_dir: Path | None = None,
               local_every: int = 0) -> tuple[Job, callable]:
    """The dtrain command: persistent saves every `save_every` steps (default: the spec's), and with `local_dir`
    the node-local tier too, saved every `local_every` steps."""
    cmd = [sys.executable, str(_util.REPO / "dtrain" / "train.py"), "--task", "benchmarks.bench_task:build",
           "--n-layer", str(spec["layers"]), "--n-embd", str(spec["width"]), "--n-head", "1",
           "--batch-size", str(BATCH), "--epochs", "0", "--max-steps", "1000000000", "--lr", "3e-4",
           "--warmup-steps", "0", "--eval-every-steps", "0", "--log-every-steps", "100",
           "--save-every-steps", str(save_every or spec["save_every"]), "--async-save", "--keep-last", "2",
           "--resume", "auto", "--seed", str(SEED), "--output-dir", str(out)]
    if local_dir is not None:
        cmd += ["--local-checkpoint-dir", str(local_dir), "--local-save-every-steps", str(local_every)]
    dirs = [out / "checkpoints"] + ([local_dir / "node_0"] if local_dir is not None else [])

    def save_in_progress() -> bool:  # either tier's
        try:
            return any(d.is_dir() and any(p.name.startswith(".tmp-") for p in d.iterdir()) for d in dirs)
        except OSError:  # a temp dir renamed while listed
            return False

    return Job(cmd, out.parent / f"{out.name}.log"), save_in_progress


def tiered_job(spec: dict, out: Path, local_dir: Path) -> tuple[Job, callable]:
    return dtrain_job(spec, out, spec["tiered_every"], local_dir, spec["local_every"])


def persistent_only_job(spec: dict, out: Path) -> tuple[Job, callable]:
    return dtrain_job(spec, out, spec["tiered_every"])


def plain_job(spec: dict, out: Path) -> tuple[Job, callable]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "plain", "--dir", str(out),
           "--width", str(spec["width"]), "--layers", str(spec["layers"]), "--save-every", str(spec["save_every"])]
    checkpoints = out / "checkpoints"

    def save_in_progress() -> bool:
        # save_state writes into checkpoint_<n> directly; its registered object is the last file written.
        try:
            newest = max(checkpoints.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]), default=None)
            return newest is not None and not (newest / "custom_checkpoint_0.pkl").exists()
        except (OSError, ValueError):
            return False

    return Job(cmd, out.parent / "plain.log"), save_in_progress


def dtrain_final_steps(out: Path) -> int:
    from dtrain.checkpoint import resolve_resume
    from dtrain.checkpoint.layout import read_trainer_state

    from dtrain.errors import UsageError

    try:
        resolution = resolve_resume("latest", out / "checkpoints", False)
    except UsageError:  # no checkpoint at all
        return 0
    return int(read_trainer_state(resolution.path)["global_step"]) if resolution.path else 0


def local_tier_final_steps(local_dir: Path) -> int:
    """The newest step of the (one-process) run's local tier that a `--resume latest|auto` start would take from
    it (tier_recovery.holdings/choose for one node): it verifies, was written by a world of 1 and holds rank 0's
    RNG file. 0 when there is none."""
    from dtrain.checkpoint.layout import parse_step, read_trainer_state, step_dirs, verify_checkpoint

    node = local_dir / "node_0"
    if not node.is_dir():
        return 0
    for path in reversed(step_dirs(node)):
        try:
            if (verify_checkpoint(path, False).ok and int(read_trainer_state(path).get("world_size", 0)) == 1
                    and (path / "random_states_0.pkl").is_file()):
                return parse_step(path.name)
        except (OSError, ValueError):
            continue
    return 0


def tiered_final_steps(out: Path, local_dir: Path) -> int:
    """What the tiered job's next start resumes from: the newer of the two tiers' newest complete checkpoints."""
    return max(dtrain_final_steps(out), local_tier_final_steps(local_dir))


def local_tier_root(root: Path) -> Path:
    """Where the tiered job's local tier lives: a RAM disk (/dev/shm) when there is a writable one, else the
    work directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        try:
            return Path(tempfile.mkdtemp(prefix="dtrain-bench-goodput-local-", dir=str(shm)))
        except OSError:
            pass
    (root / "local").mkdir()
    return root / "local"


def probe_plain(spec: dict, out: Path) -> int:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "probe", "--dir", str(out),
                           "--width", str(spec["width"]), "--layers", str(spec["layers"])], cwd=str(_util.REPO),
                          env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_goodput: the plain probe failed:\n{proc.stdout[-3000:]}")
    return int(json.loads(lines[-1])["step"])


def clean_rate(spec: dict, root: Path) -> float:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "clean", "--dir",
                           str(root / "clean"), "--width", str(spec["width"]), "--layers", str(spec["layers"]),
                           "--clean-seconds", str(spec["clean_seconds"])], cwd=str(_util.REPO), env=worker_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          start_new_session=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_goodput: the clean run failed:\n{proc.stdout[-3000:]}")
    return float(json.loads(lines[-1])["clean_steps_per_s"])


def main(argv: list[str] | None = None) -> dict:
    parser = _util.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, help="seconds each job runs (default: by size)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the kill schedule")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoints)")
    parser.add_argument("--worker", choices=("plain", "clean", "probe"), help=argparse_hidden())
    parser.add_argument("--dir", help=argparse_hidden())
    parser.add_argument("--width", type=int, help=argparse_hidden())
    parser.add_argument("--layers", type=int, help=argparse_hidden())
    parser.add_argument("--save-every", type=int, help=argparse_hidden())
    parser.add_argument("--clean-seconds", type=float, default=0.0, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.worker == "probe":
        return {"step": plain_probe(Path(args.dir), args.width, args.layers)}
    if args.worker:
        plain_worker(Path(args.dir), args.width, args.layers, args.save_every or 0, args.clean_seconds)
        sys.exit(0)

    spec = _util.chosen_spec(args, QUICK, FULL)
    if args.duration:
        spec["duration"] = args.duration
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-goodput-"))
    local_root = None
    try:
        local_root = local_tier_root(root)
        local_dir = local_root / "tier"
        clean = clean_rate(spec, root)
        schedule = kill_schedule(spec["duration"], spec["kill_every"], args.seed)
        outcomes = {}
        jobs = (("dtrain", "dtrain", dtrain_job, dtrain_final_steps),
                ("plain Accelerate", "plain", plain_job, lambda out: probe_plain(spec, out)),
                ("dtrain tiered", "tiered", lambda s, out: tiered_job(s, out, local_dir),
                 lambda out: tiered_final_steps(out, local_dir)),
                ("dtrain persistent only", "persistent", persistent_only_job, dtrain_final_steps))
        for name, dirname, make, final_steps in jobs:  # one at a time: 2 cores
            out = root / dirname
            job, save_in_progress = make(spec, out)
            outcome = drive(name, job, save_in_progress, schedule, spec["duration"], spec["aim_patience"])
            outcome.steps = final_steps(out)
            outcomes[name] = outcome
    finally:
        if args.keep:
            print(f"work directory kept: {root}" + (f" (local tier: {local_root})" if local_root else ""))
        else:
            shutil.rmtree(root, ignore_errors=True)
            if local_root is not None:
                shutil.rmtree(local_root, ignore_errors=True)

    def goodput(o: Outcome) -> float | None:
        return _util.ratio(o.steps, clean * o.seconds)

    rows = [[o.name, goodput(o), o.steps, o.kills, f"{o.aimed_hits} of {sum(a for _, a in schedule)}", o.starts,
             o.failed_starts] for o in outcomes.values()]
    dtrain, plain = outcomes["dtrain"], outcomes["plain Accelerate"]
    tiered, persistent = outcomes["dtrain tiered"], outcomes["dtrain persistent only"]
    print(_util.table("goodput under kill -9: steps kept / (clean steps/s x wall time)",
                      ["job", "goodput", "steps kept", "kills", "aimed at a save", "starts", "failed starts"], rows,
                      [f"{spec['layers']} x Linear({spec['width']}, {spec['width']}) + AdamW, batch {BATCH}, "
                       f"{spec['duration']:.0f} s per job, kills at {', '.join(f'{t:.0f}' for t, _ in schedule)} s "
                       f"(seed {args.seed})",
                       f"dtrain and plain Accelerate save every {spec['save_every']} steps; dtrain tiered saves to "
                       f"the local tier ({local_root}) every {spec['local_every']} steps and to the persistent one "
                       f"every {spec['tiered_every']}; dtrain persistent only: every {spec['tiered_every']} steps, "
                       f"no local tier",
                       f"clean steps/s (plain loop, no saves, no kills): {clean:.1f}",
                       f"goodput_ratio (goal >= 0.80) = dtrain goodput = {_util.fmt(goodput(dtrain))}; plain "
                       f"Accelerate: {_util.fmt(goodput(plain))}",
                       f"goodput_tiered_ratio (goal >= 0.90) = dtrain tiered goodput = {_util.fmt(goodput(tiered))}; "
                       f"persistent only: {_util.fmt(goodput(persistent))}; plain Accelerate: "
                       f"{_util.fmt(goodput(plain))}",
                       f"wall time {time.perf_counter() - started:.0f}s"]))
    return {"goodput_ratio": goodput(dtrain), "goodput_plain_accelerate": goodput(plain),
            "goodput_tiered_ratio": goodput(tiered), "goodput_persistent_only": goodput(persistent),
            "goodput_clean_steps_per_s": clean, "goodput_seconds_per_job": spec["duration"],
            "goodput_kills": len(schedule), "goodput_dtrain_steps": dtrain.steps, "goodput_plain_steps": plain.steps,
            "goodput_tiered_steps": tiered.steps, "goodput_persistent_only_steps": persistent.steps,
            "goodput_dtrain_failed_starts": dtrain.failed_starts, "goodput_plain_failed_starts": plain.failed_starts,
            "goodput_tiered_failed_starts": tiered.failed_starts,
            "goodput_persistent_only_failed_starts": persistent.failed_starts}


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    result = main()
    _util.emit(result)
