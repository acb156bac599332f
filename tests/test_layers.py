"""Each fast layer formulation equals the plain lax one in values and gradients."""

import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from weights_util import rbg_key

from vgg_jax import backend, layers, models

TOL = dict(rtol=1e-5, atol=1e-5)


def normal(seed: int, shape, scale: float = 1.0) -> jnp.ndarray:
    """Standard-normal float32 test data from numpy: jax.random would compile threefry for
    every new shape (seconds each on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def grads(f, *args):
    """Value and gradients of sum(f(...) * r) for a fixed random cotangent r."""
    out = jax.eval_shape(f, *args)
    r = normal(7, out.shape).astype(out.dtype)

    def scalar(*a):
        y = f(*a)
        return jnp.sum(y * r), y

    # Compiled as one program: run eagerly, every primitive would be compiled on its own.
    value_and_grad = jax.value_and_grad(scalar, argnums=tuple(range(len(args))), has_aux=True)
    (_, y), g = jax.jit(value_and_grad)(*args)
    return y, g


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 5, 7, 2), (3, 2, 2, 5), (1, 3, 2, 1)])
def test_max_pool_matches_lax_with_ties(shape):
    # Small integers make many tied maxima inside windows.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), jnp.float32)
    y_lax, (g_lax,) = grads(layers.max_pool_2x2_lax, x)
    y_fast, (g_fast,) = grads(layers.max_pool_2x2_reshape, x)
    np.testing.assert_allclose(y_fast, y_lax, **TOL)
    np.testing.assert_allclose(g_fast, g_lax, **TOL)
    # Each window passes its gradient to exactly one element, as lax does.
    assert int((g_fast != 0).sum()) == int((g_lax != 0).sum()) == int(np.prod(y_lax.shape))


def test_max_pool_random_values_and_all_equal_window():
    x = normal(1, (2, 9, 6, 4))
    for arr in (x, jnp.ones((1, 2, 2, 1))):
        y_lax, (g_lax,) = grads(layers.max_pool_2x2_lax, arr)
        y_fast, (g_fast,) = grads(layers.max_pool_2x2_reshape, arr)
        np.testing.assert_allclose(y_fast, y_lax, **TOL)
        np.testing.assert_allclose(g_fast, g_lax, **TOL)


def test_max_pool_rejects_too_small_maps():
    with pytest.raises(ValueError, match="at least 2x2"):
        layers.max_pool_2x2(jnp.ones((1, 1, 4, 1)))


@pytest.mark.parametrize(
    "hw,k,padding",
    [((1, 1), 3, "SAME"), ((2, 2), 3, "SAME"), ((3, 5), 3, "SAME"), ((2, 2), 1, "SAME"),
     ((4, 3), 2, "SAME"), ((3, 3), 3, "VALID"), ((5, 4), 2, "VALID")],
)  # fmt: skip
def test_conv_matmul_matches_lax(hw, k, padding):
    x, w = normal(2, (2, *hw, 6)), normal(3, (k, k, 6, 5), 0.3)
    y_lax, g_lax = grads(lambda a, b: layers.conv2d_lax(a, b, padding), x, w)
    y_mm, g_mm = grads(lambda a, b: layers.conv2d_matmul(a, b, padding), x, w)
    np.testing.assert_allclose(y_mm, y_lax, **TOL)
    for a, b in zip(g_mm, g_lax, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize(
    "cin,hw,k,padding",
    [(1, (5, 6), 3, "SAME"), (3, (4, 4), 3, "SAME"), (1, (3, 3), 3, "VALID"),
     (2, (4, 3), 2, "SAME"), (3, (2, 2), 1, "SAME")],
)  # fmt: skip
def test_conv_taps_matches_lax(cin, hw, k, padding):
    x, w = normal(8, (2, *hw, cin)), normal(9, (k, k, cin, 5), 0.3)
    y_lax, g_lax = grads(lambda a, b: layers.conv2d_lax(a, b, padding), x, w)
    y_taps, g_taps = grads(lambda a, b: layers.conv2d_taps(a, b, padding), x, w)
    np.testing.assert_allclose(y_taps, y_lax, **TOL)
    for a, b in zip(g_taps, g_lax, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_conv_matmul_errors_name_the_problem():
    with pytest.raises(ValueError, match="channels"):
        layers.conv2d_matmul(jnp.ones((1, 2, 2, 3)), jnp.ones((3, 3, 4, 1)))
    with pytest.raises(ValueError, match="padding"):
        layers.conv2d_matmul(jnp.ones((1, 2, 2, 3)), jnp.ones((3, 3, 3, 1)), "FULL")


def primitives(f, *args) -> set[str]:
    return {str(e.primitive) for e in jax.make_jaxpr(f)(*args).eqns}


def test_dispatch_by_formulation_and_map_size():
    small, large = jnp.ones((1, 2, 2, 4)), jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))
    assert "dot_general" in primitives(lambda a: layers.conv2d(a, w, formulation="fast"), small)
    assert "conv_general_dilated" in primitives(
        lambda a: layers.conv2d(a, w, formulation="fast"), large
    )
    assert "conv_general_dilated" in primitives(
        lambda a: layers.conv2d(a, w, formulation="lax"), small
    )
    grey, w1 = jnp.ones((1, 8, 8, 1)), jnp.ones((3, 3, 1, 4))
    assert "conv_general_dilated" not in primitives(
        lambda a: layers.conv2d(a, w1, formulation="fast"), grey
    )
    assert "conv_general_dilated" in primitives(
        lambda a: layers.conv2d(a, w1, formulation="lax"), grey
    )
    assert "reduce_window_max" in primitives(
        lambda a: layers.max_pool_2x2(a, formulation="lax"), large
    )
    assert "reduce_window_max" not in primitives(
        lambda a: layers.max_pool_2x2(a, formulation="fast"), large
    )


def test_formulation_selection():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_formulation("auto") == backend.cpu_choice().formulation
    with layers.use_formulation("lax"):
        assert layers.resolve_formulation() == "lax"
    assert layers.resolve_formulation() == layers.resolve_formulation(layers._formulation)
    with pytest.raises(ValueError, match="VGG_JAX_FORMULATION"):
        layers.set_formulation("quick")


def test_whole_model_same_under_both_formulations():
    # 32 px: stage 5 runs on 2x2 maps, so the small-map matmul is exercised.
    model = models.create_model("A", 10, width_divisor=16, fc_width=32, image_size=32)
    x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 32, 32, 1)), jnp.float32)
    params = jax.jit(model.init)(rbg_key(4), x)["params"]
    out = {}
    for name in ("lax", "fast"):
        with layers.use_formulation(name):  # traced inside: one compilation per formulation
            out[name] = grads(lambda p: model.apply({"params": p}, x), params)
    np.testing.assert_allclose(out["fast"][0], out["lax"][0], **TOL)
    for a, b in zip(jax.tree.leaves(out["fast"][1]), jax.tree.leaves(out["lax"][1]), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.fixture
def measured_with_flag(monkeypatch):
    """Pretend the installed jaxlib is one whose table row adds the flag (on every version)."""
    monkeypatch.setattr(backend, "jaxlib_version", lambda: (0, 10))
    backend.cpu_choice.cache_clear()
    yield
    backend.cpu_choice.cache_clear()


def test_cpu_flag_is_appended_not_overwriting(measured_with_flag):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    assert backend.configure_xla_flags(env)
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8",
        backend.YNN_FLAG,
    ]
    assert not backend.configure_xla_flags(env)  # never twice
    mine = {"XLA_FLAGS": f"--{backend.YNN_FLAG_NAME}=default"}
    assert not backend.configure_xla_flags(mine)  # the user's own choice wins
    assert not backend.cpu_flags_wanted({"VGG_JAX_CPU_FLAGS": "0"})
    assert not backend.cpu_flags_wanted({"JAX_PLATFORMS": "cuda"})


def test_cpu_choice_per_jaxlib_version(caplog):
    # Every measured row names a real formulation; 0.10 and 0.12 are measured.
    assert {(0, 10), (0, 12)} <= set(backend.CPU_CHOICES)
    for choice in backend.CPU_CHOICES.values():
        assert choice.measured and choice.formulation in ("lax", "fast")
    # An unmeasured version gets no flag (it might not exist there) and says so.
    with caplog.at_level("DEBUG", logger="vgg_jax.backend"):
        unknown = backend.cpu_choice((0, 99))
    assert not unknown.ynn_flag and not unknown.measured
    assert unknown.formulation == backend.CPU_CHOICES[max(backend.CPU_CHOICES)].formulation
    assert "no measured CPU choice" in caplog.text and "(0, 99)" in caplog.text


def test_cpu_flag_follows_the_table_and_can_be_forced(monkeypatch):
    monkeypatch.setattr(backend, "jaxlib_version", lambda: (0, 99))
    backend.cpu_choice.cache_clear()
    try:
        assert not backend.cpu_flags_wanted({"JAX_PLATFORMS": "cpu"})  # unmeasured: left out
        assert backend.cpu_flags_wanted({"JAX_PLATFORMS": "cpu", "VGG_JAX_CPU_FLAGS": "1"})
    finally:
        backend.cpu_choice.cache_clear()


def test_auto_formulation_follows_the_table(monkeypatch):
    monkeypatch.setattr(backend, "cpu_choice", lambda: backend.CpuChoice(False, "lax"))
    assert layers.resolve_formulation("auto") == "lax"
    monkeypatch.setattr(backend, "cpu_choice", lambda: backend.CpuChoice(True, "fast"))
    assert layers.resolve_formulation("auto") == "fast"


def test_this_session_has_both_flags():
    # conftest sets the device count; importing vgg_jax appended the CPU flag
    # exactly when this jaxlib's table row says so.
    flags = os.environ["XLA_FLAGS"]
    assert "--xla_force_host_platform_device_count=8" in flags
    assert backend.cpu_flag_active() == backend.cpu_choice().ynn_flag


def test_bfloat16_keeps_dtype_and_matches():
    x = normal(5, (2, 2, 2, 64)).astype(jnp.bfloat16)
    w = normal(6, (3, 3, 64, 8), 0.1).astype(jnp.bfloat16)
    fast, plain = layers.conv2d_matmul(x, w), layers.conv2d_lax(x, w)
    assert fast.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(fast, np.float32), np.asarray(plain, np.float32), rtol=2e-2, atol=2e-2
    )
    rgb, w3 = x[..., :3], w[:, :, :3]
    taps = layers.conv2d_taps(rgb, w3)
    assert taps.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(taps, np.float32),
        np.asarray(layers.conv2d_lax(rgb, w3), np.float32),
        rtol=2e-2,
        atol=2e-2,
    )
    pooled = layers.max_pool_2x2_reshape(x)
    assert pooled.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(pooled, np.float32), np.asarray(layers.max_pool_2x2_lax(x), np.float32)
    )


def test_cpu_flag_skipped_when_an_accelerator_is_the_default(monkeypatch, measured_with_flag):
    monkeypatch.setattr(backend, "accelerator_plugin_installed", lambda: True)
    assert not backend.cpu_flags_wanted({})
    assert backend.cpu_flags_wanted({"JAX_PLATFORMS": "cpu"})


FAULTS_SCRIPT = """
import resource, sys
from vgg_jax import backend
reused = backend.reuse_host_buffers()
import jax, jax.numpy as jnp
f = jax.jit(lambda a, g: a.T @ g)  # a fresh 64 MiB result every call
a = jnp.ones((64, 4096))
for _ in range(5):
    f(a, a).block_until_ready()
per_call = []
for _ in range(21):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, a).block_until_ready()
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(reused, sorted(per_call)[10])  # the median call: a few racing threads may still refault
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reusing_host_buffers_stops_refaulting_large_buffers():
    def faults(malloc: str) -> tuple[str, float]:
        env = {**os.environ, "VGG_JAX_MALLOC": malloc, "XLA_FLAGS": ""}
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        reused, per_call = out.stdout.split()
        return reused, float(per_call)

    (off, faults_off), (on, faults_on) = faults("0"), faults("1")
    assert (off, on) == ("False", "True")
    pages = 64 * 2**20 / resource.getpagesize()
    assert faults_off > 0.5 * pages  # each call maps its 64 MiB result afresh
    assert faults_on < 0.5 * pages  # most calls find a freed buffer to reuse
    # Once JAX's backend runs (as in this process), it is too late: nothing is changed.
    jnp.ones(1).block_until_ready()
    assert not backend.reuse_host_buffers()


def test_host_buffers_left_alone_where_an_accelerator_computes(monkeypatch):
    monkeypatch.setattr(backend, "backend_started", lambda: False)
    assert not backend.reuse_host_buffers({"JAX_PLATFORMS": "cuda"})
    assert backend.cpu_is_default_backend({"JAX_PLATFORMS": "cuda,cpu"})
