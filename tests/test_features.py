"""Named activations, perceptual loss, the Appendix B descriptor and the class names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from weights_util import random_variables

from vgg_jax import checkpoints, convert_keras, imagenet_classes, models
from vgg_jax.features import (
    default_perceptual_layers,
    features,
    image_descriptor,
    perceptual_loss,
)

WIDTHS = (64, 128, 256, 512, 512)  # VGG's conv widths per stage (PAPER.md, Table 1)


def tiny(name: str = "vgg16", image_size: int = 32) -> checkpoints.ModelBundle:
    options = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=image_size)
    variables = random_variables(models.create_model(name, **options), seed=1)
    return checkpoints.ModelBundle(name, options, variables, convert_keras.KERAS_PREPROCESSING)


def photo(h: int = 48, w: int = 72) -> np.ndarray:
    """A real photograph (the cat), downsampled to h x w, RGB in [0, 1]."""
    img = jnp.asarray(skimage.data.chelsea(), jnp.float32) / 255.0
    return np.asarray(jax.image.resize(img, (h, w, 3), "bilinear"))


def expected_shapes(model: models.VGG, h: int, w: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for stage, kernels in enumerate(model.spec.stages):
        c = WIDTHS[stage]
        for i in range(len(kernels)):
            shapes[f"conv{stage + 1}_{i + 1}"] = shapes[f"relu{stage + 1}_{i + 1}"] = (1, h, w, c)
        if model.spec.lrn and stage == 0:
            shapes["lrn1"] = (1, h, w, c)
        h, w = h // 2, w // 2
        shapes[f"pool{stage + 1}"] = (1, h, w, c)
    fc = (1, h - 6, w - 6, 4096)  # the 7x7 FC1 window slides over the pool5 map
    shapes["fc6"] = shapes["fc7"] = fc
    return shapes


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "vgg11_lrn", "vgg13_bn"])
@pytest.mark.parametrize("size", [(224, 224), (256, 320)])
def test_every_named_layer_shape_full_size(name, size):
    model = models.create_model(name)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    names = model.layer_names()
    x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    got = jax.eval_shape(lambda v, x: features(model, v, x, names), variables, x)
    want = expected_shapes(model, *size)
    assert set(got) == set(want) == set(names)
    for layer in names:
        assert got[layer].shape == want[layer], layer


def test_features_apply_the_bundle_preprocessing_and_agree_with_each_other():
    bundle = tiny()
    pixels = photo()[None]  # 48 x 72: non-square
    names = ("conv1_1", "relu1_1", "relu1_2", "pool1", "pool5", "fc7")
    acts = features(bundle, None, pixels, names)
    direct = features(bundle.model, bundle.variables, bundle.preprocessing(pixels), names)
    for n in names:
        np.testing.assert_array_equal(acts[n], direct[n])
    np.testing.assert_allclose(acts["relu1_1"], jnp.maximum(acts["conv1_1"], 0))
    pooled = jax.lax.reduce_window(
        acts["relu1_2"], -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )
    np.testing.assert_allclose(acts["pool1"], pooled)
    assert acts["fc7"].shape == (1, 1, 2, 32) and acts["pool5"].shape == (1, 1, 2, 32)
    # BGR Keras preprocessing differs from a plain model on the raw pixels.
    raw = features(bundle.model, bundle.variables, pixels, ("conv1_1",))["conv1_1"]
    assert not np.allclose(raw, acts["conv1_1"])


def test_unknown_layer_names_and_unbatched_input_are_refused():
    bundle = tiny()
    with pytest.raises(ValueError, match="conv5_4"):
        features(bundle, None, photo()[None], ("conv5_4",))  # VGG16 has no conv5_4
    with pytest.raises(ValueError, match="batch"):
        features(bundle, None, photo(), ("pool1",))


def test_perceptual_loss():
    bundle = tiny()
    x = jnp.asarray(photo(32, 32)[None])
    y = x[:, ::-1]  # same content, moved
    assert default_perceptual_layers(bundle.model) == ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
    assert default_perceptual_layers(tiny("vgg13").model)[2] == "relu3_2"
    # Exactly 0 is guaranteed (features.perceptual_loss): for the same array,
    # and for equal values in another array, which runs the same program alone.
    assert float(perceptual_loss(bundle, None, x, x)) == 0.0
    assert float(perceptual_loss(bundle, None, x, jnp.array(x, copy=True))) == 0.0
    loss = perceptual_loss(bundle, None, x, y)
    assert float(loss) > 0
    layers = ("relu1_2", "relu3_3")
    one = perceptual_loss(bundle, None, x, y, layers, (1.0, 0.0))
    two = perceptual_loss(bundle, None, x, y, layers, (0.0, 1.0))
    both = perceptual_loss(bundle, None, x, y, layers, (2.0, 3.0))
    np.testing.assert_allclose(both, 2 * one + 3 * two, rtol=1e-5)
    grad = jax.grad(lambda x: perceptual_loss(bundle, None, x, y))(x)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).max()) > 0
    with pytest.raises(ValueError, match="2 weights for 1 layers"):
        perceptual_loss(bundle, None, x, y, ("relu1_2",), (1.0, 2.0))


def test_descriptor_normalised_flip_invariant_and_stackable():
    bundle = tiny()
    scales = (32, 48)  # few distinct shapes: each one compiles
    img = photo(40, 56)
    asym = image_descriptor(bundle, None, [img, img[:, ::-1]], scales)
    assert asym.shape == (2, 32)
    np.testing.assert_allclose(jnp.linalg.norm(asym, axis=-1), 1.0, rtol=1e-5)
    # Averaging over the image and its flip makes the descriptor flip-invariant ...
    np.testing.assert_allclose(asym[0], asym[1], rtol=1e-4, atol=1e-6)
    # ... which the network itself is not: without flips the two differ.
    no_flip = image_descriptor(bundle, None, [img, img[:, ::-1]], scales, flip=False)
    assert not np.allclose(no_flip[0], no_flip[1], rtol=1e-3, atol=1e-4)
    # For a left-right symmetric image, flipping adds nothing.
    sym = (img + img[:, ::-1]) / 2
    np.testing.assert_allclose(
        image_descriptor(bundle, None, sym, scales),
        image_descriptor(bundle, None, sym, scales, flip=False),
        rtol=1e-4,
        atol=1e-6,
    )
    stacked = image_descriptor(bundle, None, [img, sym], scales, combine="stack")
    assert stacked.shape == (2, 64)
    np.testing.assert_allclose(jnp.linalg.norm(stacked, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="below the model's image_size"):
        image_descriptor(bundle, None, img, (16, 32))


def test_descriptor_at_training_size_is_fc7():
    """One scale equal to image_size, no flip: the network's normalised fc7 vector."""
    bundle = tiny()
    img = photo(32, 32)
    desc = image_descriptor(bundle, None, img, (32,), flip=False)
    fc7 = features(bundle, None, img[None], ("fc7",))["fc7"].reshape(1, -1)
    np.testing.assert_allclose(desc, fc7 / jnp.linalg.norm(fc7), rtol=1e-5, atol=1e-7)


def test_imagenet_class_names():
    classes = imagenet_classes.CLASSES
    assert len(classes) == 1000
    synsets = [s for s, _ in classes]
    assert synsets == sorted(synsets) and len(set(synsets)) == 1000  # the standard order
    assert imagenet_classes.class_name(0) == "tench"
    assert imagenet_classes.class_name(281) == "tabby"
    assert imagenet_classes.synset(281) == "n02123045"
    assert imagenet_classes.class_name(409) == "analog clock"
    assert imagenet_classes.class_name(999, full=True).startswith("toilet tissue")


def test_the_command_writes_layers_or_descriptors_of_image_files(tmp_path, capsys):
    from PIL import Image

    from vgg_jax import features as features_lib
    from vgg_jax import reference_preprocessing

    bundle = tiny("vgg11")
    checkpoints.save_bundle(tmp_path / "net", bundle)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (48, 48)]):
        paths.append(str(tmp_path / f"photo{i}.png"))
        Image.fromarray(np.uint8(photo(h, w) * 255)).save(paths[-1])
    out = tmp_path / "out" / "f.npz"  # its folder is made
    argv = [*paths, "--weights", str(tmp_path / "net"), "--layers", "pool5,fc7"]
    features_lib.main([*argv, "--output", str(out)])
    assert f"wrote {out}: fc7 (2, 1, 1, 32), pool5 (2, 1, 1, 32) for 2 images" in (
        capsys.readouterr().out
    )
    saved = np.load(out)  # plain arrays: no pickle needed
    assert list(saved["images"]) == paths
    from vgg_jax.image_io import open_image

    crops = np.stack([reference_preprocessing.reference_crop(open_image(p, 3), bundle)
                      for p in paths])  # fmt: skip
    want = features(bundle, None, crops, ("fc7",))["fc7"]
    np.testing.assert_allclose(saved["fc7"], want, rtol=1e-4, atol=1e-5)
    desc = features_lib.main([paths[0], "--weights", str(tmp_path / "net"), "--descriptor",
                              "--output", str(tmp_path / "d.npz")])["descriptor"]  # fmt: skip
    assert desc.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="has no layers \\['fc9'\\]"):
        features_lib.main([paths[0], "--weights", str(tmp_path / "net"), "--layers", "fc9"])


def test_a_greyscale_network_gets_the_luma_of_rgb_images():
    # A Fashion-MNIST run takes 1-channel images; given RGB (as documented for bundles)
    # it raised flax's ScopeParamShapeError before.
    options = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=32)
    model = models.create_model("vgg11", **options)
    variables = random_variables(model, seed=3, channels=1)
    grey_stats = checkpoints.Preprocessing(value_range=1.0, mean=(0.286,), std=(0.353,))
    bundle = checkpoints.ModelBundle("vgg11", options, variables, grey_stats)
    rgb = photo(32, 32)[None]
    grey = (rgb @ np.float32([0.299, 0.587, 0.114]))[..., None]
    got = features(bundle, None, rgb, ("pool5", "fc7"))
    want = features(bundle, None, grey, ("pool5", "fc7"))
    for name in ("pool5", "fc7"):  # float32 rounding of the luma, through 11 layers
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert float(perceptual_loss(bundle, None, rgb, rgb)) == 0.0
