"""tf.data's decoder (training, evaluation) reads what PIL's (predict) reads."""

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
