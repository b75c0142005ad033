"""Run configuration: small validated dataclasses per concern, from defaults, presets, a file and flags."""

from dtrain.config.building import (FIELDS, add_config_flags, build_config, config_from_args,  # noqa: F401
                                    config_from_dict, flatten_config_dict, read_config_file, write_config)
from dtrain.config.sections import (ALGORITHMS_ACCEPTED, BUILTIN_TASKS, HF_ONLY_FIELDS, QUICK_PRESET,  # noqa: F401
                                    SECTIONS, TOP_LEVEL_FIELDS, CheckpointConfig, Config, EvalConfig, TaskConfig,
                                    TrainConfig, task_short_name)
