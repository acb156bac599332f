"""Host-side images: rescaling to a smallest side Q and the evaluators' ImageSet."""

import numpy as np
import pytest
import tensorflow as tf

from vgg_jax import image_io, input_pipeline


def test_rescaled_size_keeps_the_aspect_ratio_as_the_pipeline_does():
    for (h, w), q in [((28, 28), 32), ((375, 500), 256), ((500, 333), 384), ((60, 90), 40)]:
        want = tuple(int(v) for v in input_pipeline.rescaled_shape(h, w, q))
        assert image_io.rescaled_size(h, w, q) == want
        assert min(image_io.rescaled_size(h, w, q)) == q


def test_resize_image_is_the_pipelines_bilinear_resize():
    rng = np.random.default_rng(0)
    image = rng.random((30, 45, 3), dtype=np.float32)
    assert image_io.resize_image(image, 30, 45) is image  # nothing to do
    for h, w in [(60, 90), (20, 30)]:  # up and down (antialiased)
        out = image_io.resize_image(image, h, w)
        assert out.shape == (h, w, 3) and out.dtype == np.float32
        want = tf.image.resize(image, (h, w), method="bilinear", antialias=True).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    flat = np.full((28, 28, 1), 0.25, np.float32)
    np.testing.assert_allclose(image_io.resize_image(flat, 32, 32), 0.25, atol=1e-6)


def test_image_set_rescales_once_and_keeps_given_scales():
    rng = np.random.default_rng(1)
    images = [rng.random((32, 48, 3), dtype=np.float32), rng.random((40, 40, 3), dtype=np.float32)]
    given = [np.zeros((64, 96, 3), np.float32), np.ones((64, 64, 3), np.float32)]
    image_set = image_io.ImageSet(images, rescaled={64: given})
    assert len(image_set) == 2
    assert image_set.at_scale(64) is image_set.at_scale(64)
    assert image_set.at_scale(64)[1] is not images[1] and image_set.at_scale(64)[1].max() == 1.0
    at40 = image_set.at_scale(40)
    assert [im.shape for im in at40] == [(40, 60, 3), (40, 40, 3)]
    assert at40[1] is image_set.images[1]  # already at smallest side 40: not resampled
    sub = image_set.subset([1])
    assert len(sub) == 1 and sub.at_scale(64)[0] is given[1] and sub.at_scale(40)[0] is at40[1]
    # Rescaled images alone: the largest scale stands in for the originals.
    only = image_io.ImageSet(rescaled={32: [images[0][:, :32]], 64: [given[0]]})
    assert only.images[0].shape == (64, 96, 3)


def test_image_set_refuses_bad_input_clearly():
    with pytest.raises(ValueError, match="needs images"):
        image_io.ImageSet()
    with pytest.raises(ValueError, match=r"rescaled\[32\] has 1 images, expected 2"):
        image_io.ImageSet([np.zeros((8, 8, 1))] * 2, rescaled={32: [np.zeros((32, 32, 1))]})
    with pytest.raises(ValueError, match="HxWxC"):
        image_io.ImageSet([np.zeros((8, 8))])
    with pytest.raises(ValueError, match="batch axis"):
        image_io.as_image_set(np.zeros((32, 32, 3)))
    batch = image_io.as_image_set(np.zeros((2, 32, 32, 3)))
    assert image_io.as_image_set(batch) is batch and len(batch) == 2
