"""--async-save writes the objects registered with `accelerator.register_for_checkpointing`, as save_state does."""

from __future__ import annotations

import pytest
import torch
from conftest import reset_accelerate

from dtrain.checkpoint import CheckpointManager
from dtrain.checkpoint.layout import verify_checkpoint

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class Counter:
    """A stateful object of the user's (say, a curriculum): a tensor, a list and a number."""

    def __init__(self):
        self.total = torch.zeros(3)
        self.history: list[int] = []
        self.calls = 0

    def advance(self, n: int) -> None:
        self.total += n
        self.history.append(n)
        self.calls += 1

    def state_dict(self) -> dict:
        return {"total": self.total, "history": self.history, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.history, self.calls = state["total"].clone(), list(state["history"]), state["calls"]


def prepared(objects: int):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    counters = [Counter() for _ in range(objects)]
    accelerator.register_for_checkpointing(*counters)
    return accelerator, counters


def test_an_async_checkpoint_with_registered_objects_loads_with_plain_load_state(tmp_path):
    accelerator, (first, second) = prepared(2)
    first.advance(2)
    second.advance(5)
    second.advance(1)
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints", async_save=True)
    assert manager.async_save
    manager.save(1, {"global_step": 1})
    first.advance(100)  # changes after the snapshot must not reach the checkpoint
    second.history.append(999)
    report = manager.wait()
    checkpoint = report.path
    assert verify_checkpoint(checkpoint, checksums=True).ok
    assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= {p.name for p in checkpoint.iterdir()}

    reset_accelerate()
    loader, (first_again, second_again) = prepared(2)
    loader.load_state(str(checkpoint))  # Accelerate's own loader: counts and reads custom_checkpoint_{i}.pkl
    assert torch.equal(first_again.total, torch.full((3,), 2.0)) and first_again.history == [2]
    assert torch.equal(second_again.total, torch.full((3,), 6.0)) and second_again.history == [5, 1]
    assert second_again.calls == 2


def test_async_and_sync_checkpoints_hold_the_same_custom_files(tmp_path):
    from accelerate.utils import load

    accelerator, (counter,) = prepared(1)
    counter.advance(3)
    sync = CheckpointManager(accelerator, tmp_path / "sync", async_save=False)
    sync.save(1, {"global_step": 1})
    background = CheckpointManager(accelerator, tmp_path / "async", async_save=True)
    background.save(1, {"global_step": 1})
    background.wait()
    a, b = (load(tmp_path / d / "step_000000001" / "custom_checkpoint_0.pkl", weights_only=False)
            for d in ("sync", "async"))
    assert torch.equal(a["total"], b["total"]) and a["history"] == b["history"] and a["calls"] == b["calls"]


def test_the_node_local_tier_keeps_registered_objects_and_restores_them_weights_only(tmp_path):
    from dtrain.checkpoint.loading import load_prepared_state
    from dtrain.checkpoint.local_tier import LocalTier

    accelerator, (first, second) = prepared(2)
    first.advance(3)
    second.advance(7)
    tier = LocalTier(accelerator, str(tmp_path / "local"))
    tier.save(4, {"global_step": 4})  # asynchronous: the objects are copied now, written in the background
    first.advance(100)
    second.history.append(999)
    report = tier.wait()
    assert verify_checkpoint(report.path, checksums=True).ok
    assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= {p.name for p in report.path.iterdir()}
    load_prepared_state(accelerator, report.path)
    assert (first.total.tolist(), first.history, first.calls) == ([3.0] * 3, [3], 1)
    assert (second.total.tolist(), second.history, second.calls) == ([7.0] * 3, [7], 1)


class Opaque:
    """Not plain data: weights_only cannot read it back."""


def test_a_registered_object_that_weights_only_cannot_read_fails_the_first_local_save(tmp_path):
    from dtrain.checkpoint.local_tier import LocalTier
    from dtrain.errors import CheckpointError

    accelerator, (counter,) = prepared(1)
    counter.history.append(Opaque())
    tier = LocalTier(accelerator, str(tmp_path / "local"))
    with pytest.raises(CheckpointError, match="custom_checkpoint_0|Opaque|weights_only"):
        tier.save(1, {"global_step": 1}, wait=True)
    assert not any((tmp_path / "local" / "node_0").glob("step_*"))


def test_the_node_local_tier_refuses_a_run_with_a_dataloader_only_save_state_can_write(tmp_path):
    from dtrain.checkpoint.local_tier import LocalTier
    from dtrain.errors import UsageError

    accelerator, _ = prepared(0)
    accelerator.prepare(torch.utils.data.DataLoader(list(range(8)), batch_size=2))
    with pytest.raises(UsageError, match="invalid value for local_checkpoint_dir: .*prepared dataloaders"):
        LocalTier(accelerator, str(tmp_path / "local"))
    assert not (tmp_path / "local").exists()
