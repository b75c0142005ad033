"""--async-save copies the weights and optimizer state while the next step's forward/backward runs: the
checkpoint is still, byte for byte, the synchronous checkpoint of the step it was taken at."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from dtrain.checkpoint import CheckpointManager
from dtrain.checkpoint.layout import MANIFEST, verify_checkpoint
from dtrain.checkpoint.snapshot import HostCopier

STATE = {"global_step": 2, "epoch": 0}


def _training(seed: int = 0):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    # BatchNorm: its running statistics (buffers) change in every forward pass, unlike the parameters.
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    data = torch.Generator().manual_seed(1)  # the global RNG (saved in the checkpoint) is left alone
    return accelerator, model, optimizer, scheduler, data


def _forward_backward(accelerator, model, data):
    accelerator.backward(model(torch.randn(8, 32, generator=data)).square().mean())


def _step(accelerator, model, optimizer, scheduler, data):
    _forward_backward(accelerator, model, data)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != MANIFEST}


@pytest.fixture
def held_copy(monkeypatch):
    """Holds the background copy until released, so the next step certainly runs while it is pending."""
    started, release = threading.Event(), threading.Event()
    original = HostCopier.copy_deferred

    def held(self):
        started.set()
        release.wait(60)
        original(self)

    monkeypatch.setattr(HostCopier, "copy_deferred", held)
    yield started, release
    release.set()


@pytest.mark.parametrize("waits_before_step", [True, False])
def test_async_checkpoint_equals_the_sync_one_while_the_next_step_runs(tmp_path, fresh_accelerate_state, held_copy,
                                                                       waits_before_step):
    copy_started, release = held_copy
    sync_run, async_run = _training(), _training()
    for run in (sync_run, async_run):
        for _ in range(2):
            _step(*run)
    sync_checkpoint = CheckpointManager(sync_run[0], tmp_path / "sync").save(2, STATE).path

    accelerator, model, optimizer, scheduler, data = async_run
    manager = CheckpointManager(accelerator, tmp_path / "async", async_save=True)
    manager.save(2, STATE)
    assert copy_started.wait(30)
    _forward_backward(accelerator, model, data)  # the next step's forward/backward, while the copy is pending
    stepped = threading.Event()

    def optimizer_step():
        if waits_before_step:
            manager.before_optimizer_step()  # what the Trainer calls right before optimizer.step()
        optimizer.step()
        stepped.set()

    stepper = threading.Thread(target=optimizer_step)
    stepper.start()
    if waits_before_step:
        assert not stepped.wait(0.5), "the optimizer step ran before the snapshot was copied"
    else:
        stepper.join(30)
    release.set()
    stepper.join(30)
    report = manager.wait()

    assert report.step == 2 and verify_checkpoint(report.path, checksums=True).ok
    same = _files(report.path) == _files(sync_checkpoint)
    # Without the wait the step changes the weights under the copy: the comparison can tell.
    assert same is waits_before_step
    if waits_before_step:
        assert report.blocking_seconds >= 0.4  # the wait before the step counts as holding the loop
