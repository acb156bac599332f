"""The VGG family: exact sizes, the two head views, LRN, options and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from weights_util import random_variables, rbg_key

from vgg_jax import checkpoints, models

# Totals from PAPER.md section 1 and the foundation issue (BN scale and bias
# counted, running statistics not), conv-only counts from PAPER.md.
EXPECTED_PARAMS = {
    "vgg11": (132_863_336, 9_220_480),
    "vgg11_lrn": (132_863_336, 9_220_480),
    "vgg13": (133_047_848, 9_404_992),
    "vgg16_c": (133_638_952, 9_996_096),
    "vgg16": (138_357_544, 14_714_688),
    "vgg19": (143_667_240, 20_024_384),
    "vgg11_bn": (132_868_840, None),
    "vgg13_bn": (133_053_736, None),
    "vgg16_bn": (138_365_992, None),
    "vgg19_bn": (143_678_248, None),
}
EXPECTED_GMACS = {"A": 7.609, "B": 11.308, "C": 11.771, "D": 15.470, "E": 19.632}


def abstract_params(model, size=224, channels=3):
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))
    )
    return variables["params"]


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_exact(name):
    total, conv_only = EXPECTED_PARAMS[name]
    params = abstract_params(models.create_model(name))
    assert count(params) == total
    if conv_only is not None:
        assert count(params["features"]) == conv_only
    assert models.model_cost(name).params == total


@pytest.mark.parametrize("letter,gmacs", sorted(EXPECTED_GMACS.items()))
def test_mult_adds_from_spec(letter, gmacs):
    assert models.model_cost(letter).mult_adds / 1e9 == pytest.approx(gmacs, abs=5e-4)


def test_fc_head_counts():
    params = abstract_params(models.create_model("vgg16"))
    head = {k: params[k] for k in ("fc6", "fc7", "fc8")}
    assert count(head) == 123_642_856
    assert count(params["fc6"]) == 102_764_544
    assert params["fc6"]["kernel"].shape == (7, 7, 512, 4096)


def test_names_and_letters_agree():
    for letter, name in [
        ("A", "vgg11"),
        ("A-LRN", "vgg11_lrn"),
        ("B", "vgg13"),
        ("C", "vgg16_c"),
        ("D", "vgg16"),
        ("E", "vgg19"),
    ]:
        assert models.get_spec(letter) is models.get_spec(name)
    assert models.get_spec("VGG16").name == "vgg16"
    assert models.get_spec("vgg11-lrn").name == "vgg11_lrn"


def test_layer_structure_matches_paper():
    spec = models.get_spec("C")
    assert spec.stages[2] == (3, 3, 1)
    params = abstract_params(models.create_model("C"))["features"]
    assert params["conv3_3"]["kernel"].shape == (1, 1, 256, 256)
    assert params["conv5_3"]["kernel"].shape == (1, 1, 512, 512)
    e = abstract_params(models.create_model("E"))["features"]
    assert sorted(e) == sorted(models.conv_layer_names(models.get_spec("E")))
    assert len(e) == 16


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="vgg16") as info:
        models.create_model("vgg17")
    assert "vgg11_lrn" in str(info.value) and "A-LRN" in str(info.value)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="width_divisor"):
        models.create_model("A", width_divider=4)
    with pytest.raises(ValueError, match="glorot"):
        models.create_model("A", initializer="he")


@pytest.mark.parametrize("name", ["A", "D"])
def test_fc_head_equals_score_map_at_training_size(name):
    # Narrow (the full widths' shapes are test_score_map_sizes'), at 224: FC1's 7x7 window.
    model = models.create_model(name, width_divisor=8, fc_width=64)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 224, 224, 3)), jnp.float32)
    variables = random_variables(model)
    logits = jax.jit(model.apply)(variables, x)
    score_map = jax.jit(lambda v, x: model.apply(v, x, method="score_map"))(variables, x)
    assert logits.shape == (2, 1000)
    assert score_map.shape == (2, 1, 1, 1000)
    rel = jnp.linalg.norm(logits - score_map[:, 0, 0]) / jnp.linalg.norm(logits)
    assert float(rel) < 1e-5


@pytest.mark.parametrize("side,positions", [(256, 2), (384, 6), (512, 10)])
def test_score_map_sizes(side, positions):
    model = models.create_model("D")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, method="score_map"),
        variables,
        jax.ShapeDtypeStruct((1, side, side + 64, 3), jnp.float32),
    )
    assert out.shape == (1, positions, positions + 2, 1000)


def test_wrong_input_size_is_a_clear_error():
    model = models.create_model("A", width_divisor=16, fc_width=32, image_size=32)
    variables = checkpoints.expected_variables(model, channels=1)  # raised while tracing
    with pytest.raises(ValueError, match="32x32"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 40, 40, 1)))
    with pytest.raises(ValueError, match="at least 32x32"):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, method="score_map"), variables, jnp.zeros((1, 16, 40, 1))
        )
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.apply, variables, jnp.zeros((32, 32, 1)))


def test_small_resolution_head_is_one_by_one():
    model = models.create_model("A", width_divisor=4, image_size=32, num_classes=10)
    params = abstract_params(model, size=32, channels=1)
    assert params["fc6"]["kernel"].shape == (1, 1, 128, 4096)
    assert params["features"]["conv1_1"]["kernel"].shape == (3, 3, 1, 16)
    model64 = models.create_model("A", width_divisor=4, image_size=64, num_classes=10)
    assert abstract_params(model64, 64, 1)["fc6"]["kernel"].shape == (2, 2, 128, 4096)


def lrn_reference(a, size=5, k=2.0, alpha=1e-4, beta=0.75):
    """The PAPER.md formula, written directly with loops over channels."""
    a = np.asarray(a, np.float64)
    channels = a.shape[-1]
    out = np.empty_like(a)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + size // 2 + 1)
        s = np.sum(a[..., lo:hi] ** 2, axis=-1)
        out[..., c] = a[..., c] / (k + alpha / size * s) ** beta
    return out


def test_lrn_matches_formula():
    # Large activations so that the normalisation term matters.
    a = 30.0 * np.abs(np.random.default_rng(0).normal(size=(2, 3, 4, 9))).astype(np.float32)
    ours = np.asarray(models.layers.local_response_norm(jnp.asarray(a)))
    np.testing.assert_allclose(ours, lrn_reference(a), rtol=1e-5)
    assert not np.allclose(ours, a / 2.0**0.75)  # the window sum must matter


def test_lrn_model_differs_from_plain_a():
    x = jnp.asarray(np.random.default_rng(3).uniform(0, 255, (1, 32, 32, 3)), jnp.float32)
    plain = models.create_model("A", width_divisor=8, fc_width=16, image_size=32)
    lrn = models.create_model("A-LRN", width_divisor=8, fc_width=16, image_size=32)
    variables = random_variables(plain)
    assert jax.tree.structure(variables) == jax.tree.structure(checkpoints.expected_variables(lrn))
    # Compiled whole, not run eagerly (one compilation per primitive otherwise).
    feats = jax.jit(lambda v, x: lrn.apply(v, x, ["relu1_1", "lrn1"], method="extract"))(
        variables, x
    )
    np.testing.assert_allclose(
        feats["lrn1"], models.layers.local_response_norm(feats["relu1_1"]), rtol=1e-6
    )
    assert not np.allclose(jax.jit(plain.apply)(variables, x), jax.jit(lrn.apply)(variables, x))


def test_initializers():
    glorot = abstract_params(models.create_model("A"))
    assert glorot["fc6"]["kernel"].dtype == jnp.float32
    model = models.create_model(
        "A", width_divisor=4, fc_width=256, image_size=32, initializer="normal"
    )
    params = jax.jit(model.init)(rbg_key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["features"]["conv3_1"]["kernel"])
    assert kernel.std() == pytest.approx(0.01, rel=0.05)
    assert np.all(np.asarray(params["fc7"]["bias"]) == 0)
    g = models.create_model("A", width_divisor=4, fc_width=256, image_size=32)
    gp = jax.jit(g.init)(rbg_key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    w = np.asarray(gp["fc7"]["kernel"])
    limit = np.sqrt(6.0 / (256 + 256))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.9 * limit


def _train_a_few_steps(model, x, y, steps=5):
    params = random_variables(model, channels=x.shape[-1])["params"]
    tx = optax.sgd(0.01, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, rbg_key(i))
        losses.append(float(loss))
    return params, losses


def test_width_divided_model_trains_without_nan():
    model = models.create_model("A", num_classes=10, width_divisor=8, fc_width=64, image_size=32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32, 32, 1)), jnp.float32)
    y = jnp.arange(16) % 10
    params, losses = _train_a_few_steps(model, x, y, steps=20)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # it fits a fixed batch
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(params))


def test_bfloat16_compute_with_float32_params():
    model = models.create_model(
        "B", num_classes=10, width_divisor=8, fc_width=64, image_size=32, dtype="bfloat16"
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
    params, losses = _train_a_few_steps(model, x, jnp.arange(4), steps=3)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    assert np.all(np.isfinite(losses))
    logits = jax.jit(model.apply)({"params": params}, x)
    assert logits.dtype == jnp.float32


def test_batch_norm_variant_updates_statistics():
    model = models.create_model(
        "vgg11_bn", num_classes=10, width_divisor=8, fc_width=32, image_size=32
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)) + 3.0, jnp.float32)
    variables = random_variables(model)
    assert "bn1_1" in variables["batch_stats"]["features"]

    def train_apply(v, x, rng):
        return model.apply(v, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])

    _, updated = jax.jit(train_apply)(variables, x, rbg_key(1))
    before = variables["batch_stats"]["features"]["bn1_1"]["mean"]
    after = updated["batch_stats"]["features"]["bn1_1"]["mean"]
    assert not np.allclose(before, after)


def test_extract_named_layers_any_size():
    model = models.create_model("D", width_divisor=16, fc_width=32, image_size=32)
    x = jnp.ones((1, 64, 96, 3))
    # Shapes only: traced, not computed.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))
    feats = jax.eval_shape(
        lambda v, x: model.apply(v, x, ["conv1_1", "pool5", "fc7"], method="extract"), variables, x
    )
    assert feats["conv1_1"].shape == (1, 64, 96, 4)
    assert feats["pool5"].shape == (1, 2, 3, 32)
    assert feats["fc7"].shape == (1, 2, 3, 32)
    with pytest.raises(ValueError, match="conv5_4"):
        jax.eval_shape(lambda v, x: model.apply(v, x, ["conv5_4"], method="extract"), variables, x)
