"""Loading a checkpoint runs no code from it: every pickle of a checkpoint, registered objects' files included, is
read with weights_only=True (plain data only). A crafted payload in every such file, with a recomputed manifest,
creates nothing on resume, eval, export, the ckpt tools and verify-resume's comparison; the resume skips the
checkpoint (`latest`) or refuses it (an explicit path). A static check keeps new unpickling out of dtrain/.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, reset_accelerate, train_cmd
from dtrain.checkpoint.layout import step_dir_name, write_manifest
from dtrain.errors import CheckpointError, UsageError

ARGS = ["--task", "regression", "--batch-size", "8", "--n-layer", "1", "--n-embd", "8", "--max-steps", "4",
        "--save-every-steps", "2", "--keep-last", "5", "--eval-every-steps", "0", "--log-every-steps", "2",
        "--save-every-seconds", "0"]
NEWEST, PREVIOUS = step_dir_name(4), step_dir_name(2)
# Every pickle (torch.save) file a 1-process CPU checkpoint with one registered object holds.
PICKLE_FILES = ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")
NOT_PICKLES = ("model.safetensors", "trainer_state.json", "manifest.json")


class MakesDirectory:
    """Unpickling this calls os.mkdir(path): what a crafted checkpoint file would do to the host."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


class Counter:
    """A user's stateful object registered with `accelerator.register_for_checkpointing`."""

    def __init__(self, calls: int = 0):
        self.calls, self.seen = calls, torch.zeros(2)

    def state_dict(self) -> dict:
        return {"calls": self.calls, "seen": self.seen, "history": [1, 2]}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.seen = state["calls"], state["seen"].clone()


def train_with_counter(out: Path, counter: Counter, *extra: str) -> int:
    """A real dtrain training in this process, with `counter` registered on its Accelerator. Returns its step."""
    from accelerate.utils import set_seed

    from dtrain.commands.train import build_parser
    from dtrain.config import config_from_args
    from dtrain.tasks import build_task
    from dtrain.training.runtime import make_accelerator
    from dtrain.training.trainer import Trainer

    reset_accelerate()
    try:
        config = config_from_args(build_parser().parse_args([*ARGS, "--output-dir", str(out), *extra]))
        accelerator = make_accelerator(config)
        set_seed(config.train.seed)
        accelerator.register_for_checkpointing(counter)
        trainer = Trainer(config, build_task(config.task, config.train.seed), accelerator=accelerator)
        return trainer.fit().global_step
    finally:
        reset_accelerate()


def craft(checkpoint: Path, names, marker: Path) -> None:
    """Replaces each named file with a payload that creates `marker` when unpickled; recomputes the manifest."""
    for name in names:
        torch.save(MakesDirectory(marker), checkpoint / name)
    write_manifest(checkpoint, int(checkpoint.name.split("_")[1]))


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    assert train_with_counter(out, Counter(calls=7)) == 4
    return out


def test_the_payload_runs_code_when_unpickled_without_weights_only(tmp_path):
    """The check below is only worth something if the payload is live."""
    marker = tmp_path / "marker"
    torch.save(MakesDirectory(marker), tmp_path / "payload.bin")
    torch.load(tmp_path / "payload.bin", weights_only=False)
    assert marker.is_dir()


def test_a_checkpoint_with_a_registered_object_holds_these_pickles(run):
    """PICKLE_FILES is every file the tests below craft: a new kind of pickle in a checkpoint must be added."""
    names = {p.name for p in (run / "checkpoints" / NEWEST).iterdir()}
    assert names == {*PICKLE_FILES, *NOT_PICKLES}


@pytest.mark.parametrize("crafted", [*[(name,) for name in PICKLE_FILES], PICKLE_FILES],
                         ids=[*PICKLE_FILES, "every-pickle"])
def test_a_crafted_pickle_runs_nothing_and_latest_resumes_the_previous_checkpoint(run, tmp_path, caplog, crafted):
    marker = tmp_path / "marker"
    craft(run / "checkpoints" / NEWEST, crafted, marker)
    restored = Counter()
    with caplog.at_level(logging.WARNING):
        assert train_with_counter(run, restored, "--resume", "latest") == 4
    assert not marker.exists()
    skipped = [r.getMessage() for r in caplog.records if f"skipping checkpoint {NEWEST}" in r.getMessage()]
    assert len(skipped) == 1 and "refused by weights_only" in skipped[0], caplog.text
    assert restored.calls == 7 and torch.equal(restored.seen, torch.zeros(2))  # from PREVIOUS, weights_only


def test_registered_objects_are_restored_from_an_intact_checkpoint(run):
    restored = Counter()
    assert train_with_counter(run, restored, "--resume", str(run / "checkpoints" / PREVIOUS)) == 4
    assert restored.calls == 7


def test_an_explicit_crafted_checkpoint_is_refused_without_running_it(run, tmp_path, runner):
    marker, checkpoint = tmp_path / "marker", run / "checkpoints" / NEWEST
    craft(checkpoint, PICKLE_FILES, marker)
    with pytest.raises(UsageError, match=f"{checkpoint} cannot be loaded .*refused by weights_only"):
        train_with_counter(run, Counter(), "--resume", str(checkpoint))
    # The command line (no registered object: the extra file alone refuses it): exit 2, one line.
    result = runner.run(train_cmd(*ARGS, "--output-dir", str(run), "--resume", str(checkpoint)), timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "cannot be loaded" in errors[0] and "Traceback" not in result.stdout
    assert not marker.exists()


def test_eval_export_and_ckpt_tools_on_a_crafted_checkpoint_run_nothing(run, tmp_path, capsys):
    from dtrain.commands.cli import main

    marker, checkpoint = tmp_path / "marker", run / "checkpoints" / NEWEST
    craft(checkpoint, PICKLE_FILES, marker)
    # They read the weights (safetensors) and trainer_state.json, never a pickle: they work, and run nothing.
    assert main(["eval", str(checkpoint), "--max-batches", "1"]) == 0
    assert main(["ckpt", "export", str(checkpoint), "--out", str(tmp_path / "model.safetensors")]) == 0
    for tool in ("verify", "show"):
        assert main(["ckpt", tool, str(checkpoint)]) == 0
    assert not marker.exists()


def test_verify_resume_compares_checkpoints_without_running_them(run, tmp_path):
    from dtrain.commands.verify_resume import compare_checkpoints

    marker, checkpoint = tmp_path / "marker", run / "checkpoints" / NEWEST
    craft(checkpoint, PICKLE_FILES, marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        compare_checkpoints(checkpoint, checkpoint)
    assert not marker.exists()


def test_a_registered_object_whose_state_would_not_load_fails_the_first_save(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from dtrain.checkpoint import CheckpointManager

    class Unloadable(Counter):
        def state_dict(self) -> dict:
            return {"calls": self.calls, "owner": MakesDirectory(tmp_path / "never")}

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 1), torch.optim.SGD([torch.nn.Parameter(
        torch.zeros(1))], lr=0.1))
    accelerator.register_for_checkpointing(Unloadable())
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="registered object 0 .*weights_only"):
        manager.save(1, {"global_step": 1})
    assert not (tmp_path / "checkpoints" / step_dir_name(1)).exists()


# ------------------------------------------------------------------------------------------- static check

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "joblib", "shelve"}
# (file, what): the restricted unpickler of DCP metadata; the one load_state call, which hides registered objects.
ALLOWED = {("dtrain/checkpoint/sharded.py", "pickle.Unpickler"), ("dtrain/checkpoint/loading.py", "load_state")}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, what) for each way `source` could unpickle with code execution: torch.load without
    weights_only=True, pickle-like load/loads/Unpickler, weights_only=False, allow_pickle=True, and Accelerate's
    load_state / load_custom_state (they unpickle registered objects with weights_only=False)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found = set()
    for node in ast.walk(tree):
        name = _dotted(node, aliases) if isinstance(node, (ast.Attribute, ast.Name)) else None
        if name:
            module, _, attr = name.rpartition(".")
            if module.split(".")[0] in UNPICKLING_MODULES and attr in ("load", "loads", "Unpickler"):
                found.add((node.lineno, f"{module.split('.')[0]}.{attr}"))
            if attr in ("load_state", "load_custom_state"):
                found.add((node.lineno, attr))
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        flag = lambda key, value: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is value  # noqa: E731
        if _dotted(node.func, aliases) in ("torch.load", "torch.serialization.load") and not flag("weights_only", True):
            found.add((node.lineno, "torch.load without weights_only=True"))
        if flag("weights_only", False):
            found.add((node.lineno, "weights_only=False"))
        if flag("allow_pickle", True):
            found.add((node.lineno, "allow_pickle=True"))
    return sorted(found)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(f)",
    "import torch\ntorch.load(f, map_location='cpu', weights_only=False)",
    "import pickle\npickle.loads(b)",
    "import pickle as p\np.load(f)",
    "from pickle import loads\nloads(b)",
    "import pickle\nclass U(pickle.Unpickler): pass",
    "from accelerate.utils import load\nload(f, weights_only=False)",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
    "accelerator.load_state(str(path))",
    "from accelerate.checkpointing import load_custom_state\nload_custom_state(obj, path, 0)",
])
def test_the_static_check_finds_unpickling(source):
    assert unsafe_loads(source)


def test_the_static_check_lets_plain_data_loads_pass():
    assert not unsafe_loads("import torch, json, yaml\ntorch.load(f, weights_only=True)\njson.loads(s)\n"
                            "yaml.safe_load(s)\nfrom accelerate.utils import load\nload(f)")


def test_dtrain_unpickles_nothing_outside_the_allowed_places():
    found = []
    for file in sorted((REPO / "dtrain").rglob("*.py")):
        relative = str(file.relative_to(REPO))
        found += [f"{relative}:{line}: {what}" for line, what in unsafe_loads(file.read_text())
                  if (relative, what) not in ALLOWED]
    assert not found, "unpickling that could run a checkpoint's code:\n" + "\n".join(found)
