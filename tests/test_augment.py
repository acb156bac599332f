"""The training preprocessing of one image on real photographs: crops, flips, colour shift."""

import functools
import io

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from input_util import jpeg, resized

from configs.default import get_config
from vgg_jax import augment, input_common


def _photo_jpeg(name="coffee", width=500) -> tf.Tensor:
    return tf.constant(jpeg(resized(getattr(skimage.data, name)(), width), quality=95))


def _aug(**kw):
    base = dict(
        size=64,
        scale_min=64,
        scale_max=128,
        flip=False,
        color_shift=0.0,
        channels=3,
        method="bilinear",
    )
    return augment.Augment(**{**base, **kw})


def _seed(i):
    return tf.constant([7, i], tf.int64)


@functools.cache
def _pre(aug):
    """train_preprocess compiled once per Augment (eager op-by-op is slow)."""
    return tf.function(lambda encoded, seed: augment.train_preprocess(encoded, seed, aug))


@functools.cache
def _crop(aug):
    return tf.function(lambda encoded, seed: augment.random_scaled_crop(encoded, seed, aug))


def test_scale_jitter_covers_range_and_crops_stay_inside():
    aug = _aug(size=224, scale_min=256, scale_max=512)
    h, w = 375, 500
    scales, oys, oxs = [], [], []
    for i in range(600):
        s, big_h, big_w, oy, ox = (int(v) for v in augment.sample_crop(h, w, _seed(i), aug))
        assert big_h == s and abs(big_w - round(w * s / h)) <= 1  # smallest side is S
        assert 0 <= oy <= big_h - 224 and 0 <= ox <= big_w - 224
        scales.append(s)
        oys.append(oy / (big_h - 224) if big_h > 224 else 0.5)
        oxs.append(ox / (big_w - 224))
    assert min(scales) <= 262 and max(scales) >= 506
    assert abs(np.mean(scales) - 384) < 12  # uniform on [256, 512]: sd of the mean ~3
    assert abs(np.mean(oxs) - 0.5) < 0.05 and min(oxs) < 0.02 and max(oxs) > 0.98


@pytest.mark.parametrize(
    "name,width,fmt", [("rocket", 500, "jpeg"), ("coffee", 40, "jpeg"), ("chelsea", 300, "png")]
)
def test_decode_and_crop_equals_resize_then_crop(name, width, fmt):
    """The window path (decode_and_crop_jpeg + direct resampling) reproduces the classic
    decode -> resize whole image -> crop, down- and upscaling, edges included."""
    img = resized(getattr(skimage.data, name)(), width)
    if fmt == "jpeg":
        encoded = tf.constant(jpeg(img, quality=95))
    else:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        encoded = tf.constant(buf.getvalue())
    fast, full = _aug(decode_crop=True), _aug(decode_crop=False)
    for i in range(25):
        a = _crop(fast)(encoded, _seed(i)).numpy()
        b = _crop(full)(encoded, _seed(i)).numpy()
        assert a.shape == b.shape == (64, 64, 3)
        np.testing.assert_allclose(a, b, atol=0.01)


def test_flip_rate_is_one_half():
    encoded = _photo_jpeg("chelsea", 300)
    flipped = 0
    n = 200
    for i in range(n):
        a = _pre(_aug(flip=True))(encoded, _seed(i)).numpy()
        b = _pre(_aug(flip=False))(encoded, _seed(i)).numpy()
        if np.allclose(a, b[:, ::-1], atol=0.01) and not np.allclose(a, b, atol=0.01):
            flipped += 1
        else:
            np.testing.assert_allclose(a, b, atol=0.01)
    assert abs(flipped / n - 0.5) < 0.1  # binomial sd 0.035


def test_color_shift_follows_the_imagenet_pca():
    encoded = _photo_jpeg("coffee", 300)
    deltas = []
    for i in range(200):
        a = _pre(_aug(color_shift=0.1))(encoded, _seed(i)).numpy()
        b = _pre(_aug())(encoded, _seed(i)).numpy()
        d = (a - b).reshape(-1, 3)
        assert np.allclose(d, d[0], atol=1e-3)  # one RGB offset per image
        deltas.append(d[0])
    deltas = np.array(deltas)
    assert np.all(np.abs(deltas.mean(0)) < 1.5)
    evals, evecs = np.linalg.eigh(np.cov(deltas.T))
    # Main axis: ImageNet's first eigenvector, sd 0.1 * 0.2175 * 255 = 5.5 levels.
    assert abs(evecs[:, -1] @ augment.PCA_EIGVEC[:, 0]) > 0.99
    assert abs(np.sqrt(evals[-1]) - 0.1 * 0.2175 * 255) < 0.1 * 0.2175 * 255 * 0.2

    # The pipeline's fused colour shift + normalisation equals normalize() of the shifted image.
    c = get_config()
    c.value_range, c.std_rgb = 1.0, (0.2, 0.3, 0.25)
    c.mean_rgb = (0.5, 0.4, 0.3)
    fused = augment.train_preprocess(encoded, _seed(5), _aug(color_shift=0.1), c).numpy()
    plain = input_common.normalize(
        augment.train_preprocess(encoded, _seed(5), _aug(color_shift=0.1)), c
    )
    np.testing.assert_allclose(fused, plain.numpy(), rtol=1e-5, atol=1e-4)


def test_no_colour_shift_for_grey():
    """The colour shift is defined for RGB only: a 1-channel image is left alone."""
    grey = tf.constant(jpeg(resized(skimage.data.camera(), 200)))
    g1 = augment.train_preprocess(grey, _seed(0), _aug(channels=1, color_shift=0.1))
    g0 = augment.train_preprocess(grey, _seed(0), _aug(channels=1))
    np.testing.assert_array_equal(g1.numpy(), g0.numpy())
