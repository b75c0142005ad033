"""Building a Config, and config.yaml written back.

Precedence, lowest first: dataclass defaults < `--quick` presets < `--config FILE` < command-line flags.
Every field has a flag named after it (`keep_last` -> `--keep-last`). Config files may be flat
(`lr: 0.001`) or grouped by section (`train: {lr: 0.001}`), and unknown keys are errors. YAML is read with
`safe_load`: a Python tag (`!!python/object/apply:...`) is an error, never a call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from dtrain.config.sections import QUICK_PRESET, SECTIONS, TOP_LEVEL_FIELDS, Config
from dtrain.errors import UsageError


def _field_index() -> dict[str, tuple[str | None, dataclasses.Field, type]]:
    """Map of field name -> (section or None, field, python type)."""
    index: dict[str, tuple[str | None, Any, type]] = {}
    top_hints = get_type_hints(Config)
    for name in TOP_LEVEL_FIELDS:
        index[name] = (None, next(f for f in fields(Config) if f.name == name), top_hints[name])
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            index[f.name] = (section, f, hints[f.name])
    return index


FIELDS = _field_index()


def _base_type(tp: Any) -> type:
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    return args[0] if args else tp


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(name: str, value: Any) -> Any:
    """Converts a value from a file or flag to the field's type, with a clear error."""
    _, f, tp = FIELDS[name]
    base = _base_type(tp)
    if value is None:
        if type(None) in getattr(tp, "__args__", ()):
            return None
        raise UsageError(f"invalid value for {name}: null; accepted: {_TYPE_WORDS.get(base, base.__name__)}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        value = str(value)
    except (TypeError, ValueError):
        accepted = _TYPE_WORDS.get(base, base.__name__)
        raise UsageError(f"invalid value for {name}: {value!r}; accepted: {accepted}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UsageError(f"invalid value for {name}: {value!r}; accepted: {', '.join(choices)}")
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a YAML or JSON config file into a flat {field: value} dict, rejecting unknown keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise UsageError(f"config file {path} is not valid {kind}: {' '.join(str(exc).split())}") from None
    return flatten_config_dict(data or {}, source=str(path))


def flatten_config_dict(data: Any, source: str = "config") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UsageError(f"{source} must hold a mapping of field names to values")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                sub_key = str(sub_key).replace("-", "_")
                if FIELDS.get(sub_key, (None,))[0] != key:
                    raise UsageError(f"unknown key '{key}.{sub_key}' in {source}; "
                                     f"accepted in '{key}': {', '.join(f.name for f in fields(SECTIONS[key]))}")
                flat[sub_key] = sub_value
        elif key in FIELDS:
            flat[key] = value
        else:
            raise UsageError(f"unknown key '{key}' in {source}; accepted: {', '.join(sorted(FIELDS))}")
    return flat


def build_config(file_values: dict[str, Any] | None = None, flag_values: dict[str, Any] | None = None) -> Config:
    """Resolves defaults < quick preset < file < flags into a validated Config."""
    merged: dict[str, Any] = dict(file_values or {})
    merged.update(flag_values or {})
    quick = _coerce("quick", merged.get("quick", False))
    values = {**(QUICK_PRESET if quick else {}), **merged}
    config = Config()
    for name, raw in values.items():
        section, _, _ = FIELDS[name]
        target = config if section is None else getattr(config, section)
        setattr(target, name, _coerce(name, raw))
    return config.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a Config from `Config.to_dict()` output (e.g. a saved config.yaml)."""
    return build_config(flatten_config_dict(data))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --config and one flag per config field. Flags default to None so we can tell what was given."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file setting any field; flags win over it")
    groups = {None: parser.add_argument_group("run")}
    for section in SECTIONS:
        groups[section] = parser.add_argument_group(section)
    for name, (section, f, tp) in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        help_text = TOP_LEVEL_FIELDS.get(name) or f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        group = groups[section]
        if _base_type(tp) is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} (default: {default})")
        else:
            choices = f.metadata.get("choices")
            group.add_argument(flag, dest=name, default=None, metavar=_base_type(tp).__name__.upper(),
                               choices=choices, help=f"{help_text} (default: {default})")


def config_from_args(args: argparse.Namespace) -> Config:
    file_values = read_config_file(args.config) if args.config else {}
    flag_values = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    return build_config(file_values, flag_values)


def write_config(config: Config, path: Path) -> None:
    """config.yaml, with the credentials of any URI in it masked (the run keeps them in memory only)."""
    from dtrain.redact import redact_values
    from dtrain.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(redact_values(config.to_dict()), sort_keys=False))
