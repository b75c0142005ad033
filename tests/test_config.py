"""Configuration: files (YAML/JSON, flat/sectioned), flag precedence, --quick, validation and its exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, TRAIN

from dtrain.commands import cli
from dtrain.config import FIELDS, QUICK_PRESET, Config, config_from_args, read_config_file
from dtrain.commands.train import build_parser, main

# Flag names users and scripts rely on: fixed.
CONTRACT_FLAGS = [
    "--config", "--output-dir", "--task", "--data", "--device", "--seed", "--epochs", "--max-steps", "--batch-size",
    "--grad-accum", "--lr", "--mixed-precision", "--eval-every-steps", "--log-every-steps", "--save-every-steps",
    "--save-every-epochs", "--save-every-seconds", "--keep-last", "--keep-best", "--monitor", "--mode",
    "--keep-every-steps", "--resume", "--overwrite", "--early-stopping-patience", "--async-save", "--quick",
]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def parse(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(list(argv)))


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return path


def assert_usage_error(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("dtrain: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    return lines[0]


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flat_config_file_sets_fields(tmp_path, suffix):
    path = write(tmp_path / f"c{suffix}", {"lr": 0.01, "batch_size": 7, "keep-last": 5, "task": "regression",
                                          "mode": "max", "async_save": True, "n_embd": 48})
    config = parse("--config", str(path))
    assert config.train.lr == 0.01 and config.train.batch_size == 7
    assert config.checkpoint.keep_last == 5 and config.checkpoint.async_save is True
    assert config.task.task == "regression" and config.task.n_embd == 48 and config.eval.mode == "max"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_sectioned_config_file_sets_fields(tmp_path, suffix):
    path = write(tmp_path / f"c{suffix}", {"output_dir": str(tmp_path / "out"),
                                          "task": {"task": "regression", "n_layer": 3},
                                          "train": {"lr": 0.02, "seed": 9}, "eval": {"monitor": "acc", "mode": "max"},
                                          "checkpoint": {"keep_best": 2, "save_every_steps": 10}})
    config = parse("--config", str(path))
    assert config.output_dir == str(tmp_path / "out")
    assert (config.task.task, config.task.n_layer) == ("regression", 3)
    assert (config.train.lr, config.train.seed) == (0.02, 9)
    assert (config.eval.monitor, config.eval.mode) == ("acc", "max")
    assert (config.checkpoint.keep_best, config.checkpoint.save_every_steps) == (2, 10)


def test_yaml_values_are_coerced_to_field_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nepochs: '4'\noverwrite: yes\nsave_every_seconds: 2\n")
    config = parse("--config", str(path))
    assert config.train.lr == 0.001 and config.train.epochs == 4
    assert config.checkpoint.overwrite is True and config.checkpoint.save_every_seconds == 2.0


def test_flags_override_the_config_file(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"lr": 0.02, "batch_size": 5}, "keep_last": 9, "overwrite": True})
    config = parse("--config", str(path), "--lr", "0.5", "--keep-last", "1", "--no-overwrite")
    assert config.train.lr == 0.5 and config.checkpoint.keep_last == 1 and config.checkpoint.overwrite is False
    assert config.train.batch_size == 5, "fields the flags do not name keep the file's value"


def test_quick_preset_applies_under_file_and_flags(tmp_path):
    config = parse("--quick")
    for name, value in QUICK_PRESET.items():
        section, _, _ = FIELDS[name]
        assert getattr(getattr(config, section), name) == value
    path = write(tmp_path / "c.yaml", {"n_embd": 48, "max_steps": 11})
    config = parse("--quick", "--config", str(path), "--max-steps", "7")
    assert config.task.n_embd == 48, "the file wins over the preset"
    assert config.train.max_steps == 7, "flags win over file and preset"
    assert config.task.n_layer == QUICK_PRESET["n_layer"], "the rest of the preset still applies"
    # `quick: true` in the file turns the preset on as well; `--no-quick` turns it off again.
    path = write(tmp_path / "q.yaml", {"quick": True, "batch_size": 3})
    assert parse("--config", str(path)).task.n_layer == QUICK_PRESET["n_layer"]
    assert parse("--config", str(path)).train.batch_size == 3
    assert parse("--config", str(path), "--no-quick").task.n_layer == Config().task.n_layer


def test_every_config_field_has_a_flag():
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in flags, name


def test_dtrain_train_help_lists_every_contract_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in CONTRACT_FLAGS + ["--" + name.replace("_", "-") for name in FIELDS]:
        assert flag in out, f"{flag} missing from `dtrain train --help`"


def test_resolved_config_is_written_and_can_be_fed_back(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*FAST, "--output-dir", str(out), "--max-steps", "4", "--lr", "0.004", "--keep-best", "2",
            "--seed", "77", "--eval-every-steps", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    written = out / "config.yaml"
    assert written.exists()
    original = parse(*argv)
    original.train.mixed_precision = "no"  # unset by dtrain, resolved from the launcher (none: no) and recorded
    original.train.sharding = "none"  # likewise
    fed_back = parse("--config", str(written))
    assert fed_back.to_dict() == original.to_dict()
    # And it starts a real run: resume that run from its own config file.
    assert main(["--config", str(written), "--resume", "latest", "--max-steps", "6"]) == 0, capsys.readouterr().err
    assert parse("--config", str(written)).train.max_steps == 6


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("argv, field", [
    (["--lr", "-1"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--lr", "fast"], "lr"),
    (["--batch-size", "0"], "batch_size"),
    (["--grad-accum", "0"], "grad_accum"),
    (["--mode", "sideways"], "mode"),
    (["--mixed-precision", "fp8"], "mixed-precision"),
    (["--device", "tpu"], "device"),
    (["--epochs", "1.5"], "epochs"),
    (["--epochs", "three"], "epochs"),
    (["--epochs", "-1"], "epochs"),
    (["--epochs", "0", "--max-steps", "0"], "max_steps"),
    (["--n-embd", "30", "--n-head", "4"], "n_embd"),
    (["--dropout", "1.0"], "dropout"),
    (["--keep-last", "-2"], "keep_last"),
    (["--save-every-seconds", "-5"], "save_every_seconds"),
    (["--log-every-steps", "0"], "log_every_steps"),
    (["--task", "not a task"], "task"),
    (["--no-such-flag", "1"], "--no-such-flag"),
])
def test_bad_flag_value_exits_2_naming_the_field(capsys, argv, field):
    assert_usage_error(capsys, argv, field)


@pytest.mark.parametrize("content, words", [
    ({"bogus_key": 1}, ["bogus_key"]),
    ({"train": {"lr": 0.1, "n_embd": 64}}, ["train.n_embd"]),
    ({"train": {"mode": "max"}}, ["train.mode"]),
    ({"mode": "sideways"}, ["mode", "sideways"]),
    ({"epochs": 1.5}, ["epochs"]),
    ({"batch_size": None}, ["batch_size"]),
    ({"overwrite": "maybe"}, ["overwrite"]),
    ({"lr": [1, 2]}, ["lr"]),
    ([1, 2, 3], ["mapping"]),
])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_bad_config_file_exits_2_naming_the_key(tmp_path, capsys, content, words, suffix):
    path = write(tmp_path / f"bad{suffix}", content)
    assert_usage_error(capsys, ["--config", str(path), "--output-dir", str(tmp_path / "out")], *words)
    assert not (tmp_path / "out").exists(), "a refused config must not create anything"


def test_unreadable_or_malformed_config_file_exits_2(tmp_path, capsys):
    assert_usage_error(capsys, ["--config", str(tmp_path / "missing.yaml")], "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert_usage_error(capsys, ["--config", str(broken)], "broken.json", "JSON")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("lr: [1, 2\n")
    assert_usage_error(capsys, ["--config", str(broken_yaml)], "broken.yaml", "YAML")


def test_read_config_file_of_an_empty_file_sets_nothing(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert read_config_file(path) == {}


def test_cuda_device_without_a_gpu_exits_2(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_usage_error(capsys, [*FAST, "--output-dir", str(tmp_path / "o"), "--device", "cuda"], "device", "cuda")
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_fp16_on_the_cpu_exits_2(tmp_path, capsys):
    assert_usage_error(capsys, [*FAST, "--output-dir", str(tmp_path / "o"), "--device", "cpu",
                                "--mixed-precision", "fp16"], "mixed_precision", "fp16")


def test_bad_value_in_a_real_process_exits_2_with_one_clear_line(runner, tmp_path):
    result = runner.run([sys.executable, TRAIN, "--lr", "-1", "--output-dir", str(tmp_path / "o")], timeout=60)
    assert result.returncode == 2, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("dtrain: error:") and "lr" in lines[0], result.stdout
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "o").exists()


def test_dtrain_console_script_help_and_bad_choice(runner):
    script = Path(sys.executable).parent / "dtrain"
    if not script.exists():
        pytest.skip("the dtrain console script is not installed in this environment")
    result = runner.run([str(script), "train", "--mode", "sideways"], timeout=60)
    assert result.returncode == 2, result.stdout
    assert result.stdout.startswith("dtrain: error:") and "--mode" in result.stdout
    assert "Traceback" not in result.stdout
