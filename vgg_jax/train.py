"""Training: the paper's recipe (PAPER.md, section 2) as a sharded `jax.jit` train step.

`train_and_evaluate(config, workdir)` runs a whole experiment: it resumes from
the newest checkpoint in `workdir` if there is one, trains with SGD + momentum
and L2 weight decay, evaluates after each epoch, adapts the learning rate
(plateau, step or cosine), checkpoints, and writes metrics and curves.

    python -m vgg_jax.train --config configs/vgg16.py --workdir runs/vgg16
    python -m vgg_jax.train --config configs/fashion_mnist.py:quick --workdir runs/fm \
        --config.num_epochs=3

Reproducibility: the dropout key of step s is `fold_in(key(seed), s)` and the
input pipeline yields the batches of step s from (seed, s) alone, so a resumed
run repeats an uninterrupted one bit for bit (same device count).

Gradient accumulation (`grad_accum_steps = k`) splits each global batch into k
micro-batches (rows j*k + i form micro-batch i, so every device keeps its
share) and averages their gradients: the same update as the unsplit batch,
except that dropout draws its masks per micro-batch (keys fold_in(step key, i))
and batch-norm statistics are per micro-batch. With dropout off and no BN the
update equals the unsplit one to float rounding.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from vgg_jax import backend, checkpoints, fileio, models, parallel
from vgg_jax import metrics as metrics_lib

log = logging.getLogger(__name__)

SCHEDULES = ("plateau", "step", "cosine", "constant")
INIT_MODES = ("same", "paper_a")
# Net A's layers that the paper copies into deeper nets (its first four convs and the FC head).
PAPER_A_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")
# Fields a config may carry beyond configs/default.py (read with config.get by other modules).
# "localization": the box-regression settings of vgg_jax.localize (configs/localize_*.py).
EXTRA_FIELDS = ("channel_order", "decode_crop", "description", "localization")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: the step, variables, optimizer and plateau state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    plateau: Any  # optax.contrib.ReduceLROnPlateauState (scale 1 for other schedules)


# ---------------------------------------------------------------------------
# Configuration checks.


def load_config_file(path: str, hint: str = "") -> ml_collections.ConfigDict:
    """get_config([variant]) of a config file given as FILE.py[:variant].

    A missing file raises FileNotFoundError; `hint` ends its message (what to pass instead).
    """
    import importlib.util

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
            f"config.init_from={path!r} does not exist. Train the previous stage there first "
            "(the :384 and :jitter variants start from the :256 and :384 runs, see "
            "configs/paper.py), or point --config.init_from at a run, a model bundle or a "
            f"weights name ({', '.join(pretrained.names())})."
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
    """One SGD update on a global batch (accumulated over `accum` micro-batches)."""
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)
    has_bn = bool(state.batch_stats)

    def loss_fn(params, batch_stats, images, labels, key):
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = batch_stats
            logits, updated = model.apply(
                variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
            batch_stats = updated["batch_stats"]
        else:
            logits = model.apply(variables, images, train=True, rngs={"dropout": key})
        loss = cross_entropy(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (correct, batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    images, labels = batch["image"], batch["label"]
    if accum == 1:
        (loss, (correct, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, images, labels, step_key
        )
    else:
        micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA))

        def split(x):  # rows j*accum + i -> micro-batch i; keeps each device's rows local
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, micro)

        def body(carry, xs):
            grads_sum, loss_sum, correct_sum, stats = carry
            i, imgs, lbls = xs
            (loss, (correct, stats)), grads = grad_fn(
                state.params, stats, imgs, lbls, jax.random.fold_in(step_key, i)
            )
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, correct_sum + correct, stats), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), state.batch_stats)
        (grads, loss, correct, batch_stats), _ = jax.lax.scan(
            body, init, (jnp.arange(accum), split(images), split(labels))
        )
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss = loss / accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    scale = state.plateau.scale
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    figures = {
        "loss": loss,
        "accuracy": correct / labels.shape[0],
        "learning_rate": lr_fn(state.step) * scale,
    }
    return new_state, figures


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


def to_host(tree: Any) -> Any:
    """Fetches replicated arrays (works for arrays spanning several processes, too)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------
# The run.


class Preemption:
    """Turns SIGTERM into a flag that the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class _Run:
    """What the loop shares: config, mesh, compiled steps, managers, writers."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    model: models.VGG
    steps_per_epoch: int
    total_steps: int
    state_sharding: Any
    train_step: Callable
    eval_step: Callable
    plateau: Any
    plateau_update: Callable
    manager: ocp.CheckpointManager
    best: ocp.CheckpointManager
    writer: metrics_lib.MetricsWriter
    bar: metrics_lib.ProgressBar
    meta: dict[str, Any]

    def say(self, text: str) -> None:
        if parallel.is_main_process():
            self.bar.message(text)


def input_channels(config: ml_collections.ConfigDict) -> int:
    """Channels of the dataset's images (1 for Fashion-MNIST, 3 for ImageNet)."""
    from vgg_jax import input_pipeline

    return int(input_pipeline.get_source(config).channels)


def _data():
    from vgg_jax import input_pipeline

    return input_pipeline


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """workdir/config.json: what `checkpoints.load_workdir` and evaluators read back."""
    text = json.dumps(config.to_dict(), indent=2, default=str)
    fileio.write_text_atomic(fileio.join(workdir, checkpoints.CONFIG_FILE), text)


def _abstract_state(config, model, channels, spe, mesh) -> tuple[Any, Any]:
    shapes = jax.eval_shape(lambda: init_state(config, model, channels, spe))
    sharding = parallel.tree_shardings(shapes, mesh)
    return shapes, sharding


def _restore(run: _Run, step: int, shapes: Any) -> tuple[TrainState, dict[str, Any]]:
    """The state saved at `step`, checked against the model first (naming a mismatch)."""
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        run.state_sharding,
    )
    source = fileio.join(run.workdir, checkpoints.STATE_DIR, str(step))
    return checkpoints.restore_state(run.manager, step, run.model, target, source)


def _save(run: _Run, state: TrainState, finished: bool = False) -> None:
    step = int(to_host(state.step))
    meta = {**run.meta, "finished": finished, "epoch": step / run.steps_per_epoch}
    checkpoints.save_state(run.manager, step, state, meta)


def _evaluate(run: _Run, state: TrainState) -> dict[str, float]:
    config = run.config
    totals = None
    for local in _data().eval_dataset(config):
        batch = parallel.global_batch(local, run.mesh)
        out = run.eval_step(state.params, state.batch_stats, batch)
        totals = out if totals is None else _add_trees(totals, out)
    if totals is None:
        raise ValueError(f"The evaluation split {config.eval_split!r} yielded no batches.")
    t = to_host(totals)
    count = max(int(t["count"]), 1)
    return {
        "eval_loss": float(t["loss"]) / count,
        "eval_top1_accuracy": float(t["top1"]) / count,
        "eval_top5_accuracy": float(t["top5"]) / count,
    }


@jax.jit
def _add_trees(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _after_eval(run: _Run, state: TrainState, figures: dict[str, float]) -> TrainState:
    """Feeds validation top-1 error to the plateau schedule; keeps the best variables."""
    step = int(to_host(state.step))
    if run.config.schedule == "plateau":
        error = np.float32(1.0 - figures["eval_top1_accuracy"])
        _, plateau = run.plateau_update(state.plateau, error)
        old = float(to_host(state.plateau.scale))
        new = float(to_host(plateau.scale))
        if new < old:
            run.say(f"Validation accuracy stalled: learning rate x{new / old:g} (scale {new:g}).")
        state = state.replace(plateau=plateau)
    if figures["eval_top1_accuracy"] > run.meta.get("best_accuracy", -1.0):
        run.meta["best_accuracy"] = figures["eval_top1_accuracy"]
        run.meta["best_step"] = step
        if step not in run.best.all_steps():
            variables = {"params": state.params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
            run.best.save(
                step,
                args=ocp.args.Composite(variables=ocp.args.StandardSave(variables)),
                metrics={"eval_top1_accuracy": figures["eval_top1_accuracy"]},
            )
    return state


class _Logger:
    """Holds per-step figures on device; fetches, checks and writes them every N steps."""

    def __init__(self, run: _Run, start_step: int):
        self.run = run
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.last_time = time.perf_counter()
        self.last_step = start_step
        self.seconds_per_step = math.nan

    def add(self, step: int, figures: dict[str, jax.Array]) -> None:
        self.pending.append((step, figures))

    def flush(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """Fetches pending figures; raises on a non-finite loss, naming its step."""
        run = self.run
        if not self.pending:
            return {}
        fetched = to_host([f for _, f in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        for s, f in zip(steps, fetched, strict=True):
            if not np.isfinite(f["loss"]):
                last = run.manager.latest_step()
                raise FloatingPointError(
                    f"The training loss is {float(f['loss'])} at step {s}: training stopped. "
                    f"The last good checkpoint (step {last}) in {run.workdir} is kept; lower "
                    "config.learning_rate or check the input data, then run again."
                )
        now = time.perf_counter()
        done = steps[-1] - self.last_step
        elapsed = now - self.last_time
        self.last_time, self.last_step = now, steps[-1]
        if done > 0:
            self.seconds_per_step = elapsed / done
        figures = {
            "train_loss": float(np.mean([f["loss"] for f in fetched])),
            "train_accuracy": float(np.mean([f["accuracy"] for f in fetched])),
            "learning_rate": float(fetched[-1]["learning_rate"]),
            "images_per_second": run.config.batch_size / self.seconds_per_step if done > 0 else 0.0,
        }
        figures.update(extra or {})
        step = steps[-1]
        if parallel.is_main_process():
            run.writer.write(step, step / run.steps_per_epoch, figures)
            run.bar.update(step, figures, self.seconds_per_step)
        return figures


def _setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[_Run, Any]:
    mesh = parallel.create_mesh(config)
    parallel.check_batch(config.batch_size, mesh)
    parallel.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
    micro = config.batch_size // config.grad_accum_steps
    if config.grad_accum_steps > 1 and micro % mesh.shape[parallel.DATA]:
        raise ValueError(
            f"Micro-batches of {micro} (batch_size / grad_accum_steps) do not divide across the "
            f"{mesh.shape[parallel.DATA]} devices of the 'data' axis; change grad_accum_steps."
        )
    model = create_model(config)
    spe = _data().steps_per_epoch(config)
    channels = input_channels(config)
    shapes, state_sharding = _abstract_state(config, model, channels, spe, mesh)
    tx = create_optimizer(config, spe, shapes.params)
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        lr_fn=learning_rate_fn(config, spe),
        seed=config.seed,
        accum=config.grad_accum_steps,
        mesh=mesh,
    )
    repl = parallel.replicated(mesh)
    batch_sh = parallel.batch_sharding(mesh)
    jit_train = jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sh),
        out_shardings=(state_sharding, repl),
        donate_argnums=0,
    )
    jit_eval = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_sharding.params, state_sharding.batch_stats, batch_sh),
        out_shardings=repl,
    )
    main = parallel.is_main_process()
    total = total_steps(config, spe)
    plateau = create_plateau(config)
    run = _Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        model=model,
        steps_per_epoch=spe,
        total_steps=total,
        state_sharding=state_sharding,
        train_step=jit_train,
        eval_step=jit_eval,
        plateau=plateau,
        plateau_update=jax.jit(
            lambda state, value: plateau.update(updates={}, state=state, value=value),
            out_shardings=repl,
        ),
        manager=checkpoints.state_manager(workdir, keep=config.keep_checkpoints),
        best=checkpoints.best_manager(workdir),
        writer=metrics_lib.MetricsWriter(
            workdir, enabled=main, tensorboard=config.get("tensorboard", True)
        ),
        bar=metrics_lib.ProgressBar(total, spe, enabled=main and config.progress_bar),
        meta={"model": config.model, "best_accuracy": -1.0, "best_step": -1},
    )
    return run, (shapes, channels)


def _initial_state(run: _Run, shapes: Any, channels: int) -> TrainState:
    config = run.config
    init = jax.jit(
        lambda: init_state(config, run.model, channels, run.steps_per_epoch),
        out_shardings=run.state_sharding,
    )
    state = init()
    if config.init_from:
        source = load_init_source(config.init_from)
        params = transfer_params(
            to_host(state.params), source.variables["params"], config.init_from_mode, run.say
        )
        params = jax.device_put(params, run.state_sharding.params)
        tx = create_optimizer(config, run.steps_per_epoch, params)
        state = state.replace(
            params=params, opt_state=jax.device_put(tx.init(params), run.state_sharding.opt_state)
        )
        if state.batch_stats:
            stats = transfer_batch_stats(
                to_host(state.batch_stats), source.variables.get("batch_stats", {})
            )
            state = state.replace(batch_stats=jax.device_put(stats, run.state_sharding.batch_stats))
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the final figures."""
    validate_config(config)
    parallel.initialize_distributed(config)
    workdir = fileio.absolute(workdir)
    fileio.makedirs(workdir)
    run, (shapes, channels) = _setup(config, workdir)
    latest = run.manager.latest_step()
    if latest is not None:
        state, meta = _restore(run, latest, shapes)
        run.meta.update({k: v for k, v in meta.items() if k in ("best_accuracy", "best_step")})
        if latest >= run.total_steps:
            run.say(
                f"The run in {workdir} is complete (step {latest} of {run.total_steps}, best "
                f"validation top-1 {run.meta['best_accuracy']:.4f}); nothing to do. Use a new "
                "--workdir to train again, or raise num_epochs/max_steps to continue."
            )
            run.manager.close()
            run.best.close()
            return {"step": latest, "complete": True, **run.meta}
        run.say(f"Resuming from step {latest} in {workdir}.")
    else:
        if parallel.is_main_process():
            save_config(config, workdir)
        state = _initial_state(run, shapes, channels)
    try:
        return _loop(run, state)
    finally:
        run.manager.wait_until_finished()
        run.best.wait_until_finished()
        run.manager.close()
        run.best.close()
        run.writer.close()


def _loop(run: _Run, state: TrainState) -> dict[str, Any]:
    config = run.config
    step = int(to_host(state.step))
    data: Iterator = _data().train_dataset(config, start_step=step)
    logger = _Logger(run, step)
    figures: dict[str, float] = {}
    with Preemption() as preemption:
        while step < run.total_steps:
            batch = parallel.global_batch(next(data), run.mesh)
            state, step_figures = run.train_step(state, batch)
            step += 1
            logger.add(step, step_figures)
            epoch_end = step % run.steps_per_epoch == 0
            last = step == run.total_steps
            evaluate = last or (
                epoch_end and (step // run.steps_per_epoch) % config.eval_every_epochs == 0
            )
            save = epoch_end or last or step % config.checkpoint_every_steps == 0
            if evaluate:
                logger.flush()
                ev = _evaluate(run, state)
                state = _after_eval(run, state, ev)
                run.say(
                    f"step {step} (epoch {step / run.steps_per_epoch:.2f}): validation top-1 "
                    f"{ev['eval_top1_accuracy']:.4f}, top-5 {ev['eval_top5_accuracy']:.4f}"
                )
                figures = logger.flush(ev) or figures
                if parallel.is_main_process():
                    run.writer.write(step, step / run.steps_per_epoch, ev)
                figures.update(ev)
            elif step % config.log_every_steps == 0 or save:
                figures = logger.flush() or figures
            if save:
                _save(run, state, finished=last)
            if preemption.requested and not last:
                logger.flush()
                _save(run, state)
                run.manager.wait_until_finished()
                run.say(f"SIGTERM: saved step {step} in {run.workdir}; run again to resume.")
                return {"step": step, "preempted": True, **figures}
    run.manager.wait_until_finished()
    if parallel.is_main_process():
        metrics_lib.plot_curves(run.workdir)
        final = figures.get("eval_top1_accuracy", math.nan)
        run.say(
            f"Finished step {step}: validation top-1 {final:.4f}"
            f" (best {run.meta['best_accuracy']:.4f}). Curves: "
            f"{fileio.join(run.workdir, metrics_lib.CURVES_FILE)}"
        )
    return {"step": step, "complete": True, **figures, **run.meta}


# ---------------------------------------------------------------------------
# Command line.


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns config override errors into one clear line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        message = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
        sys.exit(f"Bad command line: {message}")


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
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"Error: {e}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file, e.g. configs/vgg16.py or configs/x.py:variant."
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and curves.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)
