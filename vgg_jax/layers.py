"""The few layers VGG is made of: 3x3/1x1 convolution, 2x2 max-pool, LRN.

They are written as plain functions plus thin Flax modules so that the
numerical formulation (how a convolution or a pool is lowered) can be chosen
in one place without touching the model definition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]

# Caffe/AlexNet LRN constants as the paper uses them (PAPER.md, section 1).
LRN_SIZE = 5
LRN_K = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75


def conv2d(x: Array, kernel: Array, padding: str = "SAME") -> Array:
    """Stride-1 NHWC convolution with an HWIO kernel."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def max_pool_2x2(x: Array) -> Array:
    """2x2 max-pool with stride 2 on NHWC input; odd trailing rows/cols are dropped."""
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def local_response_norm(
    x: Array,
    size: int = LRN_SIZE,
    k: float = LRN_K,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
) -> Array:
    """AlexNet's cross-channel LRN in Caffe's convention (alpha divided by size).

    b_c = a_c / (k + alpha / size * sum_{|c' - c| <= size // 2} a_{c'}^2) ** beta
    """
    half = size // 2
    squares = jnp.square(x.astype(jnp.float32))
    window_sum = jax.lax.reduce_window(
        squares,
        0.0,
        jax.lax.add,
        window_dimensions=(1,) * (x.ndim - 1) + (size,),
        window_strides=(1,) * x.ndim,
        padding=((0, 0),) * (x.ndim - 1) + ((half, half),),
    )
    scale = (k + (alpha / size) * window_sum) ** beta
    return (x / scale).astype(x.dtype)


class Conv(nn.Module):
    """Square stride-1 convolution with bias; SAME padding keeps the map size."""

    features: int
    kernel_size: int = 3
    padding: str = "SAME"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(x, kernel, self.padding) + bias
