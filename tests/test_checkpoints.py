"""Model bundles: round trip, refusal of other models, damaged files."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import checkpoints, models

OPTIONS = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=32)


def make_bundle(**overrides):
    options = {**OPTIONS, **overrides}
    model = models.create_model("A", **options)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return checkpoints.ModelBundle("vgg11", options, dict(variables))


def test_round_trip(tmp_path):
    bundle = make_bundle()
    bundle.preprocessing = checkpoints.Preprocessing("BGR", 255.0, (1.0, 2.0, 3.0), (1, 1, 1))
    checkpoints.save_bundle(tmp_path / "m", bundle)
    loaded = checkpoints.load_bundle(tmp_path / "m")
    assert loaded.preprocessing == bundle.preprocessing
    assert loaded.options == OPTIONS
    for a, b in zip(
        jax.tree.leaves(bundle.variables), jax.tree.leaves(loaded.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    np.testing.assert_array_equal(
        bundle.model.apply(bundle.variables, x), loaded.model.apply(loaded.variables, x)
    )


def test_preprocessing_bgr_and_scaling():
    pre = checkpoints.Preprocessing("BGR", 255.0, (10.0, 20.0, 30.0), (1.0, 2.0, 4.0))
    pixels = np.array([[[[1.0, 0.5, 0.0]]]])
    np.testing.assert_allclose(pre(pixels)[0, 0, 0], [-10.0, (127.5 - 20) / 2, (255 - 30) / 4])
    with pytest.raises(ValueError, match="channel_order"):
        checkpoints.Preprocessing("GBR")


def test_other_model_is_refused_naming_the_parameter(tmp_path):
    checkpoints.save_bundle(tmp_path / "m", make_bundle())
    meta_path = tmp_path / "m" / checkpoints.BUNDLE_FILE
    text = meta_path.read_text().replace('"num_classes": 10', '"num_classes": 7')
    meta_path.write_text(text)
    with pytest.raises(ValueError, match="params/fc8"):
        checkpoints.load_bundle(tmp_path / "m")
    text = meta_path.read_text().replace('"vgg11"', '"vgg13"')
    meta_path.write_text(text)
    with pytest.raises(ValueError, match="conv1_2"):
        checkpoints.load_bundle(tmp_path / "m")


def test_damaged_bundle_is_a_clear_error(tmp_path):
    path = checkpoints.save_bundle(tmp_path / "m", make_bundle())
    variables_dir = os.path.join(path, checkpoints.VARIABLES_DIR)
    # Truncate every data file of the checkpoint.
    for root, _, files in os.walk(variables_dir):
        for name in files:
            if "manifest" in name or name.startswith("d") or "ocdbt" in root:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
    with pytest.raises(ValueError, match="truncated or damaged"):
        checkpoints.load_bundle(path)
    shutil.rmtree(variables_dir)
    with pytest.raises(ValueError, match="truncated or damaged"):
        checkpoints.load_bundle(path)
    with pytest.raises(FileNotFoundError, match="not a vgg_jax model bundle"):
        checkpoints.load_bundle(tmp_path)
