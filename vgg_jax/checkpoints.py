"""Saved models: a VGG's variables plus what is needed to use them.

A *model bundle* is a directory holding

* `vgg_jax_model.json`: the `create_model` arguments and the input
  preprocessing (channel order, value range, mean, std), and
* `variables/`: an orbax checkpoint of `{'params': ..., 'batch_stats': ...}`.

Bundles are what `convert` writes and what `evaluate`, `predict`,
`score_map` and fine-tuning (`config.init_from`) read. No pickle is involved:
orbax stores arrays in tensorstore and the metadata is JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
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
    def from_config(cls, config: Any) -> Preprocessing:
        """The preprocessing that a training config's input pipeline applies."""
        return cls(
            channel_order=config.get("channel_order", "RGB"),
            value_range=float(config.value_range),
            mean=tuple(float(v) for v in config.mean_rgb),
            std=tuple(float(v) for v in config.std_rgb),
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


def load_bundle(path: str | os.PathLike) -> ModelBundle:
    """Reads a bundle directory written by `save_bundle`, checking shapes against the model."""
    path = fileio.absolute(path)
    meta_path = fileio.join(path, BUNDLE_FILE)
    if not fileio.isfile(meta_path):
        raise FileNotFoundError(
            f"{path} is not a vgg_jax model bundle: {BUNDLE_FILE} is missing. Bundles are "
            "written by `python -m vgg_jax.convert` or `vgg_jax.checkpoints.save_bundle`; a "
            "training run's directory is loaded with `--workdir` instead."
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
    try:
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
# states) and best/ (the variables with the best validation accuracy).

CONFIG_FILE = "config.json"
STATE_DIR = "checkpoints"
BEST_DIR = "best"


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
        max_to_keep=keep, create=not read_only, read_only=read_only, cleanup_tmp_directories=True
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
    """Saves a training state and its JSON `meta` at `step` (a step saved already is kept)."""
    if step in manager.all_steps():
        return
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def restore_state(
    manager: ocp.CheckpointManager, step: int, model: models.VGG, target: Any, source: str
) -> tuple[Any, dict[str, Any]]:
    """The state and meta saved at `step`, restored onto `target` (abstract arrays).

    The saved variables are checked against `model` first, so a checkpoint of
    another model fails with a ValueError naming the parameter, not inside orbax.
    """
    saved = manager.item_metadata(step)["state"]
    # batch_stats too: a BN model's expected variables include them (params alone never match).
    saved_vars = {
        k: abstract_from_metadata(dict(saved[k])) for k in ("params", "batch_stats") if saved.get(k)
    }
    check_variables(model, saved_vars, channels=None, source=source)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], dict(restored["meta"])


@_quiet_when_read_only
def best_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
    """Manager of workdir/best: the variables of the evaluation with the best top-1 accuracy."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m["eval_top1_accuracy"],
        best_mode="max",
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
    return json.loads(fileio.read_text(path))


def load_workdir(workdir: str | os.PathLike, which: str = "best") -> ModelBundle:
    """The model of a training run: `which` = "best" (validation accuracy) or "latest".

    "best" falls back to the latest training state when no evaluation was saved yet.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}.")
    workdir = fileio.absolute(workdir)
    cfg = read_run_config(workdir)
    options = {k: cfg[k] for k in models.MODEL_OPTIONS if k in cfg}
    preprocessing = Preprocessing(
        channel_order=cfg.get("channel_order", "RGB"),
        value_range=float(cfg["value_range"]),
        mean=tuple(float(v) for v in np.ravel(cfg["mean_rgb"])),
        std=tuple(float(v) for v in np.ravel(cfg["std_rgb"])),
    )
    variables, step, source = None, None, ""
    if which == "best" and fileio.isdir(fileio.join(workdir, BEST_DIR)):
        mgr = best_manager(workdir, read_only=True)
        step = mgr.best_step()
        if step is not None:
            target = abstract_from_metadata(dict(mgr.item_metadata(step)["variables"]))
            restored = mgr.restore(
                step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(target))
            )
            variables, source = dict(restored["variables"]), fileio.join(workdir, BEST_DIR)
    if variables is None:
        mgr = state_manager(workdir, read_only=True)
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet; train first.")
        meta = dict(mgr.item_metadata(step)["state"])
        keep = {k: meta[k] for k in ("params", "batch_stats") if meta.get(k)}
        target = abstract_from_metadata(meta)
        restored = mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        variables = {k: restored["state"][k] for k in keep}
        source = fileio.join(workdir, STATE_DIR)
    bundle = ModelBundle(
        name=cfg["model"],
        options=options,
        variables=variables,
        preprocessing=preprocessing,
        metadata={"workdir": workdir, "step": int(step), "which": which, "dataset": cfg["dataset"]},
    )
    check_variables(bundle.model, bundle.variables, channels=None, source=source)
    return bundle
