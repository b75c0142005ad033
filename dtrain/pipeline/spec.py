"""The pipeline file: stages in order, each a dtrain training config, optionally built on earlier stages.

```yaml
output_dir: runs/my_pipeline      # optional; default runs/<file name without extension>
defaults:                         # optional: config keys every stage starts from
  task: regression
stages:                           # in the order they run (a mapping, or a list of {name: ...})
  pretrain:
    max_steps: 200
  finetune:
    config: finetune.yaml         # optional: a `--config` file, relative to the pipeline file
    init_from: pretrain:best      # STAGE:best or STAGE:latest (or a path), implies depends_on
    lr: 0.0003
  report:
    depends_on: [finetune]
```

A stage's config is, lowest first: dtrain defaults < `--quick` presets < `defaults` < its `config` file < its
own keys. `output_dir`, `resume` and `overwrite` belong to the pipeline: each stage trains in
OUTPUT_DIR/<stage>, and `dtrain pipeline run` decides whether it starts fresh or resumes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtrain.config import Config, build_config, flatten_config_dict, read_config_file
from dtrain.errors import UsageError

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STAGE_KEYS = {"name", "config", "depends_on"}  # stage keys that are not training config fields
PIPELINE_OWNED = {"output_dir", "checkpoint_dir", "resume", "overwrite"}  # checkpoints: OUTPUT_DIR/<stage>
TOP_LEVEL_KEYS = {"output_dir", "defaults", "stages"}
INIT_WHICH = ("best", "latest")
# Config fields that do not change what a stage computes: editing them does not make its outputs stale.
NOT_RESULT_SHAPING = {"output_dir", "resume", "overwrite", "quick", "device", "num_workers", "async_save",
                      "log_with", "verify_checksums", "allow_config_change", "signal_grace_seconds"}


@dataclass(frozen=True)
class InitRef:
    """`init_from: STAGE:best|latest`: start from the weights of an earlier stage's checkpoint."""

    stage: str
    which: str

    def __str__(self) -> str:
        return f"{self.stage}:{self.which}"


@dataclass
class Stage:
    name: str
    values: dict[str, Any]  # flat config values, without init_from when it names a stage
    depends_on: list[str]  # direct dependencies, the init_from stage included
    init_ref: InitRef | None
    output_dir: Path
    config_hash: str = ""

    def config(self, init_from: str | None = None, resume: str = "none") -> Config:
        """The stage's training config, with the checkpoint `init_from` resolves to and how to start."""
        values = {**self.values, "output_dir": str(self.output_dir), "resume": resume}
        if init_from is not None:
            values["init_from"] = init_from
        return build_config(values)


@dataclass
class Pipeline:
    path: Path
    output_dir: Path
    stages: list[Stage] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def state_file(self) -> Path:
        return self.output_dir / "pipeline_state.json"

    def stage(self, name: str, option: str = "stage") -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UsageError(f"invalid value for {option}: {name!r}; accepted: {', '.join(self.names)}")

    def upstream(self, name: str) -> set[str]:
        """Every stage `name` depends on, directly or through others."""
        found: set[str] = set()
        todo = list(self.stage(name).depends_on)
        while todo:
            dep = todo.pop()
            if dep not in found:
                found.add(dep)
                todo.extend(self.stage(dep).depends_on)
        return found

    def downstream(self, name: str) -> set[str]:
        """Every stage that depends on `name`, directly or through others."""
        return {s.name for s in self.stages if name in self.upstream(s.name)}


def load_pipeline(path: str | Path, output_dir: str | None = None) -> Pipeline:
    """Reads and validates a pipeline file; every stage's config is checked before anything runs."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read pipeline file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"pipeline file {path} is not valid YAML: {exc}") from None
    where = f"pipeline file {path}"
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a mapping with a 'stages' key")
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise UsageError(f"unknown key '{sorted(unknown)[0]}' in {where}; accepted: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    out = Path(output_dir or data.get("output_dir") or Path("runs") / path.stem)
    defaults = _config_values(data.get("defaults") or {}, f"{where}, 'defaults'")
    pipeline = Pipeline(path.resolve(), out)
    for name, raw in _stage_entries(data.get("stages"), where):
        pipeline.stages.append(_parse_stage(name, raw, defaults, pipeline, where))
    return pipeline


def _stage_entries(stages: Any, where: str) -> list[tuple[str, dict]]:
    if isinstance(stages, dict):
        entries = [(str(name), raw if raw is not None else {}) for name, raw in stages.items()]
    elif isinstance(stages, list):
        entries = []
        for i, raw in enumerate(stages):
            if not isinstance(raw, dict) or "name" not in raw:
                raise UsageError(f"{where}: stages[{i}] needs a 'name' (or write stages as a mapping name: config)")
            entries.append((str(raw["name"]), raw))
    else:
        raise UsageError(f"{where}: 'stages' is required; accepted: a mapping of stage name to config, or a list")
    if not entries:
        raise UsageError(f"{where}: 'stages' is empty; accepted: at least one stage")
    return entries


def _parse_stage(name: str, raw: Any, defaults: dict[str, Any], pipeline: Pipeline, where: str) -> Stage:
    if not STAGE_NAME.match(name):
        raise UsageError(f"{where}: invalid stage name {name!r}; accepted: letters, digits, '_', '.', '-' "
                         f"(it names the stage's folder)")
    if name in pipeline.names:
        raise UsageError(f"{where}: stage {name!r} appears twice; accepted: unique stage names")
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: stage {name!r} must be a mapping of config keys")
    where = f"{where}, stage {name!r}"
    values = dict(defaults)
    if raw.get("config"):
        config_file = Path(str(raw["config"]))
        values.update(read_config_file(config_file if config_file.is_absolute() else pipeline.path.parent / config_file))
    values.update(_config_values({k: v for k, v in raw.items() if k not in STAGE_KEYS}, where))
    owned = sorted(PIPELINE_OWNED & set(values))
    if owned:
        raise UsageError(f"{where}: '{owned[0]}' is set by the pipeline (each stage trains in OUTPUT_DIR/<stage>; "
                         f"`dtrain pipeline run --resume/--fresh/--from` decide how it starts); remove it")
    depends_on = _depends_on(raw.get("depends_on"), pipeline, where)
    init_ref = _init_ref(values.get("init_from"), pipeline, where)
    if init_ref is not None:
        values.pop("init_from")
        if init_ref.stage not in depends_on:
            depends_on.append(init_ref.stage)
    stage = Stage(name, values, depends_on, init_ref, pipeline.output_dir / name)
    # Validates the config now, with the reference standing in for the checkpoint it will resolve to.
    stage.config_hash = config_hash(stage.config(init_from=str(init_ref) if init_ref else None))
    return stage


def _config_values(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where} must be a mapping of config keys")
    return flatten_config_dict(raw, source=where)


def _depends_on(raw: Any, pipeline: Pipeline, where: str) -> list[str]:
    names = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list):
        raise UsageError(f"{where}: invalid value for depends_on: {raw!r}; accepted: a stage name or a list of them")
    for dep in names:
        if str(dep) not in pipeline.names:
            raise UsageError(f"{where}: invalid value for depends_on: {dep!r}; accepted: an earlier stage "
                             f"({', '.join(pipeline.names) or 'none before this one'})")
    return [str(d) for d in names]


def _init_ref(value: Any, pipeline: Pipeline, where: str) -> InitRef | None:
    """`STAGE:best|latest` for an earlier stage; anything else is a path that training itself checks."""
    if not isinstance(value, str):
        return None
    stage, sep, which = value.rpartition(":")
    if value in pipeline.names or (sep and stage in pipeline.names and which not in INIT_WHICH):
        raise UsageError(f"{where}: invalid value for init_from: {value!r}; accepted: "
                         f"{value.split(':')[0]}:best or {value.split(':')[0]}:latest")
    if sep and which in INIT_WHICH:
        if stage not in pipeline.names:
            raise UsageError(f"{where}: invalid value for init_from: {value!r}; accepted: STAGE:best or "
                             f"STAGE:latest with an earlier stage ({', '.join(pipeline.names) or 'none before this one'})")
        return InitRef(stage, which)
    return None


def config_hash(config: Config) -> str:
    """Identifies what a stage computes: its config without the fields that do not change results."""
    flat = {k: v for k, v in config.flat().items() if k not in NOT_RESULT_SHAPING}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]
