"""Models with tied weights (the output layer reuses the token embedding) save, resume, evaluate and export.

safetensors cannot store one tensor under two names, so a checkpoint holds a tied tensor once (under the name
Accelerate keeps, the first of the model's state_dict). Everything that reads weights back must count the tied
names as one tensor and keep the tie when it loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate.utils import load as safe_load
from safetensors import safe_open

from conftest import REPO, Runner, load_weights, same_tensors, train_cmd
from dtrain.config import TaskConfig

# Tiny models, 64 steps per epoch on one process; checkpoints every 10 steps, all kept; dropout on (RNG matters).
SHAPE = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--dropout", "0.1"]
RUN = [*SHAPE, "--batch-size", "8", "--max-steps", "30", "--save-every-steps", "10", "--eval-every-steps", "10",
       "--eval-max-batches", "2", "--log-every-steps", "5", "--warmup-steps", "2", "--keep-last", "0"]
FINAL = "step_000000030"
# (kept name, dropped alias) of each test model's tied pair, as Accelerate's save_state writes them.
TIES = {"tied_lm": ("tok_emb.weight", "head.weight"), "gpt2_lm": ("transformer.wte.weight", "lm_head.weight")}


def task_args(model: str) -> list[str]:
    return ["--task", f"tests.helpers.tied_tasks:{model}", *RUN]


def build_model(model: str, **shape):
    from tests.helpers import tied_tasks

    shape = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16, **shape}
    config = TaskConfig(task=f"tests.helpers.tied_tasks:{model}", **shape)
    return getattr(tied_tasks, model)(config, 1234).model


def tied_pair(module, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    state = dict(module.named_parameters(remove_duplicate=False))
    return tuple(state[name] for name in TIES[model])


def weight_names(checkpoint: Path) -> set[str]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def assert_same_state(a: Path, b: Path) -> None:
    """The same weights (byte for byte) and the same optimizer state."""
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes(), "weights differ"
    oa, ob = safe_load(a / "optimizer.bin"), safe_load(b / "optimizer.bin")
    assert oa["state"].keys() == ob["state"].keys()
    for key, state in oa["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][key][name])), f"optimizer {name}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """`straight(model, processes)`: an uninterrupted synchronous run, made on first use and shared."""
    runner, runs = Runner(), {}

    def run(model: str, processes: int = 1) -> Path:
        if (model, processes) not in runs:
            out = tmp_path_factory.mktemp(f"straight-{model}-{processes}")
            result = runner.run(train_cmd(*task_args(model), "--output-dir", str(out), processes=processes),
                                cwd=REPO, timeout=240)
            assert result.returncode == 0, result.stdout[-3000:]
            runs[model, processes] = out
        return runs[model, processes]

    try:
        yield run
    finally:
        runner.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("model,processes,mode", [
    ("tied_lm", 1, "sync"), ("tied_lm", 1, "async"), ("gpt2_lm", 1, "sync"), ("gpt2_lm", 1, "async"),
    ("tied_lm", 2, "sync"), ("tied_lm", 2, "async")])  # 2 ranks with the model that imports less
def test_tied_model_killed_after_a_checkpoint_resumes_bit_identical(runner, straight, tmp_path, model, processes,
                                                                    mode):
    reference = straight(model, processes)
    args = [*task_args(model), "--output-dir", str(tmp_path), *(["--async-save"] if mode == "async" else [])]
    # SIGKILL right after the first checkpoint (step 10) is committed, on every rank.
    killed = runner.run(train_cmd(*args, processes=processes), cwd=REPO, timeout=240,
                        DTRAIN_FAULT_AT="retention_done", DTRAIN_FAULT_AFTER_SAVES="0")
    assert killed.returncode != 0 and not (tmp_path / "checkpoints" / FINAL).exists(), killed.stdout[-3000:]
    resumed = runner.run(train_cmd(*args, "--resume", "latest", processes=processes), cwd=REPO, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [10]
    assert_same_state(reference / "checkpoints" / FINAL, tmp_path / "checkpoints" / FINAL)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tied_lm", "gpt2_lm"])
def test_async_and_sync_checkpoints_of_a_tied_model_hold_the_same_names_and_bytes(runner, straight, tmp_path,
                                                                                  model):
    sync = straight(model)
    run = runner.run(train_cmd(*task_args(model), "--async-save", "--output-dir", str(tmp_path)), cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:]
    kept, dropped = TIES[model]
    trained_tensors = len(list(build_model(model).parameters()))  # parameters() lists a tied pair once
    for step in ("step_000000010", "step_000000020", FINAL):
        a, b = sync / "checkpoints" / step, tmp_path / "checkpoints" / step
        names = weight_names(a)
        assert kept in names and dropped not in names, "the tie is stored once, under the name Accelerate keeps"
        assert weight_names(b) == names
        for name in ("model.safetensors", "optimizer.bin", "scheduler.bin"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{step}/{name}"
        # One optimizer state per trained tensor, on both paths: the tied pair has one.
        assert len(safe_load(b / "optimizer.bin")["state"]) == trained_tensors


def test_init_from_loads_a_tied_checkpoint_with_the_tie_intact(straight):
    from dtrain.training.resume import load_initial_weights

    checkpoint = straight("gpt2_lm") / "checkpoints" / "step_000000020"
    model = build_model("gpt2_lm")
    load_initial_weights(model, str(checkpoint))
    head, embedding = tied_pair(model, "gpt2_lm")
    assert head is embedding
    saved = load_weights(checkpoint)
    assert torch.equal(embedding, saved["transformer.wte.weight"])
    assert same_tensors({k: v for k, v in model.state_dict().items() if k in saved}, saved)


@pytest.mark.slow
def test_a_run_starts_from_a_tied_checkpoint_with_init_from(runner, straight, tmp_path):
    checkpoint = straight("tied_lm") / "checkpoints" / "step_000000020"
    result = runner.run(train_cmd(*task_args("tied_lm"), "--max-steps", "10", "--init-from", str(checkpoint),
                                  "--output-dir", str(tmp_path)), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    def first_loss(run: Path) -> float:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in records if r.get("kind") == "train")

    assert first_loss(tmp_path) < first_loss(checkpoint.parents[1]), "it started from the trained weights"


def test_eval_of_a_tied_checkpoint_reproduces_the_metric_training_measured(straight, capsys):
    from dtrain.checkpoint.layout import read_trainer_state
    from dtrain.commands.cli import main

    checkpoint = straight("gpt2_lm") / "checkpoints" / "step_000000020"
    measured = read_trainer_state(checkpoint)["checkpoint_metric"]["value"]
    assert main(["eval", str(checkpoint), "--max-batches", "2", "--json", "--trust-task"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["val_loss"] == pytest.approx(measured, rel=1e-5)


@pytest.mark.parametrize("model", ["tied_lm", "gpt2_lm"])
def test_export_of_a_tied_model_loads_back_with_the_tie_intact(straight, tmp_path, model):
    from safetensors.torch import load_model

    from dtrain.commands.cli import main
    from dtrain.commands.export import load_exported

    run = straight(model)
    out = tmp_path / "model.safetensors"
    assert main(["ckpt", "export", str(run), "--out", str(out)]) == 0
    saved = load_weights(run / "checkpoints" / FINAL)

    plain = build_model(model)  # safetensors' own loader, as a user would load the file
    load_model(plain, str(out))
    head, embedding = tied_pair(plain, model)
    assert head is embedding and torch.equal(embedding, saved[TIES[model][0]])

    rebuilt, _ = load_exported(out, trust_task=True)  # dtrain's loader, from the config in the file
    head, embedding = tied_pair(rebuilt, model)
    assert head is embedding
    assert same_tensors({k: v for k, v in rebuilt.state_dict().items() if k in saved}, saved)


@pytest.mark.slow
def test_a_real_shape_mismatch_still_exits_2_naming_the_tensor(runner, straight, tmp_path):
    from dtrain.errors import UsageError
    from dtrain.training.resume import load_initial_weights

    checkpoint = straight("gpt2_lm") / "checkpoints" / "step_000000020"
    expected = "does not fit the model: transformer.wte.weight: checkpoint (64, 32) vs model (64, 48)"
    result = runner.run(train_cmd(*task_args("gpt2_lm"), "--n-embd", "48", "--allow-config-change", "--resume",
                                  str(checkpoint), "--output-dir", str(tmp_path)), cwd=REPO)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "dtrain: error:" in result.stdout and "Traceback" not in result.stdout
    assert expected in result.stdout
    with pytest.raises(UsageError, match=re.escape(expected)):
        load_initial_weights(build_model("gpt2_lm", n_embd=48), str(checkpoint))  # --init-from


# ---------------------------------------------------------------------------------- weights module, in process

def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_a_file_without_the_alias_fits_and_loads_tied(tmp_path):
    from dtrain.weights import check_fits, load_weights as load_into

    source = build_model("tied_lm")
    state = {k: v for k, v in source.state_dict().items() if k != "head.weight"}
    path = save_tensors(tmp_path / "w.safetensors", state)
    target = build_model("tied_lm")
    assert check_fits(path, target).aliased == {"head.weight": "tok_emb.weight"}
    load_into(target, path)
    assert target.head.weight is target.tok_emb.weight
    assert torch.equal(target.head.weight, source.tok_emb.weight)


def test_a_file_holding_both_tied_names_loads_but_resume_refuses_it_clearly(tmp_path):
    from dtrain.errors import UsageError
    from dtrain.training.resume import check_tensors_fit
    from dtrain.weights import load_weights as load_into

    source = build_model("gpt2_lm")
    path = save_tensors(tmp_path / "model.safetensors", dict(source.state_dict()))  # what older async saves wrote
    target = build_model("gpt2_lm")
    load_into(target, path)
    assert target.lm_head.weight is target.transformer.wte.weight
    assert torch.equal(target.lm_head.weight, source.lm_head.weight)
    with pytest.raises(UsageError) as error:
        check_tensors_fit(tmp_path, build_model("gpt2_lm"))  # Accelerate's load_state would refuse the file
    assert "lm_head.weight" in str(error.value) and "transformer.wte.weight" in str(error.value)
    assert "--init-from" in str(error.value)


def test_untied_tensors_missing_or_unexpected_are_named(tmp_path):
    from dtrain.errors import UsageError
    from dtrain.weights import check_fits

    state = dict(build_model("tied_lm").state_dict())
    del state["head.weight"], state["ln_f.bias"]  # the alias may go, ln_f.bias may not
    state["extra.weight"] = torch.zeros(2)
    path = save_tensors(tmp_path / "w.safetensors", state)
    with pytest.raises(UsageError) as error:
        check_fits(path, build_model("tied_lm"))
    message = str(error.value)
    assert "ln_f.bias: missing in the checkpoint" in message and "extra.weight: not in the model" in message
    assert "head.weight: missing" not in message


def test_host_copy_keeps_aliases_as_aliases():
    from collections import OrderedDict

    from dtrain.checkpoint.snapshot import HostCopier

    model = build_model("tied_lm")
    copier = HostCopier()
    for _ in range(2):  # the second snapshot reuses the buffers of the first
        copy = copier.copy(model.state_dict(), ("model", 0))
        assert isinstance(copy, OrderedDict)
        assert copy["head.weight"] is copy["tok_emb.weight"], "one host tensor for the tied pair"
        assert copy["tok_emb.weight"].data_ptr() != model.tok_emb.weight.data_ptr()
        assert same_tensors(copy, model.state_dict())
        with torch.no_grad():
            model.tok_emb.weight.add_(1.0)
    # Views of one storage at other offsets share one host storage too, each with its own place in it.
    base = torch.arange(12.0)
    views = copier.copy({"a": base[:6].view(2, 3), "b": base[6:], "c": base[:6].view(2, 3)}, ("views",))
    assert views["a"] is views["c"] and torch.equal(views["b"], base[6:])
    assert views["a"].untyped_storage().data_ptr() == views["b"].untyped_storage().data_ptr()
