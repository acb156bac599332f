"""Training: the paper's recipe (PAPER.md, section 2) as a sharded `jax.jit` train step.

`train_and_evaluate(config, workdir)` runs a whole experiment: the
classification task (`classification_task`: SGD + momentum and L2 weight decay
on cross-entropy, an evaluation after each epoch, the learning-rate schedule)
on the one training loop (`vgg_jax.loop`: resume, checkpoints, best variables,
SIGTERM, divergence stop, metrics and curves). The end-of-epoch evaluation is
the central crop (`config.train_eval="central"`) or the paper's dense protocol
(`"dense"`, at `config.train_eval_scales`); the data come from the input
pipeline unless a `Data` is passed (the tests' fake data).

    python -m vgg_jax.train --config configs/vgg16.py --workdir runs/vgg16
    python -m vgg_jax.train --config configs/fashion_mnist.py:quick --workdir runs/fm
    python -m vgg_jax.train --config configs/fashion_mnist.py --workdir runs/s --config.num_epochs=3

Reproducibility: the dropout key of step s is `fold_in(key(seed), s)` and the
input pipeline yields the batches of step s from (seed, s) alone, so a resumed
run repeats an uninterrupted one bit for bit (same device count).

Gradient accumulation (`grad_accum_steps = k`) averages the gradients of k
micro-batches of each global batch (`vgg_jax.steps` says how it splits them and
where it differs from the unsplit update).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vgg_jax import (
    backend,
    checkpoints,
    configuration,
    fileio,
    loop,
    models,
    parallel,
    steps,
    workdir_lock,
)
from vgg_jax import metrics as metrics_lib

log = logging.getLogger(__name__)

# The schedules and init modes the config module accepts (configuration.py owns the schema).
SCHEDULES = configuration.SCHEDULES
INIT_MODES = configuration.INIT_MODES
# Net A's layers that the paper copies into deeper nets (its first four convs and the FC head).
PAPER_A_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


# The loop's state and helpers, under the names other modules and tests know.
TrainState = loop.TrainState
Preemption = loop.Preemption
to_host = loop.to_host
save_config = loop.save_config


# ---------------------------------------------------------------------------
# Configuration (loading and validation live in vgg_jax.configuration).


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    steps = config.num_epochs * steps_per_epoch
    return min(steps, config.max_steps) if config.max_steps else steps


# ---------------------------------------------------------------------------
# Model, optimizer, state.


def create_model(config: ml_collections.ConfigDict) -> models.VGG:
    return models.create_model(config.model, **checkpoints.model_options_from_config(config))


def learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
    """Base learning rate per step (the plateau schedule scales it further, in the state)."""
    lr = float(config.learning_rate)
    # Linear warm-up from 0 over the first warmup_epochs; the schedule proper starts after it.
    warmup = round(float(config.get("warmup_epochs", 0.0)) * steps_per_epoch)
    if config.schedule == "step":
        base = optax.exponential_decay(
            lr, config.step_epochs * steps_per_epoch, config.step_factor, staircase=True
        )
    elif config.schedule == "cosine":
        base = optax.cosine_decay_schedule(
            lr, max(total_steps(config, steps_per_epoch) - warmup, 1)
        )
    else:
        base = optax.constant_schedule(lr)
    if warmup <= 0:
        return base
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), base], [warmup])


def weight_decay_mask(params: Any, decay_biases: bool) -> Any:
    """True for the leaves that get L2 weight decay: kernels, and biases if asked."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name == "kernel" or (decay_biases and name == "bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, params: Any):
    """SGD with momentum; the L2 penalty's gradient (wd * w) is added to the loss gradient."""
    return optax.chain(
        optax.add_decayed_weights(
            config.weight_decay, mask=weight_decay_mask(params, config.decay_biases)
        ),
        optax.trace(decay=config.momentum),
        optax.scale_by_learning_rate(learning_rate_fn(config, steps_per_epoch)),
    )


def create_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Divides the learning rate by 1/factor when validation error stalls, at most N times."""
    factor = float(config.plateau_factor)
    return optax.contrib.reduce_on_plateau(
        factor=factor,
        patience=int(config.plateau_patience),
        rtol=1e-4,
        atol=0.0,
        cooldown=0,
        accumulation_size=1,
        min_scale=factor ** int(config.plateau_max_reductions),
    )


def init_state(config, model, channels: int, steps_per_epoch: int) -> TrainState:
    size = config.image_size
    dummy = jnp.zeros((1, size, size, channels), jnp.float32)
    # RBG keys: the same distributions as threefry, but XLA compiles them in a fraction of
    # the time (init draws ~20 arrays; threefry compiles each into a long program on CPU).
    variables = model.init(jax.random.key(config.seed, impl="rbg"), dummy)
    params = variables["params"]
    tx = create_optimizer(config, steps_per_epoch, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        plateau=create_plateau(config).init(params),
    )


# ---------------------------------------------------------------------------
# Initialisation from another run or bundle.


def load_init_source(path: str) -> checkpoints.ModelBundle:
    """A weights name (e.g. "vgg16"), a model bundle, or a run's best (else latest) variables."""
    from vgg_jax import pretrained  # the one resolver of names, bundles and runs

    if not fileio.exists(path) and path not in pretrained.REGISTRY:
        raise FileNotFoundError(
            f"config.init_from={path!r} does not exist. Make it first: the previous stage's "
            "run (the :384 and :jitter variants start from the :256 and :384 runs, see "
            "configs/paper.py), or a bundle by `python -m vgg_jax.convert NAME --to PATH` (as "
            "the config file's docstring shows); or point --config.init_from at a run, a "
            f"model bundle or a weights name ({', '.join(pretrained.names())})."
        )
    return pretrained.resolve(path, "best")


def transfer_params(target: Any, source: Any, mode: str, say: Callable[[str], None]) -> Any:
    """Copies source parameters into the freshly initialised `target` tree.

    mode "same": every parameter (the head stays new when the class count differs:
    fine-tuning). mode "paper_a": net A's conv1_1, conv2_1, conv3_1, conv3_2 and
    fc6-8 into a deeper net, the rest stays random (PAPER.md, section 2).
    """
    target = flax.core.unfreeze(target)
    src_feat, dst_feat = source.get("features", {}), target["features"]
    names = list(dst_feat) + ["fc6", "fc7", "fc8"]
    if mode == "paper_a":
        names = [n for n in names if n in PAPER_A_LAYERS]
    copied = []
    for name in names:
        # Every layer under `features` (conv and BN), not only the conv ones.
        src = src_feat.get(name) if name in dst_feat else source.get(name)
        dst = dst_feat[name] if name in dst_feat else target[name]
        if src is None:
            raise ValueError(f"init_from has no parameter {name!r}; it is not a compatible net.")
        for leaf in dst:
            got, want = np.shape(src[leaf]), np.shape(dst[leaf])
            if got != want:
                if name == "fc8":
                    say(
                        f"init_from: fc8/{leaf} has shape {got}, this model {want} (another "
                        "class count): the classifier head is re-initialised (fine-tuning)."
                    )
                    break
                raise ValueError(
                    f"init_from: parameter {name}/{leaf} has shape {got}, this model expects "
                    f"{want}. Use a checkpoint of the same model (init_from_mode='same') or "
                    "net A for init_from_mode='paper_a'."
                )
        else:
            for leaf in dst:
                dst[leaf] = jnp.asarray(src[leaf], dst[leaf].dtype)
            copied.append(name)
    say(f"init_from ({mode}): copied {', '.join(copied)}.")
    return target


def transfer_batch_stats(target: Any, source: Any) -> Any:
    """BN running statistics from `source` where a layer of the same shape exists there.

    Without them a fine-tuned BN net would start from mean 0 / variance 1 and evaluate
    wrongly until its statistics caught up.
    """
    target = flax.core.unfreeze(target)
    src_feat = (source or {}).get("features", {})
    for name, stats in target.get("features", {}).items():
        src = src_feat.get(name)
        if src is not None and all(np.shape(src.get(k)) == np.shape(v) for k, v in stats.items()):
            target["features"][name] = {k: jnp.asarray(src[k], v.dtype) for k, v in stats.items()}
    return target


# ---------------------------------------------------------------------------
# Steps.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def classification_loss(model: models.VGG) -> steps.LossFn:
    """Mean cross-entropy of batch["image"] against batch["label"]; counts the correct rows."""

    def loss_fn(params, batch_stats, batch, key):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        logits, batch_stats = steps.apply_train(model, variables, batch["image"], key)
        labels = batch["label"]
        loss = cross_entropy(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, ({"correct": correct}, batch_stats)

    return loss_fn


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: models.VGG,
    tx: optax.GradientTransformation,
    lr_fn: Callable,
    seed: int,
    accum: int,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One classification SGD update on a global batch (accumulated over `accum` micro-batches)."""
    batch = {"image": batch["image"], "label": batch["label"]}
    return steps.sgd_step(
        state, batch, loss_fn=classification_loss(model), tx=tx, lr_fn=lr_fn, seed=seed,
        accum=accum, mesh=mesh,
    )  # fmt: skip


def eval_step(
    params: Any, batch_stats: Any, batch: Mapping[str, jax.Array], *, model: models.VGG
) -> dict[str, jax.Array]:
    """Sums over the real (mask True) examples of a batch: loss, top-1 and top-5 hits, count."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = model.apply(variables, batch["image"], train=False)
    labels, mask = batch["label"], batch["mask"]
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = topk[:, 0] == labels
    top5 = jnp.any(topk == labels[:, None], axis=-1)
    return {
        "loss": jnp.sum(jnp.where(mask, cross_entropy(logits, labels), 0.0)),
        "top1": jnp.sum(top1 & mask),
        "top5": jnp.sum(top5 & mask),
        "count": jnp.sum(mask),
    }


# ---------------------------------------------------------------------------
# Data and evaluation.


@dataclasses.dataclass(frozen=True)
class Data:
    """Where the classification task's examples come from (tests pass tests/fake_data.py's).

    train_dataset(config, start_step=) and eval_dataset(config) yield this process's rows;
    dense_batches(config, scales, batch_size) yields (ImageSet, labels, mask) groups.
    """

    train_dataset: Callable[..., Iterator[dict[str, np.ndarray]]]
    eval_dataset: Callable[..., Iterator[dict[str, np.ndarray]]]
    steps_per_epoch: Callable[[ml_collections.ConfigDict], int]
    channels: Callable[[ml_collections.ConfigDict], int]
    dense_batches: Callable[..., Iterator[tuple[Any, np.ndarray, np.ndarray]]]


def pipeline_data() -> Data:
    """The real input pipeline (vgg_jax.input_pipeline, tf.data)."""
    from vgg_jax import input_pipeline

    return Data(
        train_dataset=input_pipeline.train_dataset,
        eval_dataset=input_pipeline.eval_dataset,
        steps_per_epoch=input_pipeline.steps_per_epoch,
        channels=lambda config: int(input_pipeline.get_source(config).channels),
        dense_batches=_dense_batches,
    )


def _dense_batches(config, scales, batch_size):
    from vgg_jax import evaluate

    return evaluate.dataset_batches(config, config.eval_split, scales, batch_size)


@jax.jit
def _add_trees(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def central_figures(config, data: Data, eval_fn: Callable, mesh, state: TrainState) -> dict:
    """The central-crop evaluation (at config.eval_scale) of the evaluation split."""
    from vgg_jax.bad_images import BadImageCounter

    bad_images, totals = BadImageCounter(), None
    for local in data.eval_dataset(config, bad_images=bad_images):
        batch = parallel.global_batch(local, mesh)
        out = eval_fn(state.params, state.batch_stats, batch)
        totals = out if totals is None else _add_trees(totals, out)
    if totals is None:
        raise ValueError(f"The evaluation split {config.eval_split!r} yielded no batches.")
    t = to_host(totals)
    count = max(int(t["count"]), 1)
    figures = {
        "eval_loss": float(t["loss"]) / count,
        "eval_top1_accuracy": float(t["top1"]) / count,
        "eval_top5_accuracy": float(t["top5"]) / count,
    }
    skipped = int(parallel.per_process([bad_images.total]).sum())  # of every process
    if skipped:  # left out of the figures above
        figures["eval_bad_images"] = float(skipped)
    return figures


def dense_figures(config, data: Data, model: models.VGG, state: TrainState) -> dict[str, float]:
    """The paper's dense multi-scale protocol (protocols.DenseEvaluator) on the evaluation split.

    The batches hold raw pixels in [0, 1]; the evaluator normalises them as training does.
    Its network calls are those of `vgg_jax.evaluate` (the same batch size, and the same
    jitted function where the run's model and preprocessing compare equal to the bundle's),
    so that a test protocol run after training in this process reuses the compilation (the
    demo's: 4 lru hits of `protocols._dense_fn`, no new executable; RESULTS.md, 3 December).
    """
    from vgg_jax import evaluate, protocols

    scales = tuple(int(q) for q in config.train_eval_scales) or (int(config.eval_scale),)
    dense = protocols.DenseEvaluator(
        model,
        to_host(loop.variables_of(state)),
        scales,
        flip=False,
        preprocess=checkpoints.Preprocessing.from_config(config),
        batch_size=evaluate.default_batch_size(scales),
    )
    counts = metrics_lib.ErrorCounts()
    for images, labels, mask in data.dense_batches(config, scales, int(config.eval_batch_size)):
        counts.update(dense.predict(images), labels, mask)
    counts = counts.all_processes()
    return {
        "eval_top1_accuracy": 1.0 - counts.top1_error,
        "eval_top5_accuracy": 1.0 - counts.top5_error,
    }


EVALUATIONS = ("central", "dense")


def _describe(spe: int) -> Callable[[int, Mapping[str, float]], str]:
    def describe(step, ev):
        skipped = int(ev.get("eval_bad_images", 0))
        return (
            f"step {step} (epoch {step / spe:.2f}): validation top-1 "
            f"{ev['eval_top1_accuracy']:.4f}, top-5 {ev['eval_top5_accuracy']:.4f}"
            + (f" ({skipped} undecodable images skipped)" if skipped else "")
        )

    return describe


# ---------------------------------------------------------------------------
# The classification task.


def initial_state(config, model, channels, spe, sharding, say) -> TrainState:
    """A fresh state on `sharding`, or one that starts from config.init_from."""
    init = jax.jit(lambda: init_state(config, model, channels, spe), out_shardings=sharding)
    state = init()
    if not config.init_from:
        return state
    source = load_init_source(config.init_from)
    params = transfer_params(
        to_host(state.params), source.variables["params"], config.init_from_mode, say
    )
    params = jax.device_put(params, sharding.params)
    tx = create_optimizer(config, spe, params)
    state = state.replace(
        params=params, opt_state=jax.device_put(tx.init(params), sharding.opt_state)
    )
    if state.batch_stats:
        stats = transfer_batch_stats(
            to_host(state.batch_stats), source.variables.get("batch_stats", {})
        )
        state = state.replace(batch_stats=jax.device_put(stats, sharding.batch_stats))
    return state


def classification_task(config: ml_collections.ConfigDict, data: Data) -> loop.Task:
    """Image classification with cross-entropy: the paper's training (section 2)."""
    if config.train_eval not in EVALUATIONS:
        raise ValueError(f"config.train_eval={config.train_eval!r}; choose one of {EVALUATIONS}.")
    mesh = parallel.create_mesh(config)
    parallel.check_batch(config.batch_size, mesh)
    parallel.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
    steps.check_micro_batches(config, mesh)
    model = create_model(config)
    spe = data.steps_per_epoch(config)
    channels = data.channels(config)
    shapes = jax.eval_shape(lambda: init_state(config, model, channels, spe))
    sharding = parallel.tree_shardings(shapes, mesh)
    tx = create_optimizer(config, spe, shapes.params)
    step_fn = functools.partial(
        train_step, model=model, tx=tx, lr_fn=learning_rate_fn(config, spe), seed=config.seed,
        accum=config.grad_accum_steps, mesh=mesh,
    )  # fmt: skip
    if config.train_eval == "dense":
        figures = ("eval_top1_accuracy", "eval_top5_accuracy")
        evaluate = functools.partial(dense_figures, config, data, model)
    else:
        figures = ("eval_loss", "eval_top1_accuracy", "eval_top5_accuracy")
        eval_fn = jax.jit(
            functools.partial(eval_step, model=model),
            in_shardings=(sharding.params, sharding.batch_stats, parallel.batch_sharding(mesh)),
            out_shardings=parallel.replicated(mesh),
        )
        evaluate = functools.partial(central_figures, config, data, eval_fn, mesh)
    from vgg_jax.bad_images import BadImageCounter

    bad_images = BadImageCounter()
    return loop.Task(
        config=config,
        model=model,
        mesh=mesh,
        steps_per_epoch=spe,
        total_steps=total_steps(config, spe),
        abstract_state=shapes,
        state_sharding=sharding,
        init_state=functools.partial(initial_state, config, model, channels, spe, sharding),
        batches=lambda start: data.train_dataset(config, start_step=start, bad_images=bad_images),
        train_step=steps.jit_step(step_fn, sharding, mesh),
        evaluate=evaluate,
        eval_figures=figures,
        plateau_metric=config.plateau_metric or "eval_top1_accuracy",
        best_metric=config.best_metric or "eval_top1_accuracy",
        plateau=create_plateau(config),
        describe_eval=_describe(spe),
        bad_images=bad_images,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, data: Data | None = None
) -> dict[str, Any]:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the final figures.

    `data`: where the examples come from (default: the input pipeline).
    """
    configuration.validate_config(config)
    parallel.initialize_distributed(config)
    outcome = loop.run(classification_task(config, data or pipeline_data()), workdir)
    summary = outcome.summary
    if outcome.complete and "eval_top1_accuracy" in summary and parallel.is_main_process():
        best = summary.get("best_value")
        metrics_lib.ProgressBar(1, 1, enabled=False).message(
            f"Finished step {summary['step']}: validation top-1 "
            f"{summary['eval_top1_accuracy']:.4f} (best {math.nan if best is None else best:.4f})."
            f" Curves: {fileio.join(fileio.absolute(workdir), metrics_lib.CURVES_FILE)}"
        )
    if outcome.complete and config.get("test_when_complete", False):
        summary["test"] = run_test_protocols(workdir)
    return summary


def run_test_protocols(workdir: str) -> dict[str, Any]:
    """`vgg_jax.evaluate --workdir` on a complete run, in this process (test_when_complete).

    Every module it needs is imported and the data are prepared already, so the
    evaluation costs its forward passes; the result is stored where the command
    finds it (a complete run asked again prints it without evaluating).
    """
    from vgg_jax import evaluate

    # What the training left for the cycle collector (TensorFlow graphs of its streams,
    # the curves' figure): collected first, the evaluation ran 1.9x as fast after 20
    # steps (948 -> 1,778 images/s; benchmarks/RESULTS.md, "in the trainer's process").
    gc.collect()
    return evaluate.main(["--workdir", workdir])


# ---------------------------------------------------------------------------
# Command line.


def use_compilation_cache() -> None:
    """Caches compiled steps on disk, so a resumed or repeated run starts in seconds.

    VGG_JAX_COMPILATION_CACHE names the directory ("" turns the cache off).
    """
    cache = os.environ.get("VGG_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/vgg_jax/jax"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)


def main(argv: list[str]) -> None:
    from absl import flags
    from absl import logging as absl_logging

    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the input pipeline imports TF
    config = flags.FLAGS.config
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    backend.reuse_host_buffers()
    use_compilation_cache()
    try:
        train_and_evaluate(config, flags.FLAGS.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError, workdir_lock.WorkdirInUse) as e:
        sys.exit(f"Error: {e}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file, e.g. configs/vgg16.py or configs/x.py:variant."
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and curves.")
    flags.mark_flags_as_required(["config", "workdir"])


USAGE = """
usage: python -m vgg_jax.train --config FILE.py[:variant] --workdir DIR [--config.FIELD=VALUE ...]

Trains a VGG network as the config says, into DIR (config.json, checkpoints/, best/,
metrics.jsonl, curves.png). Running the same command again resumes the run; SIGTERM or
Ctrl-C saves the step first; a finished run says so and changes nothing.

  python -m vgg_jax.train --config configs/fashion_mnist.py:quick --workdir runs/fm
  python -m vgg_jax.train --config configs/vgg16.py --workdir runs/vgg16_256 \\
      --config.batch_size=128 --config.grad_accum_steps=2

--config         the experiment: a config file of configs/, with :variant where it has some
--workdir        the run directory (local, or gs://... on TPU pods)
--config.FIELD   override one field; `python -m vgg_jax.configuration FILE` lists them
"""

if __name__ == "__main__":
    from absl import app

    from vgg_jax import cli

    _define_flags()
    cli.run(app.run, main, flags_parser=configuration.flags_parser(USAGE))
