"""Sharded (DCP) checkpoints are read through a restricted unpickler: DCP's own index and plain values load, a
crafted pickle anywhere DCP would unpickle it is refused before it can run."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from dtrain.checkpoint.sharded import UnsafeCheckpoint, check_sharded_dir, full_state


class RunsCode:
    """What an attacker plants: unpickling it calls a function of their choice."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def save_dcp(state: dict, directory) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory), no_dist=True)


@pytest.fixture
def dcp_dir(tmp_path):
    directory = tmp_path / "step_000000010" / "optimizer_0"
    save_dcp({"optimizer": {"state": {"w": {"exp_avg": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3.0)}},
                            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99), "params": ["w"]}]}}, directory)
    return directory


def test_dcp_index_and_plain_values_pass_and_load(dcp_dir):
    check_sharded_dir(dcp_dir)
    state = full_state(dcp_dir)["optimizer"]
    assert torch.equal(state["state"]["w"]["exp_avg"], torch.arange(6.0).reshape(2, 3))
    assert state["param_groups"][0]["lr"] == 0.01 and tuple(state["param_groups"][0]["betas"]) == (0.9, 0.99)


def test_a_crafted_index_is_refused_without_running(dcp_dir, tmp_path):
    marker = tmp_path / "ran"
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"step_000000010/optimizer_0/.metadata was refused .*posix.mkdir"):
        full_state(dcp_dir)
    assert not marker.exists()


def test_a_crafted_value_behind_a_valid_index_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    directory = tmp_path / "step_000000010" / "optimizer_0"
    save_dcp({"optimizer": {"param_groups": [{"lr": RunsCode(marker)}]}}, directory)  # DCP pickles the value
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpoint, match=r"the value of optimizer.param_groups.0.lr was refused"):
        full_state(directory)
    assert not marker.exists()


def test_an_index_pointing_outside_its_directory_is_refused(dcp_dir):
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    metadata = FileSystemReader(str(dcp_dir)).read_metadata()
    for where in metadata.storage_data.values():
        where.relative_path = "../../secret"
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpoint, match=r"is stored in '../../secret', which is not a file of this directory"):
        check_sharded_dir(dcp_dir)


def test_a_missing_or_garbage_index_is_one_clear_refusal(dcp_dir):
    (dcp_dir / ".metadata").write_bytes(b"\x00garbage of some size")
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata was refused"):
        check_sharded_dir(dcp_dir)
    (dcp_dir / ".metadata").unlink()
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata is missing"):
        check_sharded_dir(dcp_dir)
