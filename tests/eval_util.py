"""A small random VGG-A and random images, shared by the protocol and evaluator tests."""

import jax
import jax.numpy as jnp
import numpy as np
from weights_util import rbg_key

from vgg_jax import models

SIZE = 32
OPTIONS = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=SIZE)


def random_net():
    """VGG-A, tiny widths, non-zero biases (so that zero padding is not accidentally harmless)."""
    model = models.create_model("A", **OPTIONS)
    variables = jax.jit(model.init)(rbg_key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda x: np.asarray(x) + np.float32(0.05) * rng.standard_normal(x.shape, np.float32),
        variables,
    )
    return model, variables


def images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((h, w, 3), dtype=np.float32) for h, w in shapes]


def plain_softmax(model, variables, x, preprocess=lambda x: x):
    apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, preprocess(x))))
    return np.asarray(apply(variables, jnp.asarray(x)))
