"""vgg_jax.image_io: tf.data's decoder (training, evaluation) reads what PIL's (predict) reads;
rescaling to a smallest side Q and the evaluators' ImageSet."""

import io

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from vgg_jax import image_io
from vgg_jax import input_pipeline as ip

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (24, 20, 3), np.uint8)


def _pil_png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _palette(transparent: bool) -> bytes:
    image = Image.fromarray(NOISE).convert("P", palette=Image.ADAPTIVE, colors=16)
    if not transparent:
        return _pil_png(image)
    return _pil_png(image, transparency=int(np.asarray(image)[0, 0]))


PNGS = {
    # 16-bit PNGs written by TensorFlow's encoder (PIL writes 16-bit greyscale only).
    "grey16": lambda: tf.io.encode_png(RNG.integers(0, 65536, (24, 20, 1), np.uint16)).numpy(),
    "rgb16": lambda: tf.io.encode_png(RNG.integers(0, 65536, (24, 20, 3), np.uint16)).numpy(),
    "rgba16": lambda: tf.io.encode_png(RNG.integers(0, 65536, (24, 20, 4), np.uint16)).numpy(),
    "grey_alpha16": lambda: tf.io.encode_png(
        RNG.integers(0, 65536, (24, 20, 2), np.uint16)
    ).numpy(),
    "palette": lambda: _palette(False),  # 4-bit palette
    "palette_transparent": lambda: _palette(True),
    "rgba": lambda: _pil_png(Image.fromarray(RNG.integers(0, 256, (24, 20, 4), np.uint8))),
    "grey_alpha": lambda: _pil_png(
        Image.fromarray(RNG.integers(0, 256, (24, 20, 2), np.uint8), "LA")
    ),
    "grey": lambda: _pil_png(Image.fromarray(NOISE[..., 0])),
    "one_bit": lambda: _pil_png(Image.fromarray(NOISE[..., 0] > 128)),
    "rgb": lambda: _pil_png(Image.fromarray(NOISE)),
}


def _both(tmp_path, data: bytes, channels: int, name="image"):
    path = tmp_path / name
    path.write_bytes(data)
    ours = ip.decode_image(tf.constant(data), channels).numpy()
    pil = image_io.to_uint8(image_io.load_image(path, channels))
    return ours, pil


@pytest.mark.parametrize("kind", sorted(PNGS))
@pytest.mark.parametrize("channels", [3, 1])
def test_png_pixels_identical_in_tf_data_and_pil(tmp_path, kind, channels):
    ours, pil = _both(tmp_path, PNGS[kind](), channels)
    assert ours.shape == pil.shape == (24, 20, channels)
    np.testing.assert_array_equal(ours, pil)


def test_sixteen_bit_png_reads_its_high_byte_not_saturated(tmp_path):
    values = np.linspace(0, 65535, 24 * 20).astype(np.uint16).reshape(24, 20, 1)
    path = tmp_path / "grey16.png"
    path.write_bytes(tf.io.encode_png(values).numpy())
    image = image_io.load_image(path, 3)
    assert (image == 1.0).mean() < 0.01  # PIL's plain convert("RGB") saturates ~all pixels
    np.testing.assert_array_equal(image_io.to_uint8(image)[..., 0], (values[..., 0] >> 8))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red under the alpha
    rgba[0, :, 3] = 255  # opaque row: the colour itself
    rgba[1, :, 3] = 0  # transparent row: the background
    rgba[2, :, 3] = 128  # half: halfway between
    ours, pil = _both(tmp_path, _pil_png(Image.fromarray(rgba)), 3)
    np.testing.assert_array_equal(ours, pil)
    assert ours[0, 0].tolist() == [200, 0, 0]
    assert ours[1, 0].tolist() == [image_io.ALPHA_BACKGROUND] * 3
    assert ours[2, 0].tolist() == [227, 127, 127]  # (200*128 + 255*127 + 127) // 255, ...


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


PHOTO = Image.fromarray(skimage.data.chelsea()).resize((120, 80))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_pixels_agree_up_to_idct_rounding(tmp_path, mode, channels):
    """libjpeg in TensorFlow and in PIL differ in IDCT and chroma upsampling details (and CMYK
    conversion), so JPEG pixels agree to about one grey level on average, a few at edges."""
    ours, pil = _both(tmp_path, _jpeg(PHOTO.convert(mode)), channels)
    assert ours.shape == pil.shape == (80, 120, channels)
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 16, (diff.mean(), diff.max())


def test_gif_and_bmp_identical(tmp_path):
    gif = io.BytesIO()
    Image.fromarray(NOISE).convert("P").save(gif, format="GIF")
    bmp = io.BytesIO()
    Image.fromarray(NOISE).save(bmp, format="BMP")
    for name, data in (("a.gif", gif.getvalue()), ("a.bmp", bmp.getvalue())):
        ours, pil = _both(tmp_path, data, 3, name)
        np.testing.assert_array_equal(ours, pil)


def test_truncated_and_garbage_files_are_named(tmp_path):
    for name, data in (
        ("cut.png", PNGS["rgb"]()[:200]),
        ("cut.jpg", _jpeg(PHOTO)[:500]),
        ("junk.png", b"not an image"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            image_io.load_image(tmp_path / name)
        with pytest.raises(tf.errors.InvalidArgumentError):
            ip.decode_image(tf.constant(data), 3).numpy()


def test_a_directory_given_as_an_image_is_named_as_one(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory; give image files"):
        image_io.load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        image_io.load_image(tmp_path / "none.png")


def test_rescaled_size_keeps_the_aspect_ratio_as_the_pipeline_does():
    for (h, w), q in [((28, 28), 32), ((375, 500), 256), ((500, 333), 384), ((60, 90), 40)]:
        want = tuple(int(v) for v in ip.rescaled_shape(h, w, q))
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
