"""The built-in Hugging Face causal-LM task and its export: real transformers models built from configs in the
test, tokenizers built in the test, text written by the test; nothing is downloaded."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_end, final_checkpoint, same_tensors, train_cmd, wait_for

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from safetensors.torch import load_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig  # noqa: E402

from dtrain.config import build_config  # noqa: E402
from dtrain.errors import UsageError  # noqa: E402
from dtrain.tasks import build_task  # noqa: E402

SITE_HOOKS = str(REPO / "tests" / "helpers" / "site")  # sitecustomize: pause at a step, hide a module
TINY = ["--task", "causal-lm", "--block-size", "32", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
        "--epochs", "0", "--max-steps", "14", "--eval-every-steps", "7", "--eval-max-batches", "2",
        "--log-every-steps", "7", "--sample-chars", "8", "--keep-last", "0"]


def write_corpus(folder: Path, files: int = 3, lines: int = 120) -> Path:
    """A few deterministic text files (about 4 KB each): enough blocks of 32 bytes for tiny runs."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "stream", "block", "token", "model", "resume", "exact"]
    for f in range(files):
        text = "\n".join(" ".join(words[(f * 7 + i * 3 + j) % len(words)] for j in range(5)) + f" {i}."
                         for i in range(lines))
        (folder / f"part_{f}.txt").write_text(text + "\n")
    return folder


def model_config(kind: str, tied: bool, vocab_size: int = 256):
    if kind == "gpt2":
        return GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size,
                          tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=64, vocab_size=vocab_size,
                       tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def write_model_config(path: Path, kind: str, tied: bool, vocab_size: int = 256) -> Path:
    model_config(kind, tied, vocab_size).to_json_file(str(path))
    return path


def run_interrupted_at(runner, cmd: list[str], out: Path, step: int, processes: int) -> str:
    """Runs `cmd`, which waits after optimizer `step` until a signal comes; sends SIGTERM; expects a clean stop."""
    proc = runner.start(cmd, cwd=REPO, PYTHONPATH=f"{REPO}{os.pathsep}{SITE_HOOKS}",
                        DTRAIN_TEST_PAUSE_AT_STEP=str(step))
    wait_for(lambda: all((out / f"paused-rank{r}").exists() for r in range(processes)), timeout=150,
             what=f"the run to reach step {step}")
    proc.send_signal(signal.SIGTERM)  # the multi-process launcher forwards it to both ranks
    output, _ = proc.communicate(timeout=90)
    if processes == 1:
        assert proc.returncode == 143, output[-3000:]  # (launchers hide the code: the metrics tell it)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["signal"]) for r in records if r.get("event") == "interrupt"] == [(step, "SIGTERM")]
    assert final_checkpoint(out).name == f"step_{step:09d}", output[-3000:]
    return output


# Each model family, tie mode and world size appears twice, each pair of them once (a process starts in ~15 s
# here, most of it importing torch and transformers: the full product would cost minutes of CI).
@pytest.mark.parametrize("kind,tied,processes", [
    ("llama", False, 1),
    ("gpt2", True, 1),
    pytest.param("gpt2", False, 2, marks=pytest.mark.slow),
    pytest.param("llama", True, 2, marks=pytest.mark.slow),
], ids=["llama-untied-1proc", "gpt2-tied-1proc", "gpt2-untied-2proc", "llama-tied-2proc"])
def test_sigterm_and_resume_is_bit_identical_to_a_straight_run(runner, tmp_path, kind, tied, processes):
    data = write_corpus(tmp_path / "text")
    config = write_model_config(tmp_path / "config.json", kind, tied)
    args = [*TINY, "--model-config", str(config), "--data", str(data)]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight_run = runner.start(train_cmd(*args, "--output-dir", str(straight), processes=processes), cwd=REPO)
    run_interrupted_at(runner, train_cmd(*args, "--output-dir", str(stopped), processes=processes), stopped, 5,
                       processes)  # meanwhile: most of a tiny run is starting up
    output, _ = straight_run.communicate(timeout=180)
    assert straight_run.returncode == 0, output[-3000:]
    resumed = runner.run(train_cmd(*args, "--output-dir", str(stopped), "--resume", "latest", processes=processes),
                         cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_end(straight, stopped)
    records = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [5]
    evals = [r for r in records if "val_loss" in r]
    assert evals and all(r["perplexity"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item()) for r in evals)
    assert sorted(p.name for p in (stopped / "samples").iterdir()) == ["step_000000007.txt", "step_000000014.txt"]


def test_streaming_text_files_resume_bit_identical(runner, tmp_path):
    data = write_corpus(tmp_path / "text", files=4)
    config = write_model_config(tmp_path / "config.json", "llama", False)
    args = [*TINY, "--model-config", str(config), "--data", str(data), "--streaming"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight_run = runner.start(train_cmd(*args, "--output-dir", str(straight)), cwd=REPO)
    run_interrupted_at(runner, train_cmd(*args, "--output-dir", str(stopped)), stopped, 5, 1)
    output, _ = straight_run.communicate(timeout=180)
    assert straight_run.returncode == 0, output[-3000:]
    resumed = runner.run(train_cmd(*args, "--output-dir", str(stopped), "--resume", "latest"), cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_end(straight, stopped)


# ---------------------------------------------------------------------------------------------- in-process

def task_config(**values):
    return build_config(flag_values={"task": "causal-lm", "block_size": 32, **values}).task


def test_streamed_blocks_continue_exactly_from_the_stream_state(tmp_path):
    data = write_corpus(tmp_path / "text", files=3)
    config = write_model_config(tmp_path / "config.json", "gpt2", False)
    streamed = build_task(task_config(data=str(data), model_config=str(config), streaming=True), seed=1)
    mapped = build_task(task_config(data=str(data), model_config=str(config)), seed=1)
    assert isinstance(streamed.train_data, datasets.IterableDataset)
    assert streamed.train_data.num_shards == 3  # one shard per file: ranks can split them

    iterator = iter(streamed.train_data)
    head = [next(iterator)["input_ids"] for _ in range(7)]
    state = streamed.train_data.state_dict()
    rest = [row["input_ids"] for row in iterator]
    again = build_task(task_config(data=str(data), model_config=str(config), streaming=True), seed=1).train_data
    again.load_state_dict(state)
    assert [row["input_ids"] for row in again] == rest
    # Streamed and map-style packing hold out the same share; held-out blocks are never trained on.
    train_blocks = {tuple(b) for b in head + rest}
    eval_blocks = {tuple(streamed.eval_data[i]["input_ids"].tolist()) for i in range(len(streamed.eval_data))}
    assert eval_blocks and not train_blocks & eval_blocks
    assert len(mapped.eval_data) / (len(mapped.train_data) + len(mapped.eval_data)) == pytest.approx(0.05, abs=0.01)


def test_streamed_saved_dataset_continues_exactly_from_the_stream_state(tmp_path):
    text = (write_corpus(tmp_path / "text", files=1, lines=400) / "part_0.txt").read_text().splitlines()
    datasets.Dataset.from_dict({"text": text}).save_to_disk(str(tmp_path / "saved"))
    config = task_config(data=str(tmp_path / "saved"), streaming=True, n_layer=1, n_head=2, n_embd=32)
    stream = build_task(config, seed=1).train_data
    iterator = iter(stream)
    for _ in range(120):  # into the second packing batch (64 rows give about 80 blocks)
        next(iterator)
    state = stream.state_dict()
    rest = [row["input_ids"] for row in iterator]
    again = build_task(config, seed=1).train_data
    again.load_state_dict(state)
    assert rest and [row["input_ids"] for row in again] == rest


def test_default_run_needs_nothing_but_the_hf_extra():
    task = build_task(task_config(corpus_bytes=20_000, n_layer=1, n_head=2, n_embd=32), seed=3)
    assert type(task.model).__name__ == "GPT2LMHeadModel" and task.model.config.vocab_size == 256
    assert task.fingerprint.startswith("python-stdlib:") and len(task.train_data) > 0 and len(task.eval_data) > 0
    assert task.shape["n_layer"] == 1 and task.shape["tie_word_embeddings"] is True
    batch = task.collate_fn([task.train_data[0], task.train_data[1]])
    assert batch["input_ids"].shape == (2, 32) and torch.isfinite(task.loss(task.model, batch))


def test_the_same_seed_builds_the_same_model_whatever_the_global_rng(tmp_path):
    config = write_model_config(tmp_path / "config.json", "llama", False)
    data = write_corpus(tmp_path / "text")
    first = build_task(task_config(model_config=str(config), data=str(data)), seed=5).model.state_dict()
    torch.manual_seed(999)
    second = build_task(task_config(model_config=str(config), data=str(data)), seed=5).model.state_dict()
    other = build_task(task_config(model_config=str(config), data=str(data)), seed=6).model.state_dict()
    assert same_tensors(first, second) and not same_tensors(first, other)


def test_model_directory_brings_its_weights_and_its_tokenizer(tmp_path):
    from dtrain.integrations.hf_models import byte_level_tokenizer

    saved = tmp_path / "pretrained"
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|end|>"})  # id 256: only this directory's tokenizer has it
    tokenizer.save_pretrained(str(saved))
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(model_config("llama", False, vocab_size=260)).save_pretrained(str(saved))
    data = write_corpus(tmp_path / "text")
    task = build_task(task_config(model=str(saved), data=str(data)), seed=1)
    assert same_tensors(task.model.state_dict(), AutoModelForCausalLM.from_pretrained(str(saved)).state_dict())
    tokens = torch.cat([task.train_data[i]["input_ids"] for i in range(len(task.train_data))])
    assert (tokens == 256).any(), "documents end with the directory tokenizer's EOS"
    assert task.shape["vocab_size"] == 260 and task.shape["model_type"] == "llama"


def test_saved_dataset_directory_with_a_validation_split(tmp_path):
    text = (write_corpus(tmp_path / "text", files=1) / "part_0.txt").read_text().splitlines()
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": text[:100]}),
                                   "validation": datasets.Dataset.from_dict({"text": text[100:]})})
    splits.save_to_disk(str(tmp_path / "saved"))
    before = sorted(p.name for p in (tmp_path / "saved").rglob("*"))
    task = build_task(task_config(data=str(tmp_path / "saved"), n_layer=1, n_head=2, n_embd=32), seed=1)
    assert len(task.train_data) == sum(len(row) for row in text[:100]) // 32  # rows packed, all of them train
    assert 0 < len(task.eval_data) < len(task.train_data)  # the validation split, not a share of train
    assert task.fingerprint.startswith("datasets-dir:")
    assert sorted(p.name for p in (tmp_path / "saved").rglob("*")) == before, "nothing written into the data"


def test_samples_draw_only_on_the_given_generator(tmp_path):
    task = build_task(task_config(corpus_bytes=20_000, n_layer=1, n_head=2, n_embd=32, sample_chars=20,
                                  sample_prompt="def "), seed=3)
    task.model.eval()
    rng = torch.get_rng_state()
    first = task.sample(task.model, torch.Generator().manual_seed(7))
    assert torch.equal(rng, torch.get_rng_state()), "sampling drew on the global RNG"
    assert first == task.sample(task.model, torch.Generator().manual_seed(7))
    assert first.startswith("def ") and first != task.sample(task.model, torch.Generator().manual_seed(8))


def test_gradient_checkpointing_reaches_the_model_and_keeps_the_gradients(tmp_path):
    config = write_model_config(tmp_path / "config.json", "llama", False)
    data = write_corpus(tmp_path / "text")
    grads = []
    for checkpointing in (False, True):
        task = build_task(task_config(model_config=str(config), data=str(data),
                                      gradient_checkpointing=checkpointing), seed=2)
        enabled = getattr(task.model, "is_activation_checkpointing", None)  # transformers >= 5
        assert (enabled if enabled is not None else task.model.is_gradient_checkpointing) == checkpointing
        task.model.train()
        task.loss(task.model, task.collate_fn([task.train_data[i] for i in range(4)])).backward()
        grads.append({n: p.grad.clone() for n, p in task.model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


# ---------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("llama", False)], ids=["gpt2-tied", "llama-untied"])
def test_hf_export_loads_with_from_pretrained_and_gives_the_trained_logits(runner, tmp_path, kind, tied):
    from dtrain.commands.cli import main as dtrain_main

    data = write_corpus(tmp_path / "text")
    config = write_model_config(tmp_path / "config.json", kind, tied)
    run = tmp_path / "run"
    result = runner.run(train_cmd(*TINY, "--max-steps", "6", "--model-config", str(config), "--data", str(data),
                                  "--output-dir", str(run)), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    out = tmp_path / "exported"
    assert dtrain_main(["ckpt", "export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"

    trained = AutoModelForCausalLM.from_config(model_config(kind, tied)).eval()
    load_model(trained, str(final_checkpoint(run) / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tokenizer("def resume(exact): return 1")["input_ids"]])
    assert ids[0].tolist() == list(b"def resume(exact): return 1")  # the byte-level tokenizer came along
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, loaded(ids).logits)
    tied_now = loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert tied_now == tied

    bf16 = tmp_path / "exported-bf16"
    assert dtrain_main(["ckpt", "export", str(run), "--format", "hf", "--dtype", "bf16", "--out", str(bf16)]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(bf16)).dtype == torch.bfloat16
    assert dtrain_main(["ckpt", "export", str(run), "--format", "hf", "--out", str(out)]) == 0  # replaces an export


def test_hf_export_refuses_a_non_causal_lm_run_and_a_foreign_directory(runner, tmp_path, capsys):
    from dtrain.commands.cli import main as dtrain_main

    run = tmp_path / "run"
    result = runner.run(train_cmd("--task", "regression", "--max-steps", "2", "--epochs", "0", "--batch-size", "16",
                                  "--output-dir", str(run)), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert dtrain_main(["ckpt", "export", str(run), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "causal-lm" in capsys.readouterr().err and not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert dtrain_main(["ckpt", "export", str(run), "--format", "hf", "--out", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- bad input

def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("dtrain: error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


def test_missing_hf_extra_is_one_usage_error_naming_it(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.run(train_cmd("--task", "causal-lm", "--output-dir", str(out)), cwd=REPO,
                        PYTHONPATH=f"{REPO}{os.pathsep}{SITE_HOOKS}", DTRAIN_TEST_HIDE_MODULES="transformers")
    assert result.returncode == 2, result.stdout[-3000:]
    assert 'pip install -e ".[hf]"' in one_error_line(result.stdout)
    assert not out.exists()


def train_in_process(args: list[str], capsys) -> tuple[int, str]:
    from dtrain.commands.train import main

    code = main(args)
    return code, capsys.readouterr().err


def test_model_path_that_is_not_a_model_directory(tmp_path, capsys, fresh_accelerate_state):
    not_a_model = write_corpus(tmp_path / "text")
    out = tmp_path / "run"
    code, err = train_in_process(["--task", "causal-lm", "--model", str(not_a_model), "--output-dir", str(out)],
                                 capsys)
    assert code == 2 and "invalid value for model" in one_error_line(err) and "config.json" in err
    assert not out.exists()


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys, fresh_accelerate_state):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)} | {"[UNK]": 300}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    config = write_model_config(tmp_path / "config.json", "llama", False, vocab_size=256)
    out = tmp_path / "run"
    code, err = train_in_process(["--task", "causal-lm", "--model-config", str(config), "--tokenizer",
                                  str(tmp_path / "tok"), "--output-dir", str(out)], capsys)
    assert code == 2 and "301 ids" in one_error_line(err) and "256" in err
    assert not out.exists()


@pytest.mark.parametrize("values,field", [
    ({"model": "a", "model_config": "b.json"}, "model_config"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"task": "charlm", "model": "some/model"}, "model"),
    ({"model_config": "/nonexistent/config.json"}, "model_config"),
    ({"data": "/nonexistent/corpus"}, "data"),
], ids=["model-and-config", "eval-fraction", "model-for-charlm", "missing-config-file", "missing-data"])
def test_bad_causal_lm_settings_name_the_field(values, field):
    with pytest.raises(UsageError, match=f"invalid value for {field}"):
        build_task(build_config(flag_values={"task": "causal-lm", **values}).task, seed=0)


# ------------------------------------------------------------------------------------------- sharded (FSDP2)

def sharded_stop_and_resume_is_exact(runner, args: list[str], tmp_path: Path) -> Path:
    """Runs `args` on 2 ranks under FSDP2 straight through and, beside it, stopped by SIGTERM at step 5 and resumed;
    asserts both end bit for bit alike (weights, optimizer, RNG). Returns the stopped run's output dir."""
    from dtrain.commands.verify_resume import compare_checkpoints

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight_run = runner.start(train_cmd(*args, "--output-dir", str(straight), processes=2), cwd=REPO)
    output = run_interrupted_at(runner, train_cmd(*args, "--output-dir", str(stopped), processes=2), stopped, 5, 2)
    assert "sharded with FSDP2 over 2 ranks" in output
    output, _ = straight_run.communicate(timeout=180)
    assert straight_run.returncode == 0, output[-3000:]
    resumed = runner.run(train_cmd(*args, "--output-dir", str(stopped), "--resume", "latest", processes=2),
                         cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    rows = compare_checkpoints(final_checkpoint(straight), final_checkpoint(stopped))
    assert [name for name, same, _ in rows if not same] == []
    return stopped


@pytest.mark.slow
@pytest.mark.parametrize("kind,tied,streaming", [("gpt2", True, False), ("llama", False, True)],
                         ids=["gpt2-tied", "llama-streaming"])
def test_sharded_sigterm_resume_is_exact_and_exports_a_whole_hf_model(runner, tmp_path, kind, tied, streaming):
    from dtrain.checkpoint.sharded import model_state
    from dtrain.commands.cli import main as dtrain_main

    data = write_corpus(tmp_path / "text", files=4)
    config = write_model_config(tmp_path / "config.json", kind, tied)
    args = [*TINY, "--model-config", str(config), "--data", str(data), "--sharding", "fsdp2",
            *(["--streaming"] if streaming else [])]
    stopped = sharded_stop_and_resume_is_exact(runner, args, tmp_path)

    out = tmp_path / "exported"
    assert dtrain_main(["ckpt", "export", str(stopped), "--format", "hf", "--out", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    gathered = model_state(final_checkpoint(stopped))
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in gathered.items())
    tied_now = loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert tied_now == tied
