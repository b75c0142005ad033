"""A checkpoint committed by the previous release still resumes exactly with this one.

tests/fixtures/release_0_1_0 holds step 6 of a 10-step run and that run's own step 10 (see its README). Resuming
step 6 with today's code must end at the old run's step 10: RNG, learning rate and progress exactly, weights and
optimizer state to within float32 rounding. The fixture was written on another CPU, whose kernels round differently
(a fresh run here differs from it by 3e-8 from the first steps on); a state restored wrongly (optimizer moments,
RNG, data order) moves the weights by about the learning rate, 3e-4, four orders of magnitude more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import train_in_process

# float32 rounding of another CPU's kernels over 10 steps (measured: 3e-8), far below what a wrong restore moves (3e-4)
ROUNDING = 1e-6

FIXTURE = Path(__file__).parent / "fixtures" / "release_0_1_0"
FLAGS = ["--task", "regression", "--batch-size", "16", "--n-layer", "2", "--n-embd", "32", "--log-every-steps", "5",
         "--eval-every-steps", "4", "--eval-max-batches", "2", "--warmup-steps", "3", "--max-steps", "10",
         "--save-every-steps", "6"]


def close_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=ROUNDING)
        for k in a)


def test_checkpoint_of_the_previous_release_resumes_to_the_same_end(tmp_path, fresh_accelerate_state):
    from accelerate.utils import load as safe_load
    from safetensors.torch import load_file

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(FIXTURE / "step_000000006", checkpoints / "step_000000006")
    (checkpoints / "latest").write_text("step_000000006\n")

    assert train_in_process(*FLAGS, "--output-dir", str(tmp_path / "run"), "--resume", "latest",
                            "--strict-resume") == 0

    ours, theirs = checkpoints / "step_000000010", FIXTURE / "step_000000010"
    assert close_tensors(load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors")))
    old_optimizer, new_optimizer = safe_load(theirs / "optimizer.bin"), safe_load(ours / "optimizer.bin")
    for key, state in old_optimizer["state"].items():
        for name, value in state.items():
            assert close_tensors({name: value}, {name: new_optimizer["state"][key][name]}), f"optimizer {name}"
    assert [g["lr"] for g in new_optimizer["param_groups"]] == [g["lr"] for g in old_optimizer["param_groups"]]
    old_rng, new_rng = safe_load(theirs / "random_states_0.pkl"), safe_load(ours / "random_states_0.pkl")
    assert torch.equal(old_rng["torch_manual_seed"], new_rng["torch_manual_seed"])
    assert old_rng["random_state"] == new_rng["random_state"]
    old_state, new_state = (json.loads((p / "trainer_state.json").read_text()) for p in (theirs, ours))
    for key in ("global_step", "epoch", "step_in_epoch", "epoch_samples_seen", "samples_seen", "best_metric",
                "best_step", "last_eval", "data_position"):
        assert new_state[key] == old_state[key], key
