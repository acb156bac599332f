"""Object localisation (the paper's Appendix A): VGG nets that regress a bounding box.

A localisation net is a VGG whose last FC layer outputs a box instead of class
scores: 4 numbers (cx, cy, w, h in the crop's frame, `vgg_jax.boxes`) shared
by all classes ("SCR", single-class regression) or 4 per class ("PCR"),
trained with the Euclidean loss, fine-tuned from a classification net
(`config.init_from`, through the trainer's `transfer_params`; fc8 is new),
either all layers or only the FC layers (`localization.fine_tune`). Training
follows the paper: fixed S (`train_scale_min`), central image_size crops.

Test protocols:

1. central crop, ground-truth class given: the box of the crop's object
   (PCR: the true class's box) counts as right with IoU > 0.5. Compared with
   a fixed centred box of the training set's mean size.
2. fully-fledged: every localisation net applied densely (FC layers as
   convolutions) to the whole image at several scales, one box per position
   and class; the classifier's score for that class at that position rates
   it; boxes of all nets and scales are merged greedily per class
   (`boxes.merge`); the top-5 classes of the classifier (dense, averaged over
   positions and scales) each get their best merged box; top-5 localisation
   error by the ILSVRC criterion.

`localization.task = "classify"` trains the classifier that rates boxes on the
same crops with cross-entropy (for Fashion-MNIST canvases: a classifier that
has seen objects at canvas positions and scales).

    python -m vgg_jax.localize train --config configs/localize_fashion_mnist.py:classifier \
        --workdir runs/loc_classifier
    python -m vgg_jax.localize train --config configs/localize_fashion_mnist.py \
        --workdir runs/loc_scr
    python -m vgg_jax.localize evaluate --config configs/localize_fashion_mnist.py \
        --workdir runs/loc_scr --workdir runs/loc_pcr
    python -m vgg_jax.localize IMAGE.png --workdir runs/loc_scr --output boxes.png

A workdir ends up holding a model bundle (`checkpoints.save_bundle`: the
variables, preprocessing and, in its metadata, the head, classes and
classifier), `config.json`, `metrics.jsonl` and the training checkpoints
(`checkpoints/`), from which a killed run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vgg_jax import (
    boxes,
    checkpoints,
    evaluate,
    fileio,
    image_io,
    models,
    parallel,
    protocols,
    train,
)
from vgg_jax import localization_data as ldata
from vgg_jax import metrics as metrics_lib

TASKS = ("localize", "classify")
HEADS = ("scr", "pcr")
FINE_TUNE = ("all", "fc")
CANVAS_DATASET = "fashion_mnist_canvas"
SCHEDULES = ("step", "cosine", "constant")
# Canvas seeds beside the training steps' (0, 1, 2, ...): protocol (1)'s and (2)'s test sets.
CENTRAL_SALT, DENSE_SALT = 2**31 - 1, 2**31 - 2


# ---------------------------------------------------------------------------
# Heads and loss.


def head_outputs(head: str, num_object_classes: int) -> int:
    """Outputs of the last FC layer: 4 for SCR, 4 per class for PCR."""
    if head not in HEADS:
        raise ValueError(f"Unknown localisation head {head!r}; choose one of {HEADS}.")
    return 4 if head == "scr" else 4 * num_object_classes


def class_boxes(outputs: jax.Array, labels: jax.Array, head: str) -> jax.Array:
    """(N, 4) box parameters of class `labels` from (N, 4 or 4 * classes) outputs."""
    if head == "scr":
        return outputs
    per_class = outputs.reshape(outputs.shape[0], -1, 4)
    return jnp.take_along_axis(per_class, labels[:, None, None], axis=1)[:, 0]


def model_outputs(config: ml_collections.ConfigDict) -> int:
    loc = config.localization
    if loc.task == "classify":
        return int(config.num_classes)
    return head_outputs(loc.head, int(config.num_classes))


def create_model(config: ml_collections.ConfigDict) -> models.VGG:
    """The net a localisation config trains (classes, SCR or PCR outputs)."""
    return models.create_model(config.model, **model_options(config))


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {**checkpoints.model_options_from_config(config), "num_classes": model_outputs(config)}


# ---------------------------------------------------------------------------
# Configuration.


def validate_config(config: ml_collections.ConfigDict) -> None:
    """The trainer's checks plus the localisation fields'."""
    train.validate_config(config)
    loc = config.get("localization")
    if loc is None:
        raise ValueError(
            "The config has no 'localization' field; start from configs/localize_fashion_mnist.py."
        )
    for key, valid in (("task", TASKS), ("head", HEADS), ("fine_tune", FINE_TUNE)):
        if loc[key] not in valid:
            raise ValueError(f"config.localization.{key}={loc[key]!r}; choose one of {valid}.")
    if config.schedule not in SCHEDULES:
        raise ValueError(
            f"config.schedule={config.schedule!r}: localisation training supports {SCHEDULES} "
            "(no validation accuracy drives a plateau schedule here)."
        )
    if loc.fine_tune == "fc" and not config.init_from:
        raise ValueError(
            "localization.fine_tune='fc' trains only the FC layers, so the conv layers must "
            "come from a classification net: set config.init_from."
        )
    if config.train_scale_min != config.train_scale_max:
        raise ValueError(
            "Localisation trains at a fixed scale S (the paper's Appendix A): set "
            "train_scale_max = train_scale_min."
        )


def load_config(path: str) -> ml_collections.ConfigDict:
    """A config file FILE.py[:variant] (its get_config)."""
    return train.load_config_file(path)


# ---------------------------------------------------------------------------
# Data.


def _items(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    return _cached_items(split, config.get("manual_dir", ""))


@functools.lru_cache(maxsize=4)
def _cached_items(split: str, manual_dir: str) -> tuple[np.ndarray, np.ndarray]:
    return ldata.fashion_mnist_items(split, manual_dir)


def load_set(config, split: str, count: int, canvas_size: int, scale_range, salt: int):
    """`count` examples of a split: canvases seeded by salt, or a tfds set's first ones."""
    if config.dataset == CANVAS_DATASET:
        items, labels = _items(config, split)
        seed = [int(config.seed), salt]
        return ldata.fashion_mnist_canvases(
            items, labels, count, canvas_size, tuple(scale_range), seed
        )
    return ldata.tfds_localization_set(config.dataset, split, config.data_dir, count)


def train_batches(config, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches {'image', 'target', 'label'}: central crops at fixed S.

    Canvases: new ones every step, a pure function of (seed, step). tfds sets:
    crops computed once (a fixed-S central crop has no randomness) and kept as
    uint8 (a quarter of float32's memory), reshuffled each epoch. Optional
    horizontal flips mirror the target's centre.
    """
    loc, size, scale = config.localization, config.image_size, config.train_scale_min
    n = config.batch_size
    fixed = None
    if config.dataset != CANVAS_DATASET:
        data = load_set(config, config.train_split, int(loc.limit), 0, (1, 1), 0)
        fixed = ldata.central_crops(data, scale, size, as_uint8=True)
        del data
        if len(fixed[0]) < n:
            raise ValueError(
                f"{len(fixed[0])} training images of {config.dataset!r} have boxes, fewer than a "
                f"batch of {n}: lower config.batch_size or raise localization.limit."
            )
    step = start_step
    while True:
        rng = np.random.default_rng([int(config.seed), step, 7])
        if fixed is None:
            data = load_set(config, config.train_split, n, loc.canvas_size, loc.scale_range, step)
            crops, targets, labels = ldata.central_crops(data, scale, size)
        else:
            per_epoch = len(fixed[0]) // n
            epoch, k = divmod(step, per_epoch)
            order = np.random.default_rng([int(config.seed), epoch]).permutation(len(fixed[0]))
            idx = order[k * n : (k + 1) * n]
            crops, targets, labels = (a[idx] for a in fixed)
        if config.random_flip:
            flip = rng.random(len(crops)) < 0.5
            crops = np.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
            targets = targets.copy()
            targets[flip, 0] = 1.0 - targets[flip, 0]
        image = image_io.unit_float(crops)
        yield {"image": image, "target": targets.astype(np.float32), "label": labels}
        step += 1


def steps_per_epoch(config) -> int:
    loc = config.localization
    if config.dataset == CANVAS_DATASET:
        size = int(loc.epoch_size)
    else:
        size = int(loc.limit) or ldata.tfds_num_examples(
            config.dataset, config.train_split, config.data_dir
        )
    steps = size // config.batch_size
    if steps < 1:
        raise ValueError(
            f"An epoch of {size} examples is less than one batch of {config.batch_size}."
        )
    return steps


def eval_crops(config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Protocol (1)'s examples: central crops of the evaluation split at the training S."""
    loc = config.localization
    data = load_set(
        config, config.eval_split, int(loc.num_eval), loc.canvas_size, loc.scale_range, CENTRAL_SALT
    )
    return ldata.central_crops(data, config.train_scale_min, config.image_size)


# ---------------------------------------------------------------------------
# Training.


def _initial_variables(config, model, channels: int, say) -> dict[str, Any]:
    size = config.image_size
    variables = model.init(
        jax.random.key(config.seed, impl="rbg"), jnp.zeros((1, size, size, channels))
    )
    variables = jax.tree.map(np.asarray, dict(variables))
    if config.init_from:
        source = train.load_init_source(config.init_from).variables
        variables["params"] = train.transfer_params(
            variables["params"], source["params"], config.init_from_mode, say
        )
        if "batch_stats" in variables:
            variables["batch_stats"] = train.transfer_batch_stats(
                variables["batch_stats"], source.get("batch_stats", {})
            )
    return variables


def make_train_step(config, model: models.VGG, tx: optax.GradientTransformation, lr_fn):
    """The jitted SGD step: cross-entropy (classify) or the Euclidean box loss (localize)."""
    loc = config.localization
    preprocess = checkpoints.Preprocessing.from_config(config)
    frozen = loc.fine_tune == "fc"

    def loss_fn(params, batch_stats, batch, key):
        if frozen:  # no gradient into the conv layers: XLA drops their backward pass
            params = {**params, "features": jax.lax.stop_gradient(params["features"])}
        variables = {"params": params}
        mutable = []
        if batch_stats:
            variables["batch_stats"] = batch_stats
            mutable = ["batch_stats"]
        out = model.apply(
            variables,
            preprocess(batch["image"]),
            train=True,
            rngs={"dropout": key},
            mutable=mutable,
        )
        outputs, updated = out if mutable else (out, {})
        if loc.task == "classify":
            loss = train.cross_entropy(outputs, batch["label"]).mean()
            metric = jnp.mean(jnp.argmax(outputs, -1) == batch["label"])
        else:
            predicted = class_boxes(outputs, batch["label"], loc.head)
            loss = boxes.euclidean_loss(predicted, batch["target"])
            metric = loss
        return loss, (metric, updated.get("batch_stats", batch_stats))

    def step(params, batch_stats, opt_state, batch, step_index):
        key = jax.random.fold_in(jax.random.key(config.seed), step_index)
        (loss, (metric, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, batch, key
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        if frozen:  # weight decay must not move the frozen layers either
            updates = {**updates, "features": jax.tree.map(jnp.zeros_like, updates["features"])}
        params = optax.apply_updates(params, updates)
        figures = {"loss": loss, "metric": metric, "learning_rate": lr_fn(step_index)}
        return params, batch_stats, opt_state, figures

    return jax.jit(step, donate_argnums=(0, 1, 2))


@functools.lru_cache(maxsize=16)
def _apply_fn(model: models.VGG, preprocess: Any):
    return jax.jit(lambda v, x: model.apply(v, preprocess(x), train=False))


def predict_outputs(
    model: models.VGG, variables: Any, preprocess: Any, crops: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """The net's outputs for crops at its training resolution, in fixed-size batches."""
    fn = _apply_fn(model, preprocess)
    outs = []
    for start in range(0, len(crops), batch_size):
        chunk = crops[start : start + batch_size]
        padded = np.zeros((batch_size, *crops.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        outs.append(np.asarray(fn(variables, padded))[: len(chunk)])
    return np.concatenate(outs)


def central_crop_error(
    predicted: np.ndarray, targets: np.ndarray, threshold: float = boxes.ILSVRC_IOU
) -> tuple[float, float]:
    """Protocol (1): (error, mean IoU) of predicted vs true (cx, cy, w, h) boxes in crop frames."""
    overlap = boxes.iou(boxes.decode(predicted), boxes.decode(targets))
    return float(np.mean(overlap <= threshold)), float(np.mean(overlap))


def centred_box(mean_size: Sequence[float]) -> np.ndarray:
    """The fixed baseline: a box of the training set's mean width and height, centred."""
    return np.array([0.5, 0.5, float(mean_size[0]), float(mean_size[1])], np.float32)


def _evaluate_crops(config, model, variables, crops, targets, labels) -> dict[str, float]:
    preprocess = checkpoints.Preprocessing.from_config(config)
    outputs = predict_outputs(model, variables, preprocess, crops, config.eval_batch_size)
    if config.localization.task == "classify":
        return {"eval_top1_accuracy": float(np.mean(np.argmax(outputs, -1) == labels))}
    predicted = np.asarray(
        class_boxes(jnp.asarray(outputs), jnp.asarray(labels), config.localization.head)
    )
    error, mean_iou = central_crop_error(predicted, targets)
    return {"eval_loc_error": error, "eval_mean_iou": mean_iou}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the localisation or rating classifier net of `config` in workdir.

    The training state is checkpointed every config.checkpoint_every_steps, at
    each epoch's end and on SIGTERM; a killed run resumes from its last
    checkpoint exactly (batches and dropout are functions of the step). The
    finished net is saved as a model bundle; a workdir that already holds one is
    left alone.
    """
    validate_config(config)
    workdir = fileio.absolute(workdir)
    fileio.makedirs(workdir)
    if checkpoints.is_bundle(workdir):
        meta = checkpoints.load_bundle(workdir).metadata
        print(f"{workdir} already holds a trained net; nothing to do. Use a new --workdir.")
        return {"complete": True, **meta.get("results", {})}
    mesh = parallel.create_mesh(config)
    parallel.check_batch(config.batch_size, mesh)
    model = create_model(config)
    spe = steps_per_epoch(config)
    total = train.total_steps(config, spe)
    bar = metrics_lib.ProgressBar(total, spe, enabled=bool(config.progress_bar))
    say = bar.message
    eval_set = eval_crops(config)
    channels = eval_set[0].shape[-1]
    abstract = checkpoints.expected_variables(model, channels)
    tx = train.create_optimizer(config, spe, abstract["params"])
    manager = checkpoints.state_manager(workdir, keep=config.keep_checkpoints)
    try:
        state, meta = _start_state(config, model, tx, manager, mesh, workdir, abstract, say)
        if meta["step"] < total:
            loop = _Loop(config, model, tx, spe, total, mesh, manager, workdir, bar, eval_set)
            state, meta = loop.run(state, meta)
            if meta.get("preempted"):
                return {"step": meta["step"], "preempted": True}
        manager.wait_until_finished()
    finally:
        manager.close()
    results = {**meta["eval"], "steps": total, "seconds": meta["seconds"]}
    if config.localization.task == "localize":
        targets = eval_set[1]
        mean_size = _mean_target_size(config)
        baseline, _ = central_crop_error(
            np.tile(centred_box(mean_size), (len(targets), 1)), targets
        )
        results.update({"baseline_loc_error": baseline, "mean_box_size": list(mean_size)})
        say(f"fixed centred box of the mean training size: error {baseline:.4f}")
    _save(config, workdir, _variables(state["params"], state.get("batch_stats")), results)
    say(f"Saved the {config.localization.task} net in {workdir}.")
    return {"complete": True, **results}


def _train_state(params, batch_stats, opt_state) -> dict[str, Any]:
    """What a checkpoint holds: batch_stats only for batch-norm nets (orbax drops empty trees)."""
    state = {"params": params, "opt_state": opt_state}
    if batch_stats:
        state["batch_stats"] = batch_stats
    return state


def _start_state(config, model, tx, manager, mesh, workdir: str, abstract, say):
    """The train state and the run's meta: fresh (saving config.json), or from the last save.

    `abstract`: the model's variables as shapes (`checkpoints.expected_variables`).
    """
    repl = parallel.replicated(mesh)
    latest = manager.latest_step()
    if latest is None:
        train.save_config(config, workdir)
        channels = int(abstract["params"]["features"]["conv1_1"]["kernel"].shape[2])
        variables = _initial_variables(config, model, channels, say)
        params = variables["params"]
        state = _train_state(params, variables.get("batch_stats"), tx.init(params))
        return jax.device_put(state, repl), {"step": 0, "eval": {}, "seconds": 0.0}
    shapes = _train_state(
        abstract["params"], abstract.get("batch_stats"), jax.eval_shape(tx.init, abstract["params"])
    )
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)
    source = fileio.join(workdir, checkpoints.STATE_DIR, str(latest))
    state, meta = checkpoints.restore_state(manager, latest, model, target, source)
    say(f"Resuming from step {latest} in {workdir}.")
    return dict(state), meta


class _Loop:
    """The training loop: steps, logging, protocol-(1) evaluations and checkpoints."""

    def __init__(self, config, model, tx, spe, total, mesh, manager, workdir, bar, eval_set):
        self.config, self.model, self.spe, self.total = config, model, spe, total
        self.manager, self.workdir, self.bar, self.eval_set = manager, workdir, bar, eval_set
        self.step_fn = make_train_step(config, model, tx, train.learning_rate_fn(config, spe))
        self.batch_sharding = parallel.batch_sharding(mesh)
        self.writer = metrics_lib.MetricsWriter(
            workdir, tensorboard=config.get("tensorboard", True)
        )

    def run(self, state: dict, meta: dict) -> tuple[dict, dict]:
        """Steps from meta['step'] to the end, or until SIGTERM (meta['preempted'])."""
        try:
            with train.Preemption() as preemption:
                return self._steps(state, meta, preemption)
        finally:
            self.writer.close()

    def _steps(self, state: dict, meta: dict, preemption: train.Preemption):
        config, spe, total = self.config, self.spe, self.total
        first = meta["step"] + 1
        data = train_batches(config, start_step=meta["step"])
        pending: list[dict[str, jax.Array]] = []
        start = last = time.perf_counter()
        seconds_before = meta["seconds"]
        for step in range(first, total + 1):
            batch = {k: jax.device_put(v, self.batch_sharding) for k, v in next(data).items()}
            state, figures = self._step(state, batch, step)
            pending.append(figures)
            epoch_end = step % spe == 0
            evaluate_now = step == total or (
                epoch_end and (step // spe) % config.eval_every_epochs == 0
            )
            stop = preemption.requested and step < total
            save = stop or epoch_end or step == total or step % config.checkpoint_every_steps == 0
            if step % config.log_every_steps == 0 or evaluate_now or save:
                now = time.perf_counter()
                logged = self._figures(step, jax.device_get(pending), now - last)
                pending, last = [], now
                if evaluate_now:
                    meta["eval"] = self._evaluate(state, step)
                    logged.update(meta["eval"])
                self.writer.write(step, step / spe, logged)
                self.bar.update(step, logged, (now - start) / (step - first + 1))
            if save:
                seconds = seconds_before + time.perf_counter() - start
                meta = {**meta, "step": step, "seconds": seconds}
                checkpoints.save_state(self.manager, step, state, meta)
            if stop:
                self.manager.wait_until_finished()
                self.bar.message(
                    f"SIGTERM: saved step {step} in {self.workdir}; run again to resume."
                )
                return state, {**meta, "preempted": True}
        return state, meta

    def _step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        params, batch_stats, opt_state, figures = self.step_fn(
            state["params"],
            state.get("batch_stats", {}),
            state["opt_state"],
            batch,
            jnp.int32(step - 1),
        )
        return _train_state(params, batch_stats, opt_state), figures

    def _figures(self, step: int, fetched: list[dict], seconds: float) -> dict[str, float]:
        loss = float(np.mean([f["loss"] for f in fetched]))
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"The training loss is {loss} at step {step}: training stopped. The last good "
                f"checkpoint (step {self.manager.latest_step()}) in {self.workdir} is kept; lower "
                "config.learning_rate, then run again."
            )
        logged = {
            "train_loss": loss,
            "learning_rate": float(fetched[-1]["learning_rate"]),
            "images_per_second": len(fetched) * self.config.batch_size / max(seconds, 1e-9),
        }
        if self.config.localization.task == "classify":
            logged["train_accuracy"] = float(np.mean([f["metric"] for f in fetched]))
        return logged

    def _evaluate(self, state: dict, step: int) -> dict[str, float]:
        variables = _variables(state["params"], state.get("batch_stats"))
        ev = _evaluate_crops(self.config, self.model, variables, *self.eval_set)
        self.bar.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        return ev


def _variables(params, batch_stats) -> dict[str, Any]:
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _mean_target_size(config, batches: int = 8) -> tuple[float, float]:
    """Mean (w, h) of training targets (the fixed-box baseline's size)."""
    data = train_batches(config)
    sizes = np.concatenate([next(data)["target"][:, 2:] for _ in range(batches)])
    return float(sizes[:, 0].mean()), float(sizes[:, 1].mean())


def _save(config, workdir: str, variables: Any, results: dict[str, Any]) -> None:
    loc = config.localization
    names = list(_class_names(config))
    metadata: dict[str, Any] = {"results": results, "dataset": config.dataset}
    if loc.task == "classify":
        metadata["class_names"] = names
    else:
        metadata["localization"] = {
            "head": loc.head,
            "num_object_classes": int(config.num_classes),
            "class_names": names,
            "classifier": fileio.absolute(loc.classifier or config.init_from)
            if (loc.classifier or config.init_from)
            else "",
            "dense_scales": [int(q) for q in loc.dense_scales],
            "merge_iou": float(loc.merge_iou),
        }
    bundle = checkpoints.ModelBundle(
        name=config.model,
        options=model_options(config),
        variables=jax.device_get(variables),
        preprocessing=checkpoints.Preprocessing.from_config(config),
        metadata=metadata,
    )
    checkpoints.save_bundle(workdir, bundle)


def _class_names(config) -> tuple[str, ...]:
    if config.dataset == CANVAS_DATASET:
        return ldata.FASHION_MNIST_CLASSES
    return tuple(f"class {i}" for i in range(int(config.num_classes)))


# ---------------------------------------------------------------------------
# Protocol (2): dense application, merging, top-5 localisation error.


@dataclasses.dataclass
class Localizer:
    """A trained localisation net and how to read its outputs."""

    member: protocols.Member
    head: str
    num_object_classes: int
    class_names: tuple[str, ...]
    classifier: str = ""

    @classmethod
    def load(cls, path: str) -> Localizer:
        member, bundle = evaluate.load_network(path)
        info = bundle.metadata.get("localization")
        if not info:
            raise ValueError(
                f"{path} is not a localisation net (its bundle has no 'localization' metadata); "
                "train one with `python -m vgg_jax.localize train`."
            )
        return cls(
            member,
            info["head"],
            int(info["num_object_classes"]),
            tuple(info["class_names"]),
            info.get("classifier", ""),
        )

    def boxes_for(self, outputs: np.ndarray, cls: int) -> np.ndarray:
        """(..., 4) (cx, cy, w, h) of class `cls` from (..., outputs) maps."""
        return outputs[..., :4] if self.head == "scr" else outputs[..., 4 * cls : 4 * cls + 4]


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: int
    box: np.ndarray  # corner box normalised to the image
    rating: float  # the merged group's summed class scores
    probability: float  # the classifier's image-level probability of the class


def position_boxes(params: np.ndarray, image_size: int, rescaled_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, 4) (cx, cy, w, h) per score-map position -> corner boxes in the image's frame.

    Position (i, j) saw the image_size window at 32 * (i, j) of the image rescaled to rescaled_hw.
    """
    h, w = params.shape[:2]
    corners = boxes.decode(params)
    stride = protocols.NETWORK_STRIDE
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rh, rw = rescaled_hw
    top, left = rows * stride / rh, cols * stride / rw
    scale = np.array([image_size / rh, image_size / rw] * 2, np.float32)
    offset = np.stack([top, left, top, left], axis=-1)
    return boxes.clip(corners * scale + offset)


def dense_localize(
    localizers: Sequence[Localizer],
    classifier: protocols.Member,
    images: Sequence[np.ndarray],
    scales: Sequence[int],
    top: int = 5,
    merge_iou: float = 0.5,
    batch_size: int = 8,
) -> list[list[Prediction]]:
    """Protocol (2) for each image: its top classes, each with its best merged box.

    `images`: HxWxC, uint8 or floats in [0, 1] (`image_io.unit_float`).
    """
    size = classifier.model.image_size
    for loc in localizers:
        if loc.member.model.image_size != size:
            raise ValueError(
                f"The localisation net {loc.member.name} has image_size "
                f"{loc.member.model.image_size}, the classifier {size}: their score-map "
                "positions must coincide; use nets trained at the same image_size."
            )
    image_set = image_io.as_image_set([image_io.unit_float(im) for im in images])

    def maps_of(member: protocols.Member) -> list[dict[int, np.ndarray]]:
        dense = protocols.DenseEvaluator(
            member.model,
            member.variables,
            scales,
            flip=False,
            preprocess=member.preprocess,
            batch_size=batch_size,
        )
        return dense.score_maps(image_set)

    cls_maps = maps_of(classifier)
    loc_maps = [maps_of(loc.member) for loc in localizers]
    results = []
    for i, image in enumerate(image_set.images):
        probs = {q: np.asarray(protocols.softmax(m)) for q, m in cls_maps[i].items()}
        image_probs = np.mean(
            [np.asarray(protocols.softmax(m.mean(axis=(0, 1)))) for m in cls_maps[i].values()],
            axis=0,
        )
        classes = np.argsort(-image_probs, kind="stable")[:top]
        preds = []
        for c in classes:
            cand, scores = [], []
            for loc, maps in zip(localizers, loc_maps, strict=True):
                for q, m in maps[i].items():
                    hw = image_io.rescaled_size(image.shape[0], image.shape[1], q)
                    cand.append(position_boxes(loc.boxes_for(m, int(c)), size, hw).reshape(-1, 4))
                    scores.append(probs[q][..., c].reshape(-1))
            merged, ratings = boxes.merge(np.concatenate(cand), np.concatenate(scores), merge_iou)
            preds.append(Prediction(int(c), merged[0], float(ratings[0]), float(image_probs[c])))
        results.append(preds)
    return results


def dense_errors(
    predictions: Sequence[Sequence[Prediction]], data: ldata.LocalizationSet
) -> dict[str, float]:
    """Top-1 and top-5 localisation error and the classifier's top-5 classification error."""
    as_pairs = [[(p.label, p.box) for p in preds] for preds in predictions]
    cls_wrong = [
        not set(int(p.label) for p in preds[:5]) & set(map(int, labels))
        for preds, labels in zip(predictions, data.labels, strict=True)
    ]
    return {
        "top1_loc_error": boxes.localization_error(as_pairs, data.labels, data.boxes, top=1),
        "top5_loc_error": boxes.localization_error(as_pairs, data.labels, data.boxes, top=5),
        "top5_cls_error": float(np.mean(cls_wrong)),
    }


# ---------------------------------------------------------------------------
# Command line: train, evaluate, and one image.


def evaluate_localizers(
    config: ml_collections.ConfigDict,
    workdirs: Sequence[str],
    classifier: str = "",
    num_images: int = 0,
    scales: Sequence[int] = (),
) -> dict[str, Any]:
    """Protocol (1) per net and protocol (2) for the union of the nets on the evaluation split."""
    loc_cfg = config.localization
    localizers = [Localizer.load(w) for w in workdirs]
    classifier = classifier or localizers[0].classifier
    if not classifier:
        raise ValueError("No classifier to rate boxes: pass --classifier RUN_OR_BUNDLE.")
    cls_member, _ = evaluate.load_network(classifier)
    crops, targets, labels = eval_crops(config)
    report: dict[str, Any] = {"central_crop": {}, "classifier": classifier}
    for w, loc in zip(workdirs, localizers, strict=True):
        outputs = predict_outputs(
            loc.member.model, loc.member.variables, loc.member.preprocess, crops
        )
        pred = np.asarray(class_boxes(jnp.asarray(outputs), jnp.asarray(labels), loc.head))
        error, mean_iou = central_crop_error(pred, targets)
        report["central_crop"][w] = {"loc_error": error, "mean_iou": mean_iou, "head": loc.head}
    bundle_results = checkpoints.load_bundle(workdirs[0]).metadata.get("results", {})
    mean_size = bundle_results.get("mean_box_size") or _mean_target_size(config)
    baseline, _ = central_crop_error(np.tile(centred_box(mean_size), (len(targets), 1)), targets)
    report["central_crop"]["fixed centred box"] = {"loc_error": baseline}
    n = int(num_images or loc_cfg.num_dense_eval)
    data = load_set(
        config, config.eval_split, n, loc_cfg.test_canvas_size, loc_cfg.test_scale_range, DENSE_SALT
    )
    scales = tuple(scales or loc_cfg.dense_scales)
    t0 = time.perf_counter()
    preds = dense_localize(
        localizers, cls_member, data.images, scales, merge_iou=float(loc_cfg.merge_iou)
    )
    report["dense"] = {**dense_errors(preds, data), "images": len(data), "scales": list(scales)}
    report["dense"]["seconds"] = time.perf_counter() - t0
    # The same classes with a fixed box (the image's centre, the training set's mean size).
    fixed = boxes.clip(boxes.decode(centred_box(mean_size)))
    fixed_preds = [[dataclasses.replace(p, box=fixed) for p in ps] for ps in preds]
    report["dense"]["fixed_box_top5_loc_error"] = dense_errors(fixed_preds, data)["top5_loc_error"]
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "Protocol (1): central crop, ground-truth class given",
        "| net | head | error | mean IoU |",
        "|---|---|---|---|",
    ]
    for name, r in report["central_crop"].items():
        iou = f"{r['mean_iou']:.3f}" if "mean_iou" in r else "-"
        lines.append(f"| {name} | {r.get('head', '-')} | {r['loc_error']:.3f} | {iou} |")
    d = report["dense"]
    lines += [
        "",
        f"Protocol (2): dense at Q={d['scales']}, nets merged, {d['images']} images",
        f"top-5 localisation error {d['top5_loc_error']:.3f} (top-1 {d['top1_loc_error']:.3f}); "
        f"same classes with a fixed centred box {d['fixed_box_top5_loc_error']:.3f}; "
        f"classification top-5 error {d['top5_cls_error']:.3f}",
    ]
    return "\n".join(lines)


def draw(
    image: np.ndarray, predictions: Sequence[Prediction], names: Sequence[str], output: str
) -> str:
    """The image with the predicted boxes, class names and probabilities, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig = Figure(figsize=(6, 6 * h / w))
    ax = fig.add_axes((0, 0, 1, 1))
    shown = image[..., 0] if image.shape[-1] == 1 else image
    ax.imshow(np.clip(shown, 0, 1), cmap="gray" if shown.ndim == 2 else None)
    colours = ("#ff3b30", "#ffcc00", "#34c759", "#0a84ff", "#bf5af2")
    for k, p in reversed(list(enumerate(predictions))):
        ymin, xmin, ymax, xmax = p.box * np.array([h, w, h, w])
        colour = colours[k % len(colours)]
        ax.add_patch(
            Rectangle((xmin - 0.5, ymin - 0.5), xmax - xmin, ymax - ymin, fill=False,
                      edgecolor=colour, linewidth=3 if k == 0 else 1.5)
        )  # fmt: skip
        ax.text(xmin, ymin - 0.5, f"{names[p.label]} {100 * p.probability:.0f}%", color="black",
                fontsize=11 if k == 0 else 8, va="bottom", backgroundcolor=colour)  # fmt: skip
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    fig.savefig(output, dpi=100)
    return output


def image_main(argv: Sequence[str]) -> str:
    """`python -m vgg_jax.localize IMAGE --workdir RUN [--workdir RUN2]`: draws the merged boxes."""
    p = argparse.ArgumentParser(
        prog="python -m vgg_jax.localize",
        description="Localise objects in an image (dense, merged boxes) and draw them (PNG).",
    )
    p.add_argument("image", help="JPEG/PNG file")
    p.add_argument("--workdir", action="append", required=True,
                   help="localisation run (repeat for a union of nets)")  # fmt: skip
    p.add_argument("--classifier", help="net that rates the boxes (default: the run's)")
    p.add_argument("--scales", help="test scales Q, comma-separated (default: the run's)")
    p.add_argument("--top", type=int, default=5, help="number of classes (boxes) to draw")
    p.add_argument("--output", help="PNG to write (default: IMAGE_boxes.png here)")
    args = p.parse_args(argv)
    try:
        localizers = [Localizer.load(w) for w in args.workdir]
        classifier = args.classifier or localizers[0].classifier
        if not classifier:
            raise ValueError("No classifier recorded in the run: pass --classifier.")
        member, _ = evaluate.load_network(classifier)
        channels = int(member.variables["params"]["features"]["conv1_1"]["kernel"].shape[2])
        image = image_io.load_image(args.image, channels)
        info = checkpoints.load_bundle(args.workdir[0]).metadata["localization"]
        scales = [int(q) for q in args.scales.split(",")] if args.scales else info["dense_scales"]
        scales = [q for q in scales if q >= member.model.image_size] or [member.model.image_size]
        (preds,) = dense_localize(
            localizers, member, [image], scales, top=max(1, args.top), merge_iou=info["merge_iou"]
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"Error: {e}") from None
    names = localizers[0].class_names
    output = args.output or os.path.splitext(os.path.basename(args.image))[0] + "_boxes.png"
    for pred in preds:
        box = ", ".join(f"{v:.3f}" for v in pred.box)
        print(f"{names[pred.label]}: {100 * pred.probability:.1f}%  box (ymin, xmin, ymax, xmax) "
              f"= ({box}), rating {pred.rating:.2f}")  # fmt: skip
    draw(image, preds, names, output)
    print(f"wrote {output}")
    return output


def _absl_main(argv: list[str]) -> None:
    from absl import flags
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO

    command = argv[1] if len(argv) > 1 else ""
    f = flags.FLAGS
    config = f.config
    try:
        if command == "train":
            if len(f.workdir) != 1:
                raise ValueError("train takes one --workdir.")
            train.use_compilation_cache()
            train_and_evaluate(config, f.workdir[0])
        else:
            report = evaluate_localizers(
                config, f.workdir, f.classifier, f.num_images,
                [int(q) for q in f.scales.split(",")] if f.scales else (),
            )  # fmt: skip
            print(format_report(report))
            if f.output:
                fileio.write_text_atomic(f.output, json.dumps(report, indent=2))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"Error: {e}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] in ("train", "evaluate"):
        from absl import app, flags
        from ml_collections import config_flags

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        config_flags.DEFINE_config_file("config", None, "Localisation config file[:variant].")
        flags.DEFINE_multi_string("workdir", None, "Run directory (evaluate: repeat for a union).")
        flags.DEFINE_string("classifier", "", "evaluate: the net that rates boxes.")
        flags.DEFINE_integer("num_images", 0, "evaluate: images for protocol (2).")
        flags.DEFINE_string("scales", "", "evaluate: test scales Q, comma-separated.")
        flags.DEFINE_string("output", "", "evaluate: write the report as JSON here.")
        flags.mark_flags_as_required(["config", "workdir"])
        app.run(_absl_main, argv=argv, flags_parser=train._parse_flags)
    else:
        image_main(argv[1:])


if __name__ == "__main__":
    main()
