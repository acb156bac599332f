"""The few layers VGG is made of: 3x3/1x1 convolution, 2x2 max-pool, LRN.

They are written as plain functions plus thin Flax modules so that the
numerical formulation (how a convolution or a pool is lowered) can be chosen
in one place without touching the model definition.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgg_jax import backend

Array = jax.Array
Initializer = Callable[..., Array]

# Caffe/AlexNet LRN constants as the paper uses them (PAPER.md, section 1).
LRN_SIZE = 5
LRN_K = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75


# ---------------------------------------------------------------------------
# Formulations. "lax" is the plain lowering (conv_general_dilated,
# reduce_window); "fast" is the one measured faster on XLA:CPU (DESIGN.md, the
# per-layer probe): a reshape-and-max pool with its own gradient, small-map
# convolutions as shifted views plus one matmul, and first-layer convolutions
# (few input channels) as a sum of shifted taps. "auto" takes on CPU what was
# measured faster for the installed jaxlib (backend.cpu_choice) and "lax" elsewhere.
# Both compute the same values and gradients (tests/test_layers.py).

FORMULATIONS = ("auto", "lax", "fast")
_formulation = os.environ.get("VGG_JAX_FORMULATION", "auto")

# Maps with at most this many rows and columns go through the shifted-view
# matmul in the "fast" formulation; larger maps keep XLA's convolution. Measured
# at 32 px on a quiet machine (benchmarks/RESULTS.md): 2 is best; 4, 8, 16 and
# 32 are slower.
SMALL_MAP_MAX = 2

# Inputs with at most this many channels (the first layer: grey or RGB images)
# go through the shifted-tap formulation in "fast": XLA:CPU's convolution with
# one input channel ran 8x slower than the same sum of nine scaled shifts.
FEW_CHANNELS_MAX = 3


def _check_formulation(name: str) -> str:
    if name not in FORMULATIONS:
        raise ValueError(
            f"Unknown layer formulation {name!r}; choose one of {FORMULATIONS} "
            "(argument, set_formulation() or the VGG_JAX_FORMULATION variable)."
        )
    return name


def set_formulation(name: str) -> None:
    """Chooses how convolutions and pools are lowered in functions traced from now on."""
    global _formulation
    _formulation = _check_formulation(name)


@contextlib.contextmanager
def use_formulation(name: str) -> Iterator[None]:
    """`set_formulation` for the duration of a `with` block (trace inside it)."""
    previous = _formulation
    set_formulation(name)
    try:
        yield
    finally:
        set_formulation(previous)


def resolve_formulation(name: str | None = None) -> str:
    """'lax' or 'fast': the explicit name, else the global one, 'auto' by backend."""
    name = _check_formulation(_formulation if name is None else name)
    if name == "auto":
        return backend.cpu_choice().formulation if jax.default_backend() == "cpu" else "lax"
    return name


# ---------------------------------------------------------------------------
# Convolution.


def conv2d_lax(x: Array, kernel: Array, padding: str = "SAME") -> Array:
    """Stride-1 NHWC convolution with an HWIO kernel, XLA's own lowering."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _same_pads(k: int) -> tuple[int, int]:
    # XLA's SAME padding for stride 1: k - 1 in total, the extra one after.
    return (k - 1) // 2, k // 2


def _padded_input(x: Array, kernel: Array, padding: str) -> tuple[Array, int, int]:
    """Validates the shapes, pads for SAME; returns the input and the output's height and width."""
    kh, kw, cin, _ = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"Input has {x.shape[-1]} channels but the kernel expects {cin}.")
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), _same_pads(kh), _same_pads(kw), (0, 0)))
    elif padding != "VALID":
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"A {kh}x{kw} VALID convolution needs inputs of at least that size.")
    return x, out_h, out_w


def conv2d_matmul(x: Array, kernel: Array, padding: str = "SAME") -> Array:
    """The same convolution as shifted views of the input concatenated and one matmul.

    Gathers every (dy, dx) view of the (padded) input along channels, in the
    order in which an HWIO kernel flattens, so (N*H'*W', kh*kw*C) @ (kh*kw*C, F).
    Memory grows with kh*kw: meant for the tiny maps where XLA:CPU's convolution
    is slow, not for large ones.
    """
    kh, kw, cin, cout = kernel.shape
    x, out_h, out_w = _padded_input(x, kernel, padding)
    views = [x[:, dy : dy + out_h, dx : dx + out_w, :] for dy in range(kh) for dx in range(kw)]
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    # Accumulate in float32 whatever the input dtype, as convolutions do.
    out = jnp.matmul(
        patches.reshape(-1, kh * kw * cin),
        kernel.reshape(kh * kw * cin, cout),
        preferred_element_type=jnp.float32,
    )
    return out.astype(jnp.result_type(x, kernel)).reshape(x.shape[0], out_h, out_w, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_taps(x: Array, kernel: Array, padding: str = "SAME") -> Array:
    """The same convolution as a sum of kh*kw*C shifted input channels times kernel rows.

    For inputs with very few channels (the first layer) this is one fused
    elementwise loop. Its automatic gradient would be kh*kw*C separate
    reductions, so the gradient is taken through `conv2d_matmul` instead.
    """
    kh, kw, cin, _ = kernel.shape
    x, out_h, out_w = _padded_input(x, kernel, padding)
    xf, kf = x.astype(jnp.float32), kernel.astype(jnp.float32)
    out = sum(
        xf[:, dy : dy + out_h, dx : dx + out_w, c : c + 1] * kf[dy, dx, c]
        for dy in range(kh)
        for dx in range(kw)
        for c in range(cin)
    )
    return out.astype(jnp.result_type(x, kernel))


def _taps_fwd(x: Array, kernel: Array, padding: str) -> tuple[Array, tuple[Array, Array]]:
    return conv2d_taps(x, kernel, padding), (x, kernel)


def _taps_bwd(padding: str, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    _, pullback = jax.vjp(lambda a, b: conv2d_matmul(a, b, padding), x, kernel)
    return pullback(g)


conv2d_taps.defvjp(_taps_fwd, _taps_bwd)


def conv2d(x: Array, kernel: Array, padding: str = "SAME", formulation: str | None = None) -> Array:
    """Stride-1 NHWC convolution with an HWIO kernel, lowered per formulation."""
    if resolve_formulation(formulation) == "fast":
        if x.shape[-1] <= FEW_CHANNELS_MAX:
            return conv2d_taps(x, kernel, padding)
        if max(x.shape[1], x.shape[2]) <= SMALL_MAP_MAX:
            return conv2d_matmul(x, kernel, padding)
    return conv2d_lax(x, kernel, padding)


# ---------------------------------------------------------------------------
# 2x2 max-pool, stride 2. Odd trailing rows/columns are dropped (VALID).


def max_pool_2x2_lax(x: Array) -> Array:
    """XLA's reduce_window pool; its gradient is a select-and-scatter."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _windows(x: Array) -> Array:
    """(N, H, W, C) -> (N, H//2, 2, W//2, 2, C), odd trailing rows/columns dropped."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, : 2 * h2, : 2 * w2, :].reshape(n, h2, 2, w2, 2, c)


@jax.custom_vjp
def max_pool_2x2_reshape(x: Array) -> Array:
    """2x2 max-pool as reshape-and-max, with a gradient that needs no scatter."""
    return _windows(x).max(axis=(2, 4))


def _pool_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    y = max_pool_2x2_reshape(x)
    return y, (x, y)


def _pool_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array]:
    # The gradient goes to the window's maximum; among tied maxima only to the
    # first in row-major order, as XLA's select-and-scatter (select = ">=") does.
    x, y = res
    win = _windows(x)
    taken = jnp.zeros(y.shape, bool)
    parts = {}
    for a in (0, 1):
        for b in (0, 1):
            hit = (win[:, :, a, :, b, :] == y) & ~taken
            parts[a, b] = jnp.where(hit, g, jnp.zeros_like(g))
            taken = taken | hit
    rows = [jnp.stack([parts[a, 0], parts[a, 1]], axis=3) for a in (0, 1)]
    dx = jnp.stack(rows, axis=2)  # (N, H//2, 2, W//2, 2, C)
    n, h, w, c = x.shape
    dx = dx.reshape(n, 2 * (h // 2), 2 * (w // 2), c)
    if dx.shape != x.shape:
        dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
    return (dx,)


max_pool_2x2_reshape.defvjp(_pool_fwd, _pool_bwd)


def max_pool_2x2(x: Array, formulation: str | None = None) -> Array:
    """2x2 max-pool with stride 2 on NHWC input; odd trailing rows/cols are dropped."""
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"A 2x2 max-pool needs maps of at least 2x2; got {x.shape[1:3]}.")
    if resolve_formulation(formulation) == "fast":
        return max_pool_2x2_reshape(x)
    return max_pool_2x2_lax(x)


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
