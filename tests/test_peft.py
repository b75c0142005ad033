"""LoRA (peft) on the causal-lm task: adapter-only checkpoints, exact resume after SIGTERM (1 and 2 ranks, FSDP2),
the frozen base's identity, exports that peft and transformers load, and the Python API with a user's PeftModel.
Models, tokenizers and data are built in the test; nothing is downloaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_end, final_checkpoint, train_cmd, train_in_process

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from test_causal_lm import (TINY, model_config, one_error_line, run_interrupted_at,  # noqa: E402
                            sharded_stop_and_resume_is_exact, write_corpus)
from test_instruction_data import prompt_completion_records, tokenizer_dir, write_records  # noqa: E402

from dtrain.config import build_config  # noqa: E402
from dtrain.errors import UsageError  # noqa: E402
from dtrain.tasks import build_task  # noqa: E402

LORA = ["--peft", "lora", "--lora-r", "4", "--lora-alpha", "8"]


def base_model_dir(path: Path, kind: str = "llama", tied: bool = False, seed: int = 11) -> Path:
    """A 'pretrained' model directory (save_pretrained) with the byte-level tokenizer plus EOS and chat template."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(model_config(kind, tied, vocab_size=260)).save_pretrained(str(path))
    tokenizer_dir(path)
    return path


def adapter_names(checkpoint: Path) -> list[str]:
    return sorted(load_file(str(checkpoint / "model.safetensors")))


# ---------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("kind,tied,processes,data_kind", [
    ("llama", False, 1, "instructions"),
    pytest.param("gpt2", True, 2, "text", marks=pytest.mark.slow),
], ids=["llama-instructions-1proc", "gpt2-tied-text-2proc"])
def test_lora_sigterm_and_resume_is_bit_identical_to_a_straight_run(runner, tmp_path, kind, tied, processes,
                                                                    data_kind):
    base = base_model_dir(tmp_path / "base", kind, tied)
    data = write_records(tmp_path / "qa.jsonl", prompt_completion_records(80)) if data_kind == "instructions" \
        else write_corpus(tmp_path / "text")
    args = [*TINY, *LORA, "--model", str(base), "--data", str(data), "--block-size", "40"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight_run = runner.start(train_cmd(*args, "--output-dir", str(straight), processes=processes), cwd=REPO)
    run_interrupted_at(runner, train_cmd(*args, "--output-dir", str(stopped), processes=processes), stopped, 5,
                       processes)  # mid-epoch
    output, _ = straight_run.communicate(timeout=180)
    assert straight_run.returncode == 0, output[-3000:]
    resumed = runner.run(train_cmd(*args, "--output-dir", str(stopped), "--resume", "latest", processes=processes),
                         cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_end(straight, stopped)  # adapter weights and optimizer state, bit for bit
    names = adapter_names(final_checkpoint(stopped))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    # Losses logged after the resume (the window of step 14 lies wholly after it) and eval losses are the same.
    logged = [{(r["step"], key): r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               for key in ("loss", "val_loss") if key in r and r["step"] > 7} for run in (straight, stopped)]
    assert logged[0] and logged[0] == logged[1]
    if data_kind == "instructions":  # eval samples continue the held-out prompts
        sample = (stopped / "samples" / "step_000000014.txt").read_text()
        assert prompt_completion_records(80)[19]["prompt"] in sample


@pytest.mark.slow
def test_sharded_lora_run_saves_only_the_adapter_and_resumes_exactly(runner, tmp_path):
    from dtrain.checkpoint.sharded import model_state

    base = base_model_dir(tmp_path / "base")
    args = [*TINY, *LORA, "--model", str(base), "--data", str(write_corpus(tmp_path / "text")), "--sharding",
            "fsdp2"]
    stopped = sharded_stop_and_resume_is_exact(runner, args, tmp_path)
    names = sorted(model_state(final_checkpoint(stopped)))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names


# ---------------------------------------------------------------------------------------------- size, identity

def test_lora_checkpoint_holds_only_the_adapter_and_its_optimizer_state(tmp_path, fresh_accelerate_state):
    config = tmp_path / "config.json"
    transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, vocab_size=256, bos_token_id=None,
                             eos_token_id=None).to_json_file(str(config))
    run = tmp_path / "run"
    assert train_in_process(*TINY, "--max-steps", "2", "--peft", "lora", "--lora-r", "16", "--lora-target-modules",
                            "all-linear", "--model-config", str(config), "--data", str(write_corpus(tmp_path / "t")),
                            "--output-dir", str(run)) == 0
    checkpoint = final_checkpoint(run)
    adapter = load_file(str(checkpoint / "model.safetensors"))
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    optimizer_state_bytes = 2 * adapter_bytes  # AdamW: exp_avg and exp_avg_sq per trainable tensor
    total = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert total <= 1.3 * (adapter_bytes + optimizer_state_bytes) + 64 * 1024, (total, adapter_bytes)
    full_model_bytes = sum(t.numel() * 4 for t in AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(str(config))).state_dict().values())
    assert adapter_bytes < full_model_bytes / 5
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["shape"]["frozen_base"].startswith("crc32c:") and state["shape"]["adapter"]["r"] == 16


def test_resume_refuses_a_base_that_changed(tmp_path, fresh_accelerate_state, capsys):
    base = base_model_dir(tmp_path / "base")
    data = write_corpus(tmp_path / "text")
    args = [*TINY, *LORA, "--max-steps", "2", "--model", str(base), "--data", str(data), "--output-dir",
            str(tmp_path / "run")]
    assert train_in_process(*args) == 0
    base_model_dir(base, seed=12)  # other weights, same architecture
    capsys.readouterr()
    assert train_in_process(*args, "--max-steps", "4", "--resume", "latest") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "frozen base model changed" in line and "--model" in line
    assert final_checkpoint(tmp_path / "run").name == "step_000000002"


# ---------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("llama", False)], ids=["gpt2-tied", "llama-untied"])
def test_exports_load_with_peft_and_transformers_and_equal_peft_s_own(tmp_path, fresh_accelerate_state, kind, tied):
    from dtrain.commands.cli import main as dtrain_main

    base = base_model_dir(tmp_path / "base", kind, tied)
    run = tmp_path / "run"
    assert train_in_process(*TINY, *LORA, "--max-steps", "4", "--model", str(base), "--data",
                            str(write_corpus(tmp_path / "text")), "--output-dir", str(run)) == 0
    trained = adapter_names(final_checkpoint(run))
    saved = load_file(str(final_checkpoint(run) / "model.safetensors"))

    adapter_dir = tmp_path / "adapter"
    assert dtrain_main(["ckpt", "export", str(run), "--format", "peft", "--out", str(adapter_dir)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_dir))
    state = loaded.state_dict()
    assert all(torch.equal(state[name], saved[name]) for name in trained)  # tensor by tensor

    # peft's own merge of the same weights is what --format hf writes
    merged_dir = tmp_path / "merged"
    assert dtrain_main(["ckpt", "export", str(run), "--format", "hf", "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    reference = loaded.merge_and_unload().eval()
    assert merged.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(merged.state_dict()[n], t) for n, t in reference.state_dict().items())
    ids = torch.tensor([list(b"def resume(exact):")])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, reference(ids).logits)


def test_a_lora_checkpoint_evaluates_and_its_safetensors_export_loads_back(tmp_path, capsys,
                                                                          fresh_accelerate_state):
    from dtrain.checkpoint.layout import read_trainer_state
    from dtrain.commands.cli import main as dtrain_main
    from dtrain.commands.export import load_exported

    base = base_model_dir(tmp_path / "base", "llama", False)
    run = tmp_path / "run"
    assert train_in_process(*TINY, *LORA, "--max-steps", "4", "--eval-every-steps", "4", "--model", str(base),
                            "--data", str(write_corpus(tmp_path / "text")), "--output-dir", str(run)) == 0
    checkpoint = final_checkpoint(run)
    measured = read_trainer_state(checkpoint)["checkpoint_metric"]["value"]
    capsys.readouterr()
    assert dtrain_main(["eval", str(checkpoint), "--max-batches", "2", "--json"]) == 0  # adapter on the base
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["val_loss"] == pytest.approx(measured, rel=1e-5)

    out = tmp_path / "adapter.safetensors"
    assert dtrain_main(["ckpt", "export", str(run), "--out", str(out)]) == 0
    model, _ = load_exported(out)
    saved = load_file(str(checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_peft_export_refuses_a_full_fine_tune(runner, tmp_path, capsys, fresh_accelerate_state):
    from dtrain.commands.cli import main as dtrain_main

    run = tmp_path / "run"
    assert train_in_process(*TINY, "--max-steps", "1", "--model", str(base_model_dir(tmp_path / "base")), "--data",
                            str(write_corpus(tmp_path / "text")), "--output-dir", str(run)) == 0
    capsys.readouterr()
    assert dtrain_main(["ckpt", "export", str(run), "--format", "peft", "--out", str(tmp_path / "x")]) == 2
    assert "--peft" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- settings, API

def test_peft_config_file_as_peft_saves_it(tmp_path):
    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(
        str(tmp_path / "cfg"))
    base = base_model_dir(tmp_path / "base")
    config = build_config(flag_values={"task": "causal-lm", "model": str(base), "block_size": 32, "data": str(
        write_corpus(tmp_path / "text")), "peft_config": str(tmp_path / "cfg" / "adapter_config.json")}).task
    task = build_task(config, seed=1)
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable and all("q_proj.lora_" in n for n in trainable)
    assert task.shape["adapter"]["r"] == 2


@pytest.mark.parametrize("values,field", [
    ({"lora_r": 4}, "lora_r"),
    ({"peft": "lora", "lora_dropout": 1.5}, "lora_dropout"),
    ({"peft": "lora", "peft_config": "x.json", "lora_r": 4}, "lora_r"),
    ({"task": "charlm", "peft": "lora"}, "peft"),
], ids=["lora-without-peft", "bad-dropout", "flags-with-file", "peft-for-charlm"])
def test_bad_peft_settings_name_the_field(values, field):
    with pytest.raises(UsageError, match=f"invalid value for {field}"):
        build_config(flag_values={"task": "causal-lm", **values})


def test_missing_peft_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    config = build_config(flag_values={"task": "causal-lm", "peft": "lora", "block_size": 32, "n_layer": 1,
                                       "n_head": 2, "n_embd": 32, "corpus_bytes": 20_000}).task
    with pytest.raises(UsageError, match=r'peft.*pip install -e "\.\[hf\]"'):
        build_task(config, seed=1)


def test_a_user_s_peft_model_through_the_python_api_saves_only_its_adapter(tmp_path, fresh_accelerate_state):
    from torch.utils.data import DataLoader

    from dtrain import Trainer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(model_config("gpt2", True))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, task_type="CAUSAL_LM"))
    blocks = torch.randint(0, 256, (32, 16))
    loader = DataLoader([{"input_ids": b} for b in blocks], batch_size=4, shuffle=True)

    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    config = build_config(flag_values={"output_dir": str(tmp_path / "run"), "max_steps": 3, "epochs": 0,
                                       "eval_every_steps": 0, "warmup_steps": 1})
    Trainer(config, model=model, loss_fn=loss_fn, train_dataloader=loader).fit()
    checkpoint = final_checkpoint(tmp_path / "run")
    assert adapter_names(checkpoint) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["shape"]["frozen_base"]
