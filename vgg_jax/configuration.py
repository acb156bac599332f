"""Experiment configs: load, validate, explain, and check a resumed run's config.

Every command (train, evaluate, localize, transfer) reads its config through
here, so none of them imports the trainer to read a config.

    config = load_config_file("configs/vgg16.py:384")  # get_config("384") of the file
    validate_config(config)                            # classification fields
    validate_config(config, task="localization")       # plus config.localization's schema
    check_resume(stored_config_json_dict, config)      # refuses experiment changes on resume

The classification fields are those of configs/default.py. A task with fields
of its own keeps them in one block, `config.<task>`, whose schema (defaults and
value checks) the task registers with `register_schema`; the modules in
SCHEMA_MODULES register theirs when first needed. A new task plugs in there.

Config files form the package `configs/`, so an experiment file reads
`from configs import paper`; `load_config_file` and `parse_flags` (the
`--config` flag of `python -m vgg_jax.train`) put the config file's project
root on sys.path first, whatever the working directory.

    python -m vgg_jax.configuration configs/vgg16.py:384   # the resolved config, explained
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections

from vgg_jax import models

CLASSIFICATION = "classification"
SCHEDULES = ("plateau", "step", "cosine", "constant")
INIT_MODES = ("same", "paper_a")
# Fields a config may carry beyond configs/default.py and the registered task blocks
# (read with config.get by other modules).
EXTRA_FIELDS = ("channel_order", "decode_crop", "description")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(PROJECT_ROOT, "configs", "default.py")
CONFIG_PACKAGE = "configs"
# Modules that register a task's schema on import (see register_schema).
SCHEMA_MODULES = ("vgg_jax.localize_config",)

# Fields that may differ between a run's config.json and the config it is resumed with.
# Each changes how long the run goes, what it reports, how often it saves or where it
# runs, never what a training step computes from the restored state:
RESUMABLE_FIELDS = (
    # The run's length: raising it continues a finished run; lowering it stops earlier
    # (except with schedule="cosine", whose decay horizon is the length: LENGTH_FIELDS).
    "num_epochs",
    "max_steps",
    # Reporting: what is logged and shown, not what is trained.
    "log_every_steps",
    "progress_bar",
    "tensorboard",
    "description",
    # Cadence of evaluation and checkpoints: saved states are the same states; the
    # evaluation batch size only pads differently (masked), the figures are the same.
    "eval_every_epochs",
    "eval_batch_size",
    # The scales `vgg_jax.evaluate` tests at after training, and whether the trainer runs
    # it when done: no step reads them.
    "test_scales",
    "test_when_complete",
    "checkpoint_every_steps",
    "keep_checkpoints",
    # The divergence guard's threshold: when to stop, not what a step computes (raising
    # it lets a run that stopped on a harmless spike continue).
    "divergence_factor",
    # What to do with an undecodable image: skipping or stopping changes nothing a
    # step computes on decodable data.
    "bad_images",
    # Where the same data lives (another disk or machine after a preemption).
    "data_dir",
    "manual_dir",
    # Where the run executes: device count, mesh and multi-host settings (process_id
    # differs per process by design). A resume is bit-exact only on the same device
    # count; another one changes reductions at float rounding.
    "num_devices",
    "mesh_model_axis",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    # The explicit way out itself.
    "resume_override",
)
# Run-length fields that set the learning-rate schedule's horizon under these schedules.
LENGTH_FIELDS = ("num_epochs", "max_steps")
LENGTH_SCHEDULES = ("cosine",)
_ABSENT = object()


# ---------------------------------------------------------------------------
# Loading.


def project_root(path: str) -> str | None:
    """The directory holding the `configs` package nearest above `path`.

    A config file outside any checkout (e.g. /tmp/my.py) gets this package's own
    checkout, so it can still `from configs import default`.
    """
    here = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(here, CONFIG_PACKAGE, "__init__.py")):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    own = os.path.join(PROJECT_ROOT, CONFIG_PACKAGE, "__init__.py")
    return PROJECT_ROOT if os.path.isfile(own) else None


def use_config_package(path: str) -> None:
    """Makes `import configs` find the package beside the config file `path`."""
    root = project_root(path)
    if root is None:
        return
    package_dir = os.path.join(root, CONFIG_PACKAGE)
    loaded = sys.modules.get(CONFIG_PACKAGE)
    if loaded is not None and os.path.abspath(list(loaded.__path__)[0]) != package_dir:
        # Another checkout's configs were imported first: forget them, not mix the two.
        for name in [n for n in sys.modules if n.split(".")[0] == CONFIG_PACKAGE]:
            del sys.modules[name]
    if not sys.path or sys.path[0] != root:
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)


def load_config_module(path: str, hint: str = "") -> types.ModuleType:
    """The module of a config file (without any `:variant`), executed.

    A missing file raises FileNotFoundError; `hint` ends its message (what to pass instead).
    """
    path = path.partition(":")[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} not found{hint}.")
    use_config_package(path)
    name = "_vgg_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a config file is code the user chose to run
    return module


def load_config_file(path: str, hint: str = "") -> ml_collections.ConfigDict:
    """get_config([variant]) of a config file given as FILE.py[:variant].

    A missing file raises FileNotFoundError; `hint` ends its message (what to pass instead).
    """
    file, _, variant = path.partition(":")
    module = load_config_module(file, hint)
    return module.get_config(variant) if variant else module.get_config()


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py's get_config(): the classification fields and their defaults."""
    return load_config_file(DEFAULT_CONFIG)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (app.run's flags_parser) that turns config errors into one clear line.

    Before the flags are parsed (ml_collections executes `--config FILE` then), the
    config file's project root goes on sys.path, so `from configs import paper` works.
    """
    from absl import flags

    for path in _config_flag_values(argv):
        if os.path.isfile(path.partition(":")[0]):
            use_config_package(path)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        sys.exit(f"Bad command line: {_plain_message(e)}")


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def flags_parser(usage: str) -> Callable[[list[str]], list[str]]:
    """`parse_flags` that answers --help with `usage` and exit 0 (absl's own help exits 1
    and prints the module's docstring, written for developers)."""

    def parse(argv: list[str]) -> list[str]:
        if any(arg in HELP_FLAGS for arg in argv[1:]):
            print(usage.strip())
            sys.exit(0)
        return parse_flags(argv)

    return parse


def _plain_message(error: BaseException) -> str:
    """One line of an error's text; ml_collections wraps a KeyError in an AttributeError.

    str() of a KeyError is the repr of its message, escaped quotes included, so a
    KeyError's message is taken from its arguments.
    """
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    missing = isinstance(error, KeyError) and error.args  # a misspelt config field
    text = str(error.args[0] if missing else error).replace("\\n", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if missing and lines:
        lines[0] = f"no config field {lines[0]}."
    return " ".join(lines)


def _config_flag_values(argv: Sequence[str]) -> list[str]:
    """The values of --config FILE / --config=FILE in argv."""
    values = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(("--config=", "-config=")):
            values.append(arg.partition("=")[2])
    return values


# ---------------------------------------------------------------------------
# Task schemas.


@dataclasses.dataclass(frozen=True)
class Schema:
    """A task's own block of fields, `config.<name>`.

    defaults: every valid field of the block with its default value.
    validate: value checks of a whole config of this task (it may read any field).
    example: the config file to start from, named when the block is missing.
    resumable: the block's fields (short names) that may change on resume.
    """

    name: str
    defaults: Callable[[], ml_collections.ConfigDict]
    validate: Callable[[ml_collections.ConfigDict], None]
    example: str = ""
    resumable: tuple[str, ...] = ()


# The registered task schemas by name; add to it with register_schema.
SCHEMAS: dict[str, Schema] = {}


def register_schema(
    name: str,
    defaults: Callable[[], ml_collections.ConfigDict],
    validate: Callable[[ml_collections.ConfigDict], None],
    example: str = "",
    resumable: Sequence[str] = (),
) -> Schema:
    """Registers the task `name`, whose fields live in `config.<name>`."""
    if name == CLASSIFICATION or name in EXTRA_FIELDS or name in default_config():
        raise ValueError(f"{name!r} cannot name a task schema: it is a field or task already.")
    schema = Schema(name, defaults, validate, example, tuple(resumable))
    SCHEMAS[name] = schema
    return schema


def schemas() -> dict[str, Schema]:
    """The registered task schemas by name (importing SCHEMA_MODULES first)."""
    for module in SCHEMA_MODULES:
        importlib.import_module(module)
    return dict(SCHEMAS)


def tasks() -> tuple[str, ...]:
    return (CLASSIFICATION, *schemas())


def task_of(config: ml_collections.ConfigDict) -> str:
    """The task a config is for: the registered block it carries, else classification."""
    found = [name for name in schemas() if name in config]
    return found[0] if found else CLASSIFICATION


# ---------------------------------------------------------------------------
# Validation.


def _check_names(names: Sequence[str], known: Sequence[str], prefix: str, where: str) -> None:
    for key in names:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown config field {prefix + key!r}.{hint} Valid fields are {where}."
            )


def validate_config(config: ml_collections.ConfigDict, task: str = CLASSIFICATION) -> None:
    """Rejects unknown fields (naming the nearest valid one) and impossible values.

    task: "classification" (vgg_jax.train) checks the fields of configs/default.py;
    a registered task (e.g. task="localization", what vgg_jax.localize passes) also
    needs its block `config.<task>` and runs that schema's checks. Unknown fields
    inside any task block are refused too, whatever the task.
    """
    registered = schemas()
    if task != CLASSIFICATION and task not in registered:
        raise ValueError(f"Unknown task {task!r}; choose one of {tasks()}.")
    known = [*default_config().keys(), *EXTRA_FIELDS, *registered]
    _check_names(list(config.keys()), known, "", "those of configs/default.py")
    for name, schema in registered.items():
        block = config.get(name)
        if block is None:
            continue
        if not isinstance(block, Mapping | ml_collections.ConfigDict):
            raise ValueError(f"config.{name} must be a ConfigDict of fields, got {block!r}.")
        _check_names(
            list(block.keys()),
            list(schema.defaults().keys()),
            f"{name}.",
            f"those of the {name} schema",
        )
    _validate_classification(config)
    if task != CLASSIFICATION:
        schema = registered[task]
        if config.get(task) is None:
            start = f"; start from {schema.example}" if schema.example else ""
            raise ValueError(f"The config has no {task!r} field{start}.")
        schema.validate(config)


def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= low), f">= {low}"


# The values each number of the classification schema allows. Checked before a run starts,
# so a bad value is one line at once, not a ZeroDivisionError in the model, a failure at the
# first evaluation an epoch in, or a run that trains on nonsense (dropout 1.5, momentum 2).
NUMBER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{
        key: _at_least(1)
        for key in (
            "num_classes",
            "width_divisor",
            "fc_width",
            "batch_size",
            "eval_batch_size",
            "grad_accum_steps",
            "num_epochs",
            "log_every_steps",
            "eval_every_epochs",
            "checkpoint_every_steps",
            "keep_checkpoints",  # 0 would keep no checkpoint to resume from
            "mesh_model_axis",
            "shuffle_buffer",
        )
    },
    **{
        key: _at_least(0)
        for key in (
            "seed",
            "max_steps",
            "num_devices",
            "weight_decay",
            "color_shift",
            "warmup_epochs",
            "plateau_patience",
            "plateau_max_reductions",
        )
    },
    "dropout_rate": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "momentum": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "plateau_factor": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "step_factor": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "step_epochs": ((lambda v: v > 0), "> 0"),
    "value_range": ((lambda v: v > 0), "> 0"),
    "divergence_factor": ((lambda v: v == 0 or v > 1), "0 (off) or > 1"),
}


def check_scales(config: ml_collections.ConfigDict) -> None:
    """The training crop fits every scale: image_size <= S_min <= S_max, and every Q."""
    size, lo, hi = config.image_size, config.train_scale_min, config.train_scale_max
    if not size <= lo <= hi:
        raise ValueError(
            f"Need image_size <= train_scale_min <= train_scale_max, got {size}, {lo}, {hi}."
        )
    for key in ("eval_scale", "train_eval_scales", "test_scales"):
        scales = config[key] if isinstance(config[key], Sequence) else (config[key],)
        if any(q < size for q in scales):
            raise ValueError(
                f"config.{key}={config[key]!r}: every scale Q must be >= the training crop "
                f"image_size={size}."
            )


def _validate_classification(config: ml_collections.ConfigDict) -> None:
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
    for key, (allowed, wording) in NUMBER_RANGES.items():
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not allowed(value):
            raise ValueError(f"config.{key} must be {wording}, got {value!r}.")
    check_scales(config)
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


# ---------------------------------------------------------------------------
# Resume compatibility.


def as_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The config as config.json holds it (tuples become lists, odd values strings)."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(tree, default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} for a nested dict (dotted field names)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def default_values() -> dict[str, Any]:
    """Every known field's default, dotted names, as config.json would hold them."""
    tree = as_json(default_config())
    for name, schema in schemas().items():
        tree[name] = as_json(schema.defaults())
    return flatten(tree)


def resumable_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> tuple[str, ...]:
    """RESUMABLE_FIELDS and the task blocks' resumable fields, for this config's schedule."""
    fields = list(RESUMABLE_FIELDS)
    if config.get("schedule") in LENGTH_SCHEDULES:
        fields = [f for f in fields if f not in LENGTH_FIELDS]
    for name, schema in schemas().items():
        fields += [f"{name}.{field}" for field in schema.resumable]
    return tuple(fields)


def config_differences(
    stored: Mapping[str, Any], new: ml_collections.ConfigDict | Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (stored value, new value)} where the two configs differ.

    Both sides go through the same JSON round trip. A field missing on one side
    while the other holds its default (a field added to the schema since the run
    was stored) is no difference; a missing block (config.localization) is.
    """
    old, cur = flatten(as_json(stored)), flatten(as_json(new))
    defaults = default_values()
    blocks_old = {k.rpartition(".")[0] for k in old}
    blocks_new = {k.rpartition(".")[0] for k in cur}
    diffs = {}
    for key in sorted(set(old) | set(cur)):
        a, b = old.get(key, _ABSENT), cur.get(key, _ABSENT)
        block = key.rpartition(".")[0]
        if a is _ABSENT and block in blocks_old:
            a = defaults.get(key, _ABSENT)
        if b is _ABSENT and block in blocks_new:
            b = defaults.get(key, _ABSENT)
        if a != b:
            diffs[key] = (a, b)
    return diffs


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def check_resume(
    stored: Mapping[str, Any],
    new: ml_collections.ConfigDict,
    workdir: str = "the workdir",
) -> list[str]:
    """Checks that a run may resume with `new`; `stored` is its config.json (a dict).

    Returns the differences it accepts ("field: old -> new"; empty when none), which
    the caller reports and then records by rewriting config.json. Raises ValueError,
    one line naming each other differing field (old -> new) and the way out, unless
    `new.resume_override` is set: then every difference is accepted and returned.

    The trainer calls it on every process when a checkpoint exists, before restoring:

        changes = configuration.check_resume(
            checkpoints.read_run_config(workdir), config, workdir)  # ValueError: refused
        if changes and parallel.is_main_process():
            save_config(config, workdir)  # config.json describes the run as it goes on
            say("Resuming with " + "; ".join(changes))
    """
    diffs = config_differences(stored, new)
    lines = {k: f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in diffs.items()}
    if new.get("resume_override", False):
        return list(lines.values())
    allowed = set(resumable_fields(stored)) & set(resumable_fields(new))
    refused = [line for k, line in lines.items() if k not in allowed]
    if refused:
        length = ""
        if any(k in LENGTH_FIELDS for k in diffs) and new.get("schedule") in LENGTH_SCHEDULES:
            length = f" (with schedule={new.get('schedule')!r} the run's length sets the decay)"
        raise ValueError(
            f"The config differs from the run in {workdir} (its config.json) in fields that "
            f"cannot change on resume{length}: {'; '.join(refused)}. Use a new --workdir for "
            "a new experiment, or pass --config.resume_override=True to continue this run "
            "with the new config (config.json is then rewritten)."
        )
    return list(lines.values())


# ---------------------------------------------------------------------------
# Explaining a config.


def explain(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """One line per field (names after `prefix`), `*` marking those not at their default."""
    defaults = default_values()
    lines = []
    for key, value in flatten(as_json(config)).items():
        mark = "*" if defaults.get(key, _ABSENT) != value else " "
        lines.append(f"{mark} {prefix}{key} = {value!r}")
    return lines


def _training_parts(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """(prefix, training config) pairs: the config itself, or its nested training configs
    (an experiment such as configs/transfer_fashion_mnist.py holds one in `source`)."""
    if "model" in config:
        return [("", config)]
    return [
        (f"{key}.", value)
        for key, value in config.items()
        if isinstance(value, ml_collections.ConfigDict) and "model" in value
    ]


def describe(config: ml_collections.ConfigDict) -> list[str]:
    """The resolved config as lines: its training parts explained, other fields as they are."""
    parts = _training_parts(config)
    lines = []
    for prefix, part in parts:
        name = prefix.rstrip(".") or "config"
        lines.append(f"# {name}: task {task_of(part)}; * marks a field that is not the default")
        lines += explain(part, prefix)
    if parts != [("", config)]:
        lines.append("# other fields")
        for key, value in flatten(as_json(config)).items():
            if not any(key.startswith(prefix) for prefix, _ in parts):
                lines.append(f"  {key} = {value!r}")
    return lines


def check_file(config: ml_collections.ConfigDict) -> None:
    """validate_config on each training part of a loaded config file (ValueError if bad)."""
    parts = _training_parts(config)
    if not parts:
        raise ValueError("it holds no training config (no 'model' field).")
    for prefix, part in parts:
        try:
            validate_config(part, task_of(part))
        except ValueError as e:
            raise ValueError(f"config.{prefix.rstrip('.')}: {e}" if prefix else str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """python -m vgg_jax.configuration FILE.py[:variant]: prints and checks a config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m vgg_jax.configuration FILE.py[:variant]"
    if argv in (["-h"], ["--help"]):
        print(usage)
        print("Prints the config (* marks non-defaults) and checks it: exit 1 if invalid.")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(usage, file=sys.stderr)
        return 2
    try:
        config = load_config_file(argv[0])
        print("\n".join(describe(config)))
        check_file(config)
    except (FileNotFoundError, ValueError) as e:
        print(f"Error: {argv[0]}: {e}", file=sys.stderr)
        return 1
    print(f"# {argv[0]}: valid")
    return 0


if __name__ == "__main__":
    # The package's own copy of this module, not this __main__ one: task modules register
    # their config blocks (`localization`, ...) there.
    from vgg_jax import cli, configuration

    cli.run(configuration.main)  # a config file's syntax error etc.: one line, not a traceback
