"""Helpers shared by the conversion, feature and predict tests."""

from __future__ import annotations

import jax
import numpy as np

from vgg_jax import checkpoints, models


def random_variables(model: models.VGG, seed: int = 0) -> dict:
    """Random variables of the model's shapes, without compiling its initialiser."""
    rng = np.random.default_rng(seed)
    shapes = checkpoints.expected_variables(model)

    def fill(path, leaf):
        if path[-1].key in ("var", "scale"):  # positive, like BN statistics and scales
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))
