"""Saved models: a VGG's variables plus what is needed to use them.

A *model bundle* is a directory holding

* `vgg_jax_model.json`: the `create_model` arguments and the input
  preprocessing (channel order, value range, mean, std), and
* `variables/`: an orbax checkpoint of `{'params': ..., 'batch_stats': ...}`,
  with the size and sha256 of each of its files (checked before every load).

Bundles are what `convert` writes and what `evaluate`, `predict`,
`score_map` and fine-tuning (`config.init_from`) read. No pickle is involved:
orbax stores arrays in tensorstore and the metadata is JSON.

A *training run's workdir* holds config.json, checkpoints/ (training states)
and best/ (the best evaluation's variables); each finalized step carries the
checksums of its files, and readers fall back past damaged steps (see the
section below and docs/robustness.md). The module is over 600 lines because it
is one idea: what is saved on disk, and how it is read back and trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vgg_jax import fileio, models

BUNDLE_FILE = "vgg_jax_model.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels in [0, 1] become network input.

    `x = (pixels[..., order] * value_range - mean) / std`, with `order`
    reversing channels for BGR-trained networks (Keras/Caffe weights).
    """

    channel_order: str = "RGB"
    value_range: float = 255.0
    mean: tuple[float, ...] = (123.68, 116.779, 103.939)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}.")

    def __call__(self, pixels: jax.Array | np.ndarray) -> jax.Array:
        """Normalises NHWC pixels in [0, 1] (RGB, or 1 channel) for the network."""
        x = jnp.asarray(pixels, jnp.float32)
        if self.channel_order == "BGR" and x.shape[-1] == 3:
            x = x[..., ::-1]
        channels = x.shape[-1]
        mean = jnp.asarray(self.mean[:channels], jnp.float32)
        std = jnp.asarray(self.std[:channels], jnp.float32)
        return (x * self.value_range - mean) / std

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Preprocessing:
        """The preprocessing a training config's input pipeline applies.

        `config` is a ConfigDict or a plain mapping (a run's config.json read back).
        """
        return cls(
            channel_order=config.get("channel_order", "RGB"),
            value_range=float(config["value_range"]),
            mean=tuple(float(v) for v in np.ravel(config["mean_rgb"])),
            std=tuple(float(v) for v in np.ravel(config["std_rgb"])),
        )


@dataclasses.dataclass
class ModelBundle:
    """A model, its variables and its preprocessing, ready to apply."""

    name: str
    options: dict[str, Any]
    variables: dict[str, Any]
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> models.VGG:
        return models.create_model(self.name, **self.options)

    @property
    def image_size(self) -> int:
        return int(self.options.get("image_size", 224))

    @property
    def num_classes(self) -> int:
        return int(self.options.get("num_classes", 1000))


def model_options_from_config(config: Any) -> dict[str, Any]:
    """The `create_model` keyword arguments a training config describes."""
    return {
        "num_classes": int(config.num_classes),
        "width_divisor": int(config.width_divisor),
        "fc_width": int(config.fc_width),
        "dropout_rate": float(config.dropout_rate),
        "image_size": int(config.image_size),
        "dtype": str(config.dtype),
        "param_dtype": str(config.param_dtype),
        "initializer": str(config.initializer),
    }


def _json_ready(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (str(jnp.dtype(v)) if k in ("dtype", "param_dtype") else v) for k, v in options.items()
    }


def save_bundle(path: str | os.PathLike, bundle: ModelBundle) -> str:
    """Writes a bundle directory (overwriting one that is there); returns its path."""
    path = fileio.absolute(path)
    fileio.makedirs(path)
    variables = {k: v for k, v in bundle.variables.items() if k in ("params", "batch_stats")}
    variables = jax.tree.map(np.asarray, variables)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(fileio.join(path, VARIABLES_DIR), variables, force=True)
    checkpointer.wait_until_finished()
    # Checked before every load: orbax would read a damaged file silently or fail inside
    # tensorstore, whose other reads then print "Event loop is closed" as they finish.
    # Recorded by the process that wrote the files (orbax's primary; the others' saves of a
    # multi-process run write nothing there).
    if jax.process_index() == 0:
        record_checksums(fileio.join(path, VARIABLES_DIR))
    meta = {
        "format_version": FORMAT_VERSION,
        "model": bundle.name,
        "options": _json_ready(bundle.options),
        "preprocessing": dataclasses.asdict(bundle.preprocessing),
        "metadata": bundle.metadata,
    }
    # Written last: a bundle without its JSON is never taken for a complete one.
    fileio.write_text_atomic(fileio.join(path, BUNDLE_FILE), json.dumps(meta, indent=2))
    return path


def is_bundle(path: str | os.PathLike) -> bool:
    return fileio.isfile(fileio.join(path, BUNDLE_FILE))


def is_run(path: str | os.PathLike) -> bool:
    """A training run's workdir: it holds the run's config.json."""
    return fileio.isfile(fileio.join(path, CONFIG_FILE))


def load_bundle(path: str | os.PathLike) -> ModelBundle:
    """Reads a bundle directory written by `save_bundle`, checking shapes against the model.

    A training run's workdir is accepted too: its best model (`load_workdir(path, "best")`).
    """
    path = fileio.absolute(path)
    meta_path = fileio.join(path, BUNDLE_FILE)
    if not fileio.isfile(meta_path):
        if is_run(path):
            return load_workdir(path, "best")
        if not fileio.exists(path):
            raise FileNotFoundError(f"{path} does not exist; give a model bundle directory.")
        raise FileNotFoundError(
            f"{path} is not a vgg_jax model bundle: {BUNDLE_FILE} is missing. Bundles are "
            "written by `python -m vgg_jax.convert` or `vgg_jax.checkpoints.save_bundle`; a "
            f"training run's workdir (with {CONFIG_FILE}) is accepted too."
        )
    try:
        meta = json.loads(fileio.read_text(meta_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); the bundle is damaged.") from e
    name, options = meta["model"], dict(meta["options"])
    bundle = ModelBundle(
        name=name,
        options=options,
        variables={},
        preprocessing=Preprocessing(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()}
        ),
        metadata=meta.get("metadata", {}),
    )
    variables_dir = fileio.join(path, VARIABLES_DIR)
    problem = verify_files(variables_dir, VARIABLES_DIR)
    if problem:
        raise ValueError(
            f"The weights of {path} are truncated or damaged ({problem}); write the bundle again."
        )
    try:
        with _closed_loop_reports_dropped():
            restored = ocp.StandardCheckpointer().restore(variables_dir)
    except Exception as e:  # orbax raises many types for damaged or missing files
        raise ValueError(
            f"Could not read the weights in {variables_dir}: {type(e).__name__}: {e}. The "
            "bundle is truncated or damaged; write it again."
        ) from e
    bundle.variables = dict(restored)
    check_variables(bundle.model, bundle.variables, channels=None, source=path)
    return bundle


def expected_variables(model: models.VGG, channels: int = 3) -> dict[str, Any]:
    """Abstract (shape/dtype) variables of `model` for inputs with `channels` channels."""
    size = model.image_size
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))
    )


def check_variables(
    model: models.VGG,
    variables: Mapping[str, Any],
    channels: int | None = 3,
    source: str = "the checkpoint",
) -> None:
    """Raises a ValueError naming the first parameter that does not fit `model`.

    With channels=None the input channel count is read from conv1_1's kernel.
    """
    if channels is None:
        try:
            channels = int(variables["params"]["features"]["conv1_1"]["kernel"].shape[2])
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(
                f"{source} holds no VGG parameters (params/features/conv1_1/kernel is missing)."
            ) from e
    want = expected_variables(model, channels)
    want_flat = _flatten(want)
    got_flat = _flatten({k: v for k, v in variables.items() if k in want})
    missing = sorted(set(want_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(want_flat))
    if missing or extra:
        raise ValueError(
            f"{source} does not match model {model.spec.name}: "
            + (f"missing {missing[:3]}" if missing else "")
            + (" and " if missing and extra else "")
            + (f"unexpected {extra[:3]}" if extra else "")
            + ". It was saved from a different configuration."
        )
    for key in want_flat:
        got, expected = tuple(np.shape(got_flat[key])), tuple(want_flat[key].shape)
        if got != expected:
            raise ValueError(
                f"{source} does not match model {model.spec.name}: parameter {key} has shape "
                f"{got}, the model expects {expected}. "
                "It was saved from a different configuration (model, widths, image_size or "
                "num_classes)."
            )


def input_channels(variables: Mapping[str, Any]) -> int:
    """The input channel count of a VGG's variables (conv1_1's kernel)."""
    return int(np.shape(variables["params"]["features"]["conv1_1"]["kernel"])[2])


def check_classifier(bundle: ModelBundle, command: str) -> None:
    """Raises a ValueError unless the bundle's outputs are trained class scores (what
    `command` reads): not a features-only bundle, not a localisation net's boxes."""
    meta = bundle.metadata or {}
    name = meta.get("pretrained_name", bundle.name)
    if meta.get("features_only"):
        raise ValueError(
            f"{name} holds trained features only (its classifier has no trained values): use "
            f"it with vgg_jax.features, not {command}."
        )
    if meta.get("localization"):
        raise ValueError(
            f"{name} is a localisation net (its outputs are boxes, not class scores): use "
            "`python -m vgg_jax.localize IMAGE --workdir RUN` for its boxes."
        )


def check_fits_data(
    name: str,
    model_classes: int,
    variables: Mapping[str, Any],
    num_classes: int | None,
    channels: int | None,
    data: str,
) -> None:
    """Raises a ValueError if network `name` (its class count and variables) cannot be
    evaluated on `data` (another class or channel count); None skips a check."""
    if num_classes is not None and model_classes != num_classes:
        raise ValueError(
            f"{name} has {model_classes} classes but {data} has {num_classes}; "
            "evaluate a model trained (or fine-tuned) on this dataset."
        )
    have = input_channels(variables)
    if channels is not None and have != channels:
        raise ValueError(
            f"{name} takes {have}-channel images but {data} has {channels}-channel "
            "images; use a model for this data (`convert --in-channels 1` adapts RGB weights "
            "to greyscale)."
        )


def _flatten(tree: Any) -> dict[str, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return flat


def flatten_names(tree: Any) -> Sequence[str]:
    """Slash-separated names of a tree's leaves ('params/fc6/kernel', ...)."""
    return list(_flatten(tree))


# ---------------------------------------------------------------------------
# Training runs: a workdir holds config.json, checkpoints/ (the last K training
# states) and best/ (the variables of the best evaluation so far).
#
# Integrity: orbax 0.12 renames a step's directory into place only when it is
# complete, but it keeps no checksums of the bytes (zstd frames carry none), so
# a truncated or bit-flipped data file restores silently or fails deep inside
# tensorstore. Each finalized step therefore gets CHECKSUMS_FILE, the size and
# sha256 of every file in it, written after orbax finished the step (for the
# asynchronous state saves: at the next `save_state` or `wait_until_finished`).
# A step without it (older versions, or a run killed before it was written) is
# intact but unverified.

CONFIG_FILE = "config.json"
STATE_DIR = "checkpoints"
BEST_DIR = "best"
CHECKSUMS_FILE = "vgg_jax_checksums.json"
DAMAGED_DIR = "damaged"  # where damaged steps are moved aside, never deleted
# Files without which orbax cannot even read a step, relative to the step directory.
_REQUIRED = {
    STATE_DIR: ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "meta/metadata"),
    BEST_DIR: ("_CHECKPOINT_METADATA", "variables/_METADATA", "variables/manifest.ocdbt"),
}
# Steps saved asynchronously whose checksums are still to be written, per manager directory.
_unrecorded: dict[str, set[int]] = {}


class _DropReadOnlyNotices(logging.Filter):
    """Drops orbax's notices that a read-only manager is read-only: reading is what was asked."""

    NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def _quiet_when_read_only(make_manager):
    """Silences those notices while a read-only manager is made; every other warning shows."""
    signature = inspect.signature(make_manager)

    @functools.wraps(make_manager)
    def wrapper(*args, **kwargs):
        if not signature.bind(*args, **kwargs).arguments.get("read_only"):
            return make_manager(*args, **kwargs)
        absl_logger, notices = logging.getLogger("absl"), _DropReadOnlyNotices()
        absl_logger.addFilter(notices)
        try:
            return make_manager(*args, **kwargs)
        finally:
            absl_logger.removeFilter(notices)

    return wrapper


@_quiet_when_read_only
def state_manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Manager of the training states in workdir/checkpoints: step-numbered, last `keep` kept.

    Items: 'state' (the whole train state) and 'meta' (JSON: epoch, best accuracy,
    finished flag). Orbax writes each step into a temporary directory and renames
    it when complete, so a run killed while saving leaves nothing that is loaded.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,  # orbax warns when a reader sets it
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        fileio.join(fileio.absolute(workdir), STATE_DIR),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


def save_state(manager: ocp.CheckpointManager, step: int, state: Any, meta: Any) -> None:
    """Saves a training state and its JSON `meta` at `step` (a step saved already is kept).

    The save runs in the background. The checksums of the previous save are written here
    (orbax waits for it before starting a new one anyway); those of the last one by
    `wait_until_finished`.
    """
    if step in manager.all_steps():
        return
    wait_until_finished(manager)
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    _unrecorded.setdefault(str(manager.directory), set()).add(step)


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for `manager`'s background save, then records the checksums of what it wrote.

    Call it where the trainer used `manager.wait_until_finished()` (end of run, SIGTERM).
    """
    manager.wait_until_finished()
    steps = _unrecorded.pop(str(manager.directory), set())
    if jax.process_index() != 0:
        return  # process 0 records for all: after the wait every process's files are in place
    present = set(manager.all_steps())
    for step in sorted(steps & present):  # a step may already be gone (max_to_keep)
        record_checksums(fileio.join(str(manager.directory), str(step)))


def _relative_files(directory: str) -> list[str]:
    """Paths of every file under `directory`, relative to it, '/'-separated and sorted."""
    out = []
    if fileio.is_url(directory):
        import tensorflow as tf

        for root, _, files in tf.io.gfile.walk(directory):
            rel = root[len(directory) :].strip("/")
            out += [f"{rel}/{f}" if rel else f for f in files]
    else:
        for root, _, files in os.walk(directory):
            rel = os.path.relpath(root, directory).replace(os.sep, "/")
            out += [f if rel == "." else f"{rel}/{f}" for f in files]
    return sorted(f for f in out if f != CHECKSUMS_FILE)


def _sha256(path: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file's bytes."""
    digest = hashlib.sha256()
    if fileio.is_url(path):
        data = fileio.read_bytes(path)
        digest.update(data)
        return len(data), digest.hexdigest()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def record_checksums(step_dir: str) -> None:
    """Writes step_dir/CHECKSUMS_FILE: the size and sha256 of every file of a finalized step."""
    files = {}
    for rel in _relative_files(step_dir):
        size, digest = _sha256(fileio.join(step_dir, rel))
        files[rel] = {"size": size, "sha256": digest}
    record = {"algorithm": "sha256", "files": files}
    fileio.write_text_atomic(fileio.join(step_dir, CHECKSUMS_FILE), json.dumps(record, indent=1))


def verify_step(workdir: str, step: int, kind: str = STATE_DIR) -> str | None:
    """None if checkpoint `step` of workdir/`kind` (checkpoints or best) is intact.

    Otherwise one line naming the first problem: 'checkpoints/40/state/d/ab12: checksum
    mismatch', '... : file missing', '... : 1203 bytes, 4096 recorded', '...: metadata
    missing'. A step without a checksums file is checked for its metadata files only.
    """
    root = fileio.join(fileio.absolute(workdir), kind, str(step))
    name = f"{kind}/{step}"
    if not fileio.isdir(root):
        return f"{name}: directory missing"
    for rel in _REQUIRED[kind]:
        if not fileio.isfile(fileio.join(root, rel)):
            return f"{name}/{rel}: metadata missing"
    return verify_files(root, name)


def verify_files(root: str, name: str) -> str | None:
    """None if every file `record_checksums(root)` recorded is there with its size and sha256,
    or if root has no checksums file (unverified); otherwise the first problem, its path
    starting with `name`."""
    sums_path = fileio.join(root, CHECKSUMS_FILE)
    if not fileio.isfile(sums_path):
        return None if fileio.isdir(root) else f"{name}: directory missing"
    try:
        files = json.loads(fileio.read_text(sums_path))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{name}/{CHECKSUMS_FILE}: unreadable"
    for rel, want in files.items():
        path = fileio.join(root, rel)
        if not fileio.isfile(path):
            return f"{name}/{rel}: file missing"
        size, digest = _sha256(path)
        if size != want["size"]:
            return f"{name}/{rel}: {size} bytes, {want['size']} recorded (truncated or overwritten)"
        if digest != want["sha256"]:
            return f"{name}/{rel}: checksum mismatch"
    return None


def _set_aside(workdir: str, step: int) -> str:
    """Moves damaged step `step` to workdir/damaged/; returns where to, relative to workdir.

    On a URL (gs://) that is a copy of every file, then the step's deletion (fileio.move_tree).
    """
    name = f"{STATE_DIR}-{step}"
    if fileio.exists(fileio.join(workdir, DAMAGED_DIR, name)):
        name += time.strftime("-%Y%m%dT%H%M%S")
    fileio.makedirs(fileio.join(workdir, DAMAGED_DIR))
    target = fileio.join(workdir, DAMAGED_DIR, name)
    fileio.move_tree(fileio.join(workdir, STATE_DIR, str(step)), target)
    return f"{DAMAGED_DIR}/{name}"


def _print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def newest_intact_step(
    manager: ocp.CheckpointManager,
    workdir: str,
    say: Callable[[str], None] = _print_err,
    set_aside: bool = True,
) -> int | None:
    """The newest step of workdir/checkpoints that `verify_step` finds intact; None if none saved.

    Damaged steps (newer than the one returned) are each reported in one line, e.g.
    "checkpoint 40 is damaged (checkpoints/40/state/d/ab: checksum mismatch); moved to
    damaged/checkpoints-40; using 30". With `set_aside` (the trainer's case) a damaged step
    is moved to workdir/damaged/ (so that training can write that step again)
    and `manager` reloaded; nothing is ever deleted. Readers pass set_aside=False. On a URL
    (gs://, no directory rename) the move copies the step's files, then deletes the step.

    Raises:
      ValueError: every saved step is damaged (each is named; nothing was moved).
    """
    workdir = fileio.absolute(workdir)
    damaged = []
    chosen = None
    for step in sorted(manager.all_steps(), reverse=True):
        reason = verify_step(workdir, step)
        if reason is None:
            chosen = step
            break
        damaged.append((step, reason))
    if damaged and chosen is None:
        raise ValueError(
            f"Every checkpoint in {fileio.join(workdir, STATE_DIR)} is damaged: "
            + "; ".join(f"{s} ({r})" for s, r in damaged)
            + ". Nothing was deleted: restore them from a copy, or move that directory away "
            "to train from the start."
        )
    moving = set_aside and damaged
    for step, reason in damaged:
        where = "left in place"
        if moving:
            where = "moved to " + (
                _set_aside(workdir, step) if jax.process_index() == 0 else DAMAGED_DIR
            )
        say(f"checkpoint {step} is damaged ({reason}); {where}; using {chosen}")
    if moving:
        if jax.process_count() > 1:  # the others must not list the moved steps
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("vgg_jax_set_aside_damaged")
        manager.reload()
    return chosen


def restore_state(
    manager: ocp.CheckpointManager, step: int, model: models.VGG, target: Any, source: str
) -> tuple[Any, dict[str, Any]]:
    """The state and meta saved at `step`, restored onto `target` (abstract arrays).

    The saved variables are checked against `model` first, so a checkpoint of
    another model fails with a ValueError naming the parameter, not inside orbax.
    Any failure inside orbax (a damaged step) is a ValueError naming the step.
    """
    with _orbax_errors(step, source):
        saved = manager.item_metadata(step)["state"]
    # batch_stats too: a BN model's expected variables include them (params alone never match).
    saved_vars = {
        k: abstract_from_metadata(dict(saved[k])) for k in ("params", "batch_stats") if saved.get(k)
    }
    check_variables(model, saved_vars, channels=None, source=source)
    with _orbax_errors(step, source):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
    return restored["state"], dict(restored["meta"])


@contextlib.contextmanager
def _orbax_errors(step: int, source: str) -> Iterator[None]:
    """Turns whatever orbax/tensorstore raise for a damaged step into one ValueError line."""
    try:
        with _closed_loop_reports_dropped():
            yield
    except Exception as e:  # orbax raises many types (KeyError, ValueError, OSError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"Could not read checkpoint {step} in {source}: {type(e).__name__}: {first[:300]}. "
            "The checkpoint is damaged or incomplete; move it away to use an earlier one."
        ) from e


def is_closed_loop_report(error: BaseException | None) -> bool:
    """True for what tensorstore raises when an orbax read or write finishes after orbax
    closed its event loop (a failed restore or background save): no news to the user."""
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


@contextlib.contextmanager
def _closed_loop_reports_dropped() -> Iterator[None]:
    """Drops what tensorstore's reads report as they finish after orbax gave up on a failed
    restore and closed its event loop ("Event loop is closed", a dozen tracebacks through
    sys.unraisablehook); every other unraisable error reaches the hook installed before.

    After a failure the filter stays (once per process): those reads may finish after the
    error has reached the caller.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        yield
        return

    def hook(unraisable: Any) -> None:
        if not is_closed_loop_report(unraisable.exc_value):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook
    yield  # an exception leaves the filter installed
    sys.unraisablehook = previous


@_quiet_when_read_only
def best_manager(
    workdir: str, read_only: bool = False, metric: str = "eval_top1_accuracy", mode: str = "max"
) -> ocp.CheckpointManager:
    """Manager of workdir/best: the variables of the best evaluation by `metric` (`mode`)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else 1,
        best_fn=lambda m: m[metric],
        best_mode=mode,
        # Synchronous: a second manager saving in the background beside the state manager's
        # async save was seen to hang a two-process run at its final step.
        enable_async_checkpointing=False,
        # Its own barrier names: both managers save at the same step, and with the default
        # (shared) keys their cross-process barriers would pair up with each other's.
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best"),
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(
        fileio.join(fileio.absolute(workdir), BEST_DIR),
        options=options,
        item_handlers={"variables": ocp.StandardCheckpointHandler()},
    )


def save_best(
    manager: ocp.CheckpointManager,
    step: int,
    variables: Mapping[str, Any],
    figures: Mapping[str, float],
    metric: str = "eval_top1_accuracy",
    mode: str = "max",
) -> bool:
    """Saves `variables` in workdir/best if figures[metric] beats the best kept there.

    `manager` is `best_manager(workdir, metric=metric, mode=mode)` (the same metric and
    mode); `variables` holds 'params' and, for BN models, a non-empty 'batch_stats'
    (empty collections are dropped). "max" keeps the highest value (accuracy), "min" the
    lowest (localisation error). A non-finite value never wins. Checksums are written
    with the step. Returns True if it saved.
    """
    if metric not in figures:
        raise ValueError(f"The best checkpoint follows {metric!r}, which the evaluation lacks "
                         f"(it gave {sorted(figures)}).")  # fmt: skip
    value = float(figures[metric])
    if not math.isfinite(value) or step in manager.all_steps():
        return False
    best = manager.best_step()
    if best is not None:
        old = float((manager.metrics(best) or {}).get(metric, math.nan))
        if math.isfinite(old) and not (value > old if mode == "max" else value < old):
            return False
    kept = {k: v for k, v in variables.items() if k in ("params", "batch_stats") and v}
    manager.save(
        step,
        args=ocp.args.Composite(variables=ocp.args.StandardSave(dict(kept))),
        metrics={metric: value},
    )
    manager.wait_until_finished()
    if jax.process_index() == 0:
        record_checksums(fileio.join(str(manager.directory), str(step)))
    return True


def abstract_from_metadata(tree: Any, sharding: Any = None) -> Any:
    """ShapeDtypeStructs (on `sharding`, default one local device) from orbax array metadata."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(m):
        return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

    return jax.tree.map(one, tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def read_run_config(workdir: str) -> dict[str, Any]:
    """The config a training run saved in workdir/config.json, as a plain dict."""
    path = fileio.join(fileio.absolute(workdir), CONFIG_FILE)
    if not fileio.isfile(path):
        raise FileNotFoundError(
            f"{workdir} is not a vgg_jax training run: {CONFIG_FILE} is missing. Train with "
            "`python -m vgg_jax.train --config ... --workdir DIR`, or give a model bundle."
        )
    try:
        return json.loads(fileio.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the run's config is damaged.") from e


def _restore_variables(mgr: ocp.CheckpointManager, step: int, item: str, source: str) -> dict:
    """'params' (and 'batch_stats') of item `item` at `step`, onto one local device."""
    with _orbax_errors(step, source):
        meta = dict(mgr.item_metadata(step)[item])
        keep = {k: meta[k] for k in ("params", "batch_stats") if meta.get(k)}
        target = ocp.args.StandardRestore(abstract_from_metadata(meta))
        restored = mgr.restore(step, args=ocp.args.Composite(**{item: target}))
    return {k: restored[item][k] for k in keep}


def load_workdir(
    workdir: str | os.PathLike, which: str = "best", say: Callable[[str], None] = _print_err
) -> ModelBundle:
    """The model of a training run: `which` = "best" (best evaluation) or "latest".

    "latest" is the newest intact training state: damaged newer ones are reported
    through `say` and skipped (left in place). "best" is verified too (a damaged one is
    a ValueError pointing at "latest") and falls back to the latest training state when
    no evaluation was saved yet.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}.")
    workdir = fileio.absolute(workdir)
    cfg = read_run_config(workdir)
    options = {k: cfg[k] for k in models.MODEL_OPTIONS if k in cfg}
    variables, step, source = None, None, ""
    if which == "best" and fileio.isdir(fileio.join(workdir, BEST_DIR)):
        mgr = best_manager(workdir, read_only=True)
        step = mgr.latest_step()  # max_to_keep=1: the one kept is the best
        if step is not None:
            source = fileio.join(workdir, BEST_DIR)
            reason = verify_step(workdir, step, BEST_DIR)
            if reason:
                raise ValueError(
                    f"The best checkpoint of {workdir} (step {step}) is damaged ({reason}); "
                    "use the newest training state instead (evaluate/predict: --which latest)."
                )
            variables = _restore_variables(mgr, step, "variables", source)
    if variables is None:
        mgr = state_manager(workdir, read_only=True)
        step = newest_intact_step(mgr, workdir, say, set_aside=False)
        if step is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet; train first.")
        source = fileio.join(workdir, STATE_DIR, str(step))
        variables = _restore_variables(mgr, step, "state", source)
    bundle = ModelBundle(
        name=cfg["model"],
        options=options,
        variables=variables,
        preprocessing=Preprocessing.from_config(cfg),
        metadata={"workdir": workdir, "step": int(step), "which": which, "dataset": cfg["dataset"]},
    )
    check_variables(bundle.model, bundle.variables, channels=None, source=source)
    return bundle
