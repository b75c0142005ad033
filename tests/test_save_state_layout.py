"""dtrain's one-pass writer produces exactly the files `Accelerator.save_state` of the installed Accelerate writes:
the same names, the same keys, the same tensors (synchronous saves from references, background saves from a host
copy), and the device RNG under Accelerate's own name for every device type."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import load as safe_load
from safetensors.torch import load_file

from dtrain import compat
from dtrain.checkpoint.snapshot import HostCopier, take_snapshot, writes_like_save_state
from dtrain.checkpoint.writer import write_files
from dtrain.commands.verify_resume import _equal
from dtrain.rng import ProcessRNG


class TiedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: save_state writes it once
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, tokens):
        self.steps += 1
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


@pytest.fixture
def trained(fresh_accelerate_state):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = TiedModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(2):
        tokens = torch.randint(0, 11, (4, 5))
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return accelerator


def read(directory):
    files = {}
    for path in sorted(directory.iterdir()):
        files[path.name] = load_file(str(path)) if path.suffix == ".safetensors" else safe_load(path)
    return files


@pytest.mark.parametrize("copy", [False, True], ids=["sync from references", "async from a host copy"])
def test_the_writer_writes_what_save_state_writes(trained, tmp_path, copy):
    accelerator = trained
    assert writes_like_save_state(accelerator)
    ours, theirs = tmp_path / "dtrain", tmp_path / "accelerate"
    ours.mkdir()
    snapshot = take_snapshot(accelerator, HostCopier() if copy else None)  # RNG read now, as save_state reads it
    accelerator.save_state(str(theirs))
    write_files(ours, snapshot.files())

    mine, accelerates = read(ours), read(theirs)
    assert sorted(mine) == sorted(accelerates)
    for name, content in accelerates.items():
        if name.endswith(".safetensors"):
            assert sorted(mine[name]) == sorted(content), f"{name}: tensor names"
            assert all(torch.equal(mine[name][k], content[k]) for k in content), f"{name}: tensors"
        else:
            assert sorted(mine[name]) == sorted(content), f"{name}: keys"
            assert _equal(mine[name], content), f"{name}: values"


class FakeDevice:
    """A device module of another kind (xpu, mps, npu ...): one generator state per device."""

    def __init__(self, devices: int):
        self.states = [torch.tensor([7 + i], dtype=torch.uint8) for i in range(devices)]

    def get_rng_state(self, device=0):
        return self.states[0]

    def get_rng_state_all(self):
        return list(self.states)

    def set_rng_state(self, state, device=0):
        self.states[0] = state

    def set_rng_state_all(self, states):
        self.states = list(states)

    def device_count(self):
        return len(self.states)


@pytest.mark.parametrize("device_type", ["cuda", "xpu", "npu", "mps"])
def test_the_device_rng_is_saved_under_accelerates_name_for_every_device_type(monkeypatch, device_type):
    device = FakeDevice(1 if device_type == "mps" else 2)
    monkeypatch.setattr("dtrain.rng.torch_accelerator_backend", lambda: (device_type, device))
    monkeypatch.setattr(torch, "get_device_module", lambda name: device, raising=False)
    states = ProcessRNG().state_dict()
    key = f"torch_{device_type}_manual_seed"
    assert key in states
    expected = device.get_rng_state() if device_type == "mps" else device.get_rng_state_all()
    assert _equal(states[key], expected)
    device.states = [torch.tensor([0], dtype=torch.uint8) for _ in device.states]
    ProcessRNG().load_state_dict(states)
    assert _equal(device.get_rng_state() if device_type == "mps" else device.get_rng_state_all(), expected)


def test_the_installed_accelerate_is_in_the_range_pyproject_pins():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    pins = [Requirement(r) for r in importlib.metadata.requires("dtrain")]
    assert [r.specifier for r in pins if r.name == "accelerate"] == [SpecifierSet(compat.ACCELERATE_TESTED)]
    assert compat.accelerate_version_problem() is None


def test_an_untested_accelerate_gets_one_clear_warning(monkeypatch):
    monkeypatch.setattr(compat, "ACCELERATE_TESTED", ">=99")
    monkeypatch.setattr(compat, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"dtrain is tested with accelerate>=99"):
        compat.check_versions()
