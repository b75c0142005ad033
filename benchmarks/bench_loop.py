"""Loop overhead: dtrain's Trainer.fit vs a hand-written plain Accelerate loop on the same model and data.

Both sides train the same charlm model (same size, same seed, so the same initial weights), on the same
dataset, batch size, AdamW settings, warm-up + cosine LR schedule and gradient clipping. Per optimizer step
both do what a normal user loop does: forward, loss, backward, clip, optimizer step, scheduler step,
zero_grad; every `log_every` steps both read the loss back (`.item()`), as a loop that logs must.
dtrain does whatever else it does per step (loss accumulation, accumulate/autocast contexts, tqdm, interrupt
agreement, save-trigger checks, metrics.jsonl/csv writes); that is the overhead this benchmark is after.
Checkpoint triggers and eval are off (no eval split). tqdm's bar is on, written to /dev/null.

Timing: `Trainer.fit` has no timing hook, so the benchmark wraps the Trainer instance's
`_after_optimizer_step` (it runs after every optimizer step, after dtrain's own logging and checks). Start-up
(building the Trainer, the first iterator, the final checkpoint) is excluded: only steps after a warm-up count.

1. Taking turns (the headline, `loop_overhead_ratio`): in one process, a Trainer.fit and a plain loop alternate
   every `chunk` optimizer steps (the hook runs `chunk` plain steps after every `chunk` dtrain steps); each side's
   time is the sum of its own chunks. A B A B at a granularity of ~0.1 s cancels the load of other processes,
   which on a shared 2-core machine drifts over seconds. Median over several such runs.
2. Whole runs, alternating (a cross-check): a fresh Trainer per run vs a fresh plain loop per run, A B, B A, ...;
   each side stamps the time after every step, steps/s over the steps after the warm-up, medians.
   dtrain's own `steps_per_second` from metrics.jsonl is printed too; it leaves out the metrics write itself.

Both also report the ratio in process CPU time per step, which other processes disturb less than wall time.
    loop_overhead_ratio = dtrain steps/s / plain steps/s   (goal >= 0.98)
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)

FULL = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=16, corpus_bytes=2_000_000,
            steps=200, warmup=30, log_every=50, repeats=7, chunk=10, interleaved_steps=300, interleaved_repeats=5)
QUICK = dict(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=8, corpus_bytes=100_000,
             steps=40, warmup=10, log_every=10, repeats=2, chunk=10, interleaved_steps=30, interleaved_repeats=1)
SEED = 1234
LR, WEIGHT_DECAY, WARMUP_STEPS, MIN_LR_RATIO, GRAD_CLIP = 3e-3, 0.01, 20, 0.1, 1.0


def make_config(spec: dict, output_dir: str, device: str):
    from dtrain.config import build_config

    return build_config(flag_values={
        "output_dir": output_dir, "task": "charlm", "device": device, "seed": SEED,
        "n_layer": spec["n_layer"], "n_embd": spec["n_embd"], "n_head": spec["n_head"],
        "block_size": spec["block_size"], "corpus_bytes": spec["corpus_bytes"], "sample_chars": 0,
        "batch_size": spec["batch_size"], "epochs": 0, "max_steps": spec["steps"], "lr": LR,
        "weight_decay": WEIGHT_DECAY, "warmup_steps": WARMUP_STEPS, "min_lr_ratio": MIN_LR_RATIO,
        "grad_clip": GRAD_CLIP, "eval_every_steps": 0, "log_every_steps": spec["log_every"],
        "save_every_steps": 0, "save_every_epochs": 0, "save_every_seconds": 0.0, "keep_last": 1,
    })


def build_task(config):
    """The same task on both sides: same corpus, same model class, same seed -> same initial weights."""
    from accelerate.utils import set_seed

    from dtrain.tasks import build_task as build

    set_seed(SEED)
    task = build(config.task, SEED)
    task.eval_data = None  # no evaluation at all (also not the one at the end of fit)
    task.sample = None
    return task


def rates(stamps: list[tuple[float, float]], warmup: int) -> dict:
    """Steps warmup+1..N over the time between stamp `warmup` (end of step `warmup`) and the last one:
    per wall-clock second, and per second of this process's CPU time (all its threads)."""
    measured = len(stamps) - warmup
    (wall0, cpu0), (wall1, cpu1) = stamps[warmup - 1], stamps[-1]
    return {"steps_per_second": measured / (wall1 - wall0), "cpu_ms_per_step": 1000 * (cpu1 - cpu0) / measured}


def _stamp(stamps: list[tuple[float, float]], spec: dict, device: str) -> None:
    if device == "cuda" and len(stamps) in (spec["warmup"] - 1, spec["steps"] - 1):
        _util.synchronize(device)  # on a GPU the boundaries of the window must wait for queued work
    stamps.append((time.perf_counter(), time.process_time()))


def run_dtrain(spec: dict, device: str, workdir: Path) -> dict:
    from dtrain.training.trainer import Trainer

    out = Path(tempfile.mkdtemp(prefix="dtrain-", dir=workdir))
    config = make_config(spec, str(out), device)
    trainer = Trainer(config, build_task(config))
    stamps: list[float] = []
    original = trainer._after_optimizer_step

    def timed(epoch_done):
        original(epoch_done)
        _stamp(stamps, spec, device)

    trainer._after_optimizer_step = timed
    # tqdm's bar stays on (it is part of dtrain's loop) but is written to /dev/null, not to this report.
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        result = trainer.fit()
    assert result.global_step == spec["steps"] == len(stamps), (result, len(stamps))
    logged = [r["steps_per_second"] for r in _records(out / "metrics.jsonl") if "steps_per_second" in r]
    del trainer
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return {**rates(stamps, spec["warmup"]),
            "logged_steps_per_second": _util.median(logged[1:]) if len(logged) > 1 else None}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class PlainLoop:
    """What a user writes with Accelerate by hand (the docs' loop), with the same settings as dtrain's run.
    `step()` is one iteration of `for batch in dataloader: ...` (a new epoch starts when one ends)."""

    def __init__(self, spec: dict, device: str, total_steps: int, workdir: Path):
        import torch
        from accelerate import Accelerator
        from torch.utils.data import DataLoader

        task = build_task(make_config(spec, str(workdir / "plain-unused"), device))
        self.loss_fn, self.log_every = task.loss, spec["log_every"]
        self.accelerator = Accelerator(cpu=device == "cpu")
        model = task.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

        def lr_factor(step: int) -> float:  # linear warm-up, cosine decay: the same schedule dtrain uses
            if step < WARMUP_STEPS:
                return (step + 1) / (WARMUP_STEPS + 1)
            progress = min(1.0, (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
            return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        loader = DataLoader(task.train_data, batch_size=spec["batch_size"], shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(SEED))
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, loader, scheduler)
        self.model.train()
        self.batches = iter(self.loader)
        self.steps = 0
        self.last_loss = None

    def step(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:  # the epoch ended: next epoch
            self.batches = iter(self.loader)
            batch = next(self.batches)
        loss = self.loss_fn(self.model, batch)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps % self.log_every == 0:
            self.last_loss = loss.item()

    def close(self) -> None:
        self.batches = None
        self.loader.end()  # we leave the epoch early: unregister the loader from Accelerate's GradientState
        self.accelerator.free_memory()
        del self.model, self.optimizer, self.loader, self.scheduler
        gc.collect()


def run_plain(spec: dict, device: str, workdir: Path) -> dict:
    loop = PlainLoop(spec, device, spec["steps"], workdir)
    stamps: list[tuple[float, float]] = []
    for _ in range(spec["steps"]):
        loop.step()
        _stamp(stamps, spec, device)
    last_loss = loop.last_loss
    loop.close()
    return {**rates(stamps, spec["warmup"]), "last_loss": last_loss}


def run_interleaved(spec: dict, device: str, workdir: Path) -> dict:
    """One Trainer.fit and one plain loop in the same process, taking turns every `chunk` optimizer steps:
    inside the Trainer's step hook, after every `chunk` dtrain steps, the plain loop runs `chunk` steps. Both
    sides thus see the same machine at (almost) the same moments, which cancels load that drifts over seconds.
    Each side's time is the sum of its own chunks; steps warmup+1.. are measured."""
    from dtrain.training.trainer import Trainer

    warmup, chunk, measured = spec["warmup"], spec["chunk"], spec["interleaved_steps"]
    total = warmup + measured
    plain = PlainLoop(spec, device, total, workdir)
    for _ in range(warmup):
        plain.step()
    out = Path(tempfile.mkdtemp(prefix="dtrain-", dir=workdir))
    config = make_config({**spec, "steps": total}, str(out), device)
    trainer = Trainer(config, build_task(config))
    spent = {"dtrain": [0.0, 0.0], "plain": [0.0, 0.0]}  # wall seconds, CPU seconds
    mark: list[float] = []
    original = trainer._after_optimizer_step
    state = trainer.state  # not `trainer`: the hook must not keep the Trainer alive after `del trainer`

    def take_turns(epoch_done):
        original(epoch_done)
        step = state.global_step
        if step < warmup or (step - warmup) % chunk:
            return
        _util.synchronize(device)
        now = [time.perf_counter(), time.process_time()]
        if mark:
            spent["dtrain"] = [a + n - m for a, n, m in zip(spent["dtrain"], now, mark)]
        if step >= total:
            return
        for _ in range(chunk):
            plain.step()
        _util.synchronize(device)
        mark[:] = [time.perf_counter(), time.process_time()]
        spent["plain"] = [a + m - n for a, m, n in zip(spent["plain"], mark, now)]

    trainer._after_optimizer_step = take_turns
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        trainer.fit()
    plain.close()
    del trainer
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return {side: {"steps_per_second": measured / wall, "cpu_ms_per_step": 1000 * cpu / measured}
            for side, (wall, cpu) in spent.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = _util.base_parser(__doc__.splitlines()[0])
    _util.add_threads_flag(parser)
    args = parser.parse_args(argv)
    spec = _util.chosen_spec(args, QUICK, FULL)
    workdir = Path(tempfile.mkdtemp(prefix="dtrain-bench-loop-"))
    started = time.perf_counter()
    try:
        # One untimed round first: first-call costs of torch/Accelerate (kernel set-up, imports) hit neither side.
        warm = {**spec, "steps": spec["warmup"] + 5}
        run_plain(warm, args.device, workdir)
        run_dtrain(warm, args.device, workdir)
        turns = [run_interleaved(spec, args.device, workdir) for _ in range(spec["interleaved_repeats"])]
        runs = _util.alternate([("dtrain", lambda: run_dtrain(spec, args.device, workdir)),
                                ("plain", lambda: run_plain(spec, args.device, workdir))], spec["repeats"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    device, med, fmt = args.device, _util.median, _util.fmt
    model = (f"charlm n_layer={spec['n_layer']} n_embd={spec['n_embd']} block={spec['block_size']} "
             f"batch={spec['batch_size']}, dropout 0.1, AdamW, clip {GRAD_CLIP}, log every {spec['log_every']}; "
             f"torch threads: {_util.threads_note()}")

    # 1. Interleaved: the headline figure.
    t_ratios = [t["dtrain"]["steps_per_second"] / t["plain"]["steps_per_second"] for t in turns]
    t_cpu_ratios = [t["plain"]["cpu_ms_per_step"] / t["dtrain"]["cpu_ms_per_step"] for t in turns]
    overhead = med(t_ratios)
    rows = [[f"{name}", med(t[side]["steps_per_second"] for t in turns),
             _util.spread([t[side]["steps_per_second"] for t in turns]),
             1000 / med(t[side]["steps_per_second"] for t in turns), med(t[side]["cpu_ms_per_step"] for t in turns)]
            for name, side in (("dtrain Trainer.fit", "dtrain"), ("plain Accelerate loop", "plain"))]
    rows.append(["loop_overhead_ratio (goal >= 0.98)", overhead, _util.spread(t_ratios), "", med(t_cpu_ratios)])
    print(_util.table(f"training loop: dtrain vs plain Accelerate, taking turns every {spec['chunk']} steps ({device})",
                      ["side", "steps/s", "min..max", "ms/step", "CPU ms/step"], rows,
                      [model,
                       f"{spec['interleaved_repeats']} runs; in each, one Trainer.fit and one plain loop take turns "
                       f"every {spec['chunk']} optimizer steps in one process, {spec['interleaved_steps']} measured "
                       f"steps per side after {spec['warmup']} warm-up steps",
                       "ratio row: median over runs of dtrain steps/s / plain steps/s; last column: the same "
                       "from process CPU time per step"]))

    # 2. Whole runs, alternating: the cross-check.
    d_sps = [r["steps_per_second"] for r in runs["dtrain"]]
    p_sps = [r["steps_per_second"] for r in runs["plain"]]
    d_cpu = [r["cpu_ms_per_step"] for r in runs["dtrain"]]
    p_cpu = [r["cpu_ms_per_step"] for r in runs["plain"]]
    pair_ratios = [d / p for d, p in zip(d_sps, p_sps)]
    runs_ratio = _util.ratio(med(d_sps), med(p_sps))
    runs_cpu_ratio = _util.ratio(med(p_cpu), med(d_cpu))
    logged = med(r["logged_steps_per_second"] for r in runs["dtrain"])
    measured = spec["steps"] - spec["warmup"]
    print(_util.table(
        f"training loop: dtrain vs plain Accelerate, whole runs alternating ({device})",
        ["side", "median steps/s", "min..max", "ms/step", "CPU ms/step"],
        [["dtrain Trainer.fit", med(d_sps), _util.spread(d_sps), 1000 / med(d_sps), med(d_cpu)],
         ["plain Accelerate loop", med(p_sps), _util.spread(p_sps), 1000 / med(p_sps), med(p_cpu)],
         ["dtrain / plain", runs_ratio, _util.spread(pair_ratios), "", runs_cpu_ratio]],
        notes=[f"{spec['repeats']} fresh runs per side, alternating (A B, B A, ...); each run {spec['steps']} steps, "
               f"the first {spec['warmup']} are warm-up, rates over the other {measured}",
               "ratio row: median/median of wall-clock steps/s (min..max: per A/B pair); last column: the same "
               "from process CPU time per step, which other processes on the machine disturb less",
               f"cross-check, dtrain's own metrics.jsonl steps_per_second (median): {fmt(logged)}",
               f"wall time {time.perf_counter() - started:.0f}s"]))
    return {"loop_overhead_ratio": overhead, "loop_overhead_ratio_cpu_time": med(t_cpu_ratios),
            "loop_overhead_ratio_whole_runs": runs_ratio, "loop_overhead_ratio_whole_runs_cpu_time": runs_cpu_ratio,
            "loop_dtrain_steps_per_s": med(t["dtrain"]["steps_per_second"] for t in turns),
            "loop_plain_steps_per_s": med(t["plain"]["steps_per_second"] for t in turns),
            "loop_interleaved_ratios": [round(r, 4) for r in t_ratios],
            "loop_whole_run_pair_ratios": [round(r, 4) for r in pair_ratios],
            "loop_repeats": spec["repeats"], "loop_interleaved_repeats": spec["interleaved_repeats"],
            "device": device}


if __name__ == "__main__":
    _util.emit(main())
