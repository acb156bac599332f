"""Helpers shared by the conversion, feature and predict tests."""

from __future__ import annotations

import jax
import numpy as np
import skimage.data
from PIL import Image

from vgg_jax import checkpoints, models


def rbg_key(seed: int) -> jax.Array:
    """A key for tests whose variables need only be random: `model.init` under it compiles
    about 4x faster on CPU than under jax's default threefry (1.4 s vs 6.0 s, tiny VGG-A)."""
    return jax.random.key(seed, impl="rbg")


def random_variables(model: models.VGG, seed: int = 0, channels: int = 3) -> dict:
    """Random variables of the model's shapes, without compiling its initialiser.

    He-normal kernels and biases, BN statistics and scales in [0.5, 1.5]. Compiling
    `model.init` costs seconds per model on CPU (jax's partitionable threefry); tests
    that need some variables, not the initialisers' own, take these.
    """
    rng = np.random.default_rng(seed)
    shapes = checkpoints.expected_variables(model, channels)

    def fill(path, leaf):
        if path[-1].key in ("var", "scale"):  # positive, like BN statistics and scales
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def photos(size: int = 224) -> np.ndarray:
    """Real photographs, resized to size x size: uint8 (N, size, size, 3)."""
    out = []
    for name in ("chelsea", "coffee", "astronaut"):
        img = Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img))
    return np.stack(out)


def logits(bundle: checkpoints.ModelBundle, pixels_uint8: np.ndarray) -> np.ndarray:
    x = bundle.preprocessing(pixels_uint8.astype(np.float32) / 255.0)
    return np.asarray(jax.jit(bundle.model.apply)(bundle.variables, x))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def top5(x: np.ndarray) -> np.ndarray:
    return np.argsort(-x, axis=-1)[:, :5]


def tiny_bundle(name: str, image_size: int = 32) -> checkpoints.ModelBundle:
    """A narrow random bundle (width_divisor 16, fc_width 32, 10 classes)."""
    options = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=image_size)
    model = models.create_model(name, **options)
    return checkpoints.ModelBundle(name, options, random_variables(model))
