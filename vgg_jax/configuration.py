"""Experiment configs: load a config file, validate it, parse the config flags.

Every command (train, evaluate, localize, transfer) reads its config through
here, so none of them imports the trainer to read a config.

    load_config_file("configs/vgg16.py:384")     # get_config("384") of the file
    validate_config(config)                      # unknown fields, impossible values
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

import jax.numpy as jnp
import ml_collections

from vgg_jax import models

SCHEDULES = ("plateau", "step", "cosine", "constant")
INIT_MODES = ("same", "paper_a")
# Fields a config may carry beyond configs/default.py (read with config.get by other modules).
EXTRA_FIELDS = ("channel_order", "decode_crop", "description", "localization")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")


def load_config_file(path: str, hint: str = "") -> ml_collections.ConfigDict:
    """get_config([variant]) of a config file given as FILE.py[:variant].

    A missing file raises FileNotFoundError; `hint` ends its message (what to pass instead).
    """
    path, _, variant = path.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} not found{hint}.")
    name = "_vgg_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a config file is code the user chose to run
    return module.get_config(variant) if variant else module.get_config()


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py's get_config(): the list of valid fields."""
    return load_config_file(DEFAULT_CONFIG)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects unknown fields (naming the nearest valid one) and impossible values."""
    known = set(default_config().keys()) | set(EXTRA_FIELDS)
    for key in config.keys():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown config field {key!r}.{hint} Valid fields are those of configs/default.py."
            )
    models.get_spec(config.model)  # unknown model names raise with the valid names
    if config.initializer not in models.INITIALIZERS:
        raise ValueError(
            f"config.initializer={config.initializer!r}; choose one of {models.INITIALIZERS}."
        )
    if config.schedule not in SCHEDULES:
        raise ValueError(f"config.schedule={config.schedule!r}; choose one of {SCHEDULES}.")
    if config.init_from_mode not in INIT_MODES:
        raise ValueError(
            f"config.init_from_mode={config.init_from_mode!r}; choose one of {INIT_MODES}."
        )
    for key in ("batch_size", "num_epochs", "grad_accum_steps", "log_every_steps"):
        if int(config[key]) < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not a multiple of "
            f"config.grad_accum_steps={config.grad_accum_steps}."
        )
    if not config.learning_rate > 0:
        raise ValueError(f"config.learning_rate must be positive, got {config.learning_rate}.")
    for key in ("dtype", "param_dtype"):
        try:
            jnp.dtype(config[key])
        except TypeError as e:
            raise ValueError(f"config.{key}={config[key]!r} is not a dtype name.") from e


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (app.run's flags_parser) that turns config errors into one clear line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        message = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
        sys.exit(f"Bad command line: {message}")
