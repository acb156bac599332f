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
classifier), `config.json`, `metrics.jsonl`, the training checkpoints
(`checkpoints/`), from which a killed run resumes, and `best/` (the lowest
validation localisation error). Training is a task of the one loop
(`vgg_jax.loop`, `localization_task`): multi-host, `grad_accum_steps`, the
plateau schedule on `eval_loc_error`. Protocol (2) and the command line are in
`vgg_jax.localize_eval`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax import (
    boxes,
    checkpoints,
    configuration,
    fileio,
    image_io,
    localize_config,
    loop,
    models,
    parallel,
    steps,
    train,
)
from vgg_jax import localization_data as ldata
from vgg_jax import metrics as metrics_lib

# The config block's choices live with its schema (vgg_jax/localize_config.py).
TASKS, HEADS, FINE_TUNE = localize_config.TASKS, localize_config.HEADS, localize_config.FINE_TUNE
SCHEDULES = localize_config.SCHEDULES
CANVAS_DATASET = "fashion_mnist_canvas"
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
    """The classification checks plus config.localization's schema (localize_config.py)."""
    configuration.validate_config(config, task=localize_config.NAME)


def load_config(path: str) -> ml_collections.ConfigDict:
    """A config file FILE.py[:variant] (its get_config)."""
    return configuration.load_config_file(path)


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
# Training: the localisation task on the one loop (vgg_jax.loop).

# The figures each task's evaluation returns; the first drives the plateau and best checkpoint.
EVAL_FIGURES = {
    "localize": ("eval_loc_error", "eval_mean_iou"),
    "classify": ("eval_top1_accuracy",),
}

Batches = Callable[[ml_collections.ConfigDict, int], Iterator[dict[str, np.ndarray]]]


def local_rows(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch (every process builds the same global one)."""
    pi, pc = jax.process_index(), jax.process_count()
    for batch in batches:
        n = len(next(iter(batch.values()))) // pc
        yield {k: v[pi * n : (pi + 1) * n] for k, v in batch.items()}


def localization_loss(config: ml_collections.ConfigDict, model: models.VGG) -> steps.LossFn:
    """Cross-entropy (task "classify") or the Euclidean box loss (task "localize")."""
    loc = config.localization
    preprocess = checkpoints.Preprocessing.from_config(config)

    def loss_fn(params, batch_stats, batch, key):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        outputs, batch_stats = steps.apply_train(model, variables, preprocess(batch["image"]), key)
        if loc.task == "classify":
            loss = train.cross_entropy(outputs, batch["label"]).mean()
            correct = jnp.sum(jnp.argmax(outputs, -1) == batch["label"])
            return loss, ({"correct": correct}, batch_stats)
        predicted = class_boxes(outputs, batch["label"], loc.head)
        return boxes.euclidean_loss(predicted, batch["target"]), ({}, batch_stats)

    return loss_fn


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


def evaluate_crops(config, model, variables, crops, targets, labels) -> dict[str, float]:
    """Protocol (1) on held-out crops: top-1 accuracy (classify) or localisation error."""
    preprocess = checkpoints.Preprocessing.from_config(config)
    outputs = predict_outputs(model, variables, preprocess, crops, config.eval_batch_size)
    if config.localization.task == "classify":
        return {"eval_top1_accuracy": float(np.mean(np.argmax(outputs, -1) == labels))}
    predicted = np.asarray(
        class_boxes(jnp.asarray(outputs), jnp.asarray(labels), config.localization.head)
    )
    error, mean_iou = central_crop_error(predicted, targets)
    return {"eval_loc_error": error, "eval_mean_iou": mean_iou}


def _evaluate_state(config, model, eval_set, state: train.TrainState) -> dict[str, float]:
    # Every process evaluates the same crops on its own copy of the (replicated) variables.
    return evaluate_crops(config, model, loop.to_host(loop.variables_of(state)), *eval_set)


def localization_task(config: ml_collections.ConfigDict, batches: Batches) -> loop.Task:
    """The box-regression (or rating-classifier) net of `config` as a task of the loop."""
    mesh = parallel.create_mesh(config)
    parallel.check_batch(config.batch_size, mesh)
    steps.check_micro_batches(config, mesh)
    model = create_model(config)
    spe = steps_per_epoch(config)
    eval_set = eval_crops(config)
    channels = eval_set[0].shape[-1]
    shapes = jax.eval_shape(lambda: train.init_state(config, model, channels, spe))
    sharding = parallel.tree_shardings(shapes, mesh)
    tx = train.create_optimizer(config, spe, shapes.params)
    step_fn = functools.partial(
        steps.sgd_step,
        loss_fn=localization_loss(config, model),
        tx=tx,
        lr_fn=train.learning_rate_fn(config, spe),
        seed=config.seed,
        accum=config.grad_accum_steps,
        mesh=mesh,
        frozen="features" if config.localization.fine_tune == "fc" else "",
    )
    figures = EVAL_FIGURES[config.localization.task]
    return loop.Task(
        config=config,
        model=model,
        mesh=mesh,
        steps_per_epoch=spe,
        total_steps=train.total_steps(config, spe),
        abstract_state=shapes,
        state_sharding=sharding,
        init_state=functools.partial(
            train.initial_state, config, model, channels, spe, sharding
        ),
        batches=lambda start: local_rows(batches(config, start)),
        train_step=steps.jit_step(step_fn, sharding, mesh),
        evaluate=functools.partial(_evaluate_state, config, model, eval_set),
        eval_figures=figures,
        plateau_metric=config.plateau_metric or figures[0],
        best_metric=config.best_metric or figures[0],
        plateau=train.create_plateau(config),
        plot_curves=False,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, batches: Batches | None = None
) -> dict[str, Any]:
    """Trains (or resumes) the localisation or rating classifier net of `config` in workdir.

    The one loop (vgg_jax.loop) checkpoints, resumes exactly, stops on SIGTERM or
    divergence and keeps the best variables (workdir/best). The finished net is
    saved as a model bundle in the workdir; a workdir that already holds one is
    left alone. `batches(config, start_step)`: the global training batches
    (default `train_batches`).
    """
    validate_config(config)
    parallel.initialize_distributed(config)
    batches = batches or train_batches
    workdir = fileio.absolute(workdir)
    if checkpoints.is_bundle(workdir):
        meta = checkpoints.load_bundle(workdir).metadata
        print(f"{workdir} already holds a trained net; nothing to do. Use a new --workdir.")
        return {"complete": True, **meta.get("results", {})}
    task = localization_task(config, batches)
    outcome = loop.run(task, workdir)
    if not outcome.complete:
        return {"step": outcome.summary["step"], "preempted": True}
    results = {
        **outcome.meta.get("eval", {}),
        "steps": task.total_steps,
        "seconds": outcome.meta.get("seconds", 0.0),
    }
    say = metrics_lib.ProgressBar(1, 1, enabled=False).message
    if config.localization.task == "localize":
        targets = _eval_targets(config)
        mean_size = mean_target_size(config, batches)
        baseline, _ = central_crop_error(
            np.tile(centred_box(mean_size), (len(targets), 1)), targets
        )
        results.update({"baseline_loc_error": baseline, "mean_box_size": list(mean_size)})
        if parallel.is_main_process():
            say(f"fixed centred box of the mean training size: error {baseline:.4f}")
    _save(config, workdir, loop.to_host(loop.variables_of(outcome.state)), results)
    if parallel.is_main_process():
        say(f"Saved the {config.localization.task} net in {workdir}.")
    return {"complete": True, **results}


def _eval_targets(config) -> np.ndarray:
    return eval_crops(config)[1]


def mean_target_size(config, batches: Batches = train_batches, n: int = 8) -> tuple[float, float]:
    """Mean (w, h) of training targets (the fixed-box baseline's size)."""
    data = batches(config, 0)
    sizes = np.concatenate([next(data)["target"][:, 2:] for _ in range(n)])
    return float(sizes[:, 0].mean()), float(sizes[:, 1].mean())


def _save(config, workdir: str, variables: Any, results: dict[str, Any]) -> None:
    """The finished net as a model bundle in the workdir (what `localize evaluate` reads).

    The bundle's orbax save is collective in a multi-host run: every process calls it;
    the others write to a scratch directory that is removed again.
    """
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
        variables=variables,
        preprocessing=checkpoints.Preprocessing.from_config(config),
        metadata=metadata,
    )
    if parallel.is_main_process():
        checkpoints.save_bundle(workdir, bundle)
        return
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="vgg_jax_bundle_")
    try:
        checkpoints.save_bundle(scratch, bundle)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _class_names(config) -> tuple[str, ...]:
    if config.dataset == CANVAS_DATASET:
        return ldata.FASHION_MNIST_CLASSES
    return tuple(f"class {i}" for i in range(int(config.num_classes)))


# ---------------------------------------------------------------------------
# Command line (vgg_jax.localize_eval: train, evaluate, one image).


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m vgg_jax.localize train|evaluate ...` or `... IMAGE --workdir RUN`."""
    from vgg_jax import localize_eval

    localize_eval.main(argv)


if __name__ == "__main__":
    from vgg_jax import cli

    cli.run(main)
