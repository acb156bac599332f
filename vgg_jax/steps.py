"""The SGD step every task builds on: gradient accumulation, frozen layers, the plateau scale.

A task gives a loss, `loss_fn(params, batch_stats, batch, key) -> (mean loss,
({name: sum over rows}, batch_stats))`; `sgd_step` turns it into one update of
a `loop.TrainState` and `jit_step` compiles it with the state's shardings.

Gradient accumulation (`accum = k`) splits each global batch into k
micro-batches (rows j*k + i form micro-batch i, so every device keeps its
share) and averages their gradients: the same update as the unsplit batch,
except that dropout draws its masks per micro-batch (keys fold_in(step key, i))
and batch-norm statistics are per micro-batch. With dropout off and no BN the
update equals the unsplit one to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vgg_jax import loop, models, parallel

TrainState = loop.TrainState


# loss_fn(params, batch_stats, batch, key) -> (mean loss, ({name: sum over rows}, batch_stats))
LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Any]]


def sgd_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_fn: Callable,
    seed: int,
    accum: int,
    mesh: jax.sharding.Mesh,
    frozen: str = "",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD update on a global batch (accumulated over `accum` micro-batches), any loss.

    `frozen`: a top-level parameter group ("features") that gets no gradient and no update.
    Figures: "loss", "learning_rate" and, when the loss counts "correct" rows, "accuracy".
    """
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)

    def frozen_loss(params, batch_stats, micro, key):
        if frozen:  # no gradient into the frozen layers: XLA drops their backward pass
            params = {**params, frozen: jax.lax.stop_gradient(params[frozen])}
        return loss_fn(params, batch_stats, micro, key)

    grad_fn = jax.value_and_grad(frozen_loss, has_aux=True)
    rows = next(iter(batch.values())).shape[0]
    if accum == 1:
        (loss, (sums, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, batch, step_key
        )
    else:
        micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA))

        def split(x):  # rows j*accum + i -> micro-batch i; keeps each device's rows local
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, micro)

        def body(carry, xs):
            grads_sum, loss_sum, sums_total, stats = carry
            i, part = xs
            (loss, (sums, stats)), grads = grad_fn(
                state.params, stats, part, jax.random.fold_in(step_key, i)
            )
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            sums_total = jax.tree.map(jnp.add, sums_total, sums)
            return (grads_sum, loss_sum + loss, sums_total, stats), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[: rows // accum], dict(batch))
        sums_shape = jax.eval_shape(
            lambda: frozen_loss(state.params, state.batch_stats, first, step_key)[1][0]
        )
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        init = (zeros, jnp.zeros((), jnp.float32), sums0, state.batch_stats)
        (grads, loss, sums, batch_stats), _ = jax.lax.scan(
            body, init, (jnp.arange(accum), jax.tree.map(split, dict(batch)))
        )
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss = loss / accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if frozen:  # weight decay must not move the frozen layers either
        updates = {**updates, frozen: jax.tree.map(jnp.zeros_like, updates[frozen])}
    scale = state.plateau.scale
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    figures = {"loss": loss, "learning_rate": lr_fn(state.step) * scale}
    if "correct" in sums:
        figures["accuracy"] = sums["correct"] / rows
    return new_state, figures


def apply_train(model: models.VGG, variables: dict[str, Any], images: jax.Array, key: jax.Array):
    """The model in training mode: (outputs, updated batch_stats or the given ones)."""
    if "batch_stats" in variables:
        out, updated = model.apply(
            variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return out, updated["batch_stats"]
    return model.apply(variables, images, train=True, rngs={"dropout": key}), {}


def jit_step(step_fn: Callable, state_sharding: Any, mesh: jax.sharding.Mesh) -> Callable:
    """`step_fn(state, batch)` compiled with the state's shardings, the state donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def check_micro_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    micro = config.batch_size // config.grad_accum_steps
    if config.grad_accum_steps > 1 and micro % mesh.shape[parallel.DATA]:
        raise ValueError(
            f"Micro-batches of {micro} (batch_size / grad_accum_steps) do not divide across the "
            f"{mesh.shape[parallel.DATA]} devices of the 'data' axis; change grad_accum_steps."
        )
