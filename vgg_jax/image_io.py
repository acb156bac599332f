"""Reading one image file for the command-line tools: PIL, pixels in [0, 1], clear errors.

Also the pixel rules every decoder follows, so that an image reads the same in
training and evaluation (tf.data, `input_pipeline.decode_image`) as in
`predict` (PIL, `open_image`): 16-bit samples keep their high byte, palette
and greyscale images are expanded, transparent pixels are composited on white
(`ALPHA_BACKGROUND`, how a viewer shows them on a page), and a 1-channel model
sees ITU-R 601 luma (`luma`, PIL's "L"). `flatten_alpha` and `luma` take
int32 arrays of numpy or TensorFlow alike, so both decoders share one formula.
EXIF orientation is applied here only (TensorFlow's decoders ignore it).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Transparent pixels are composited on this grey level (white), in every decoder.
ALPHA_BACKGROUND = 255
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def flatten_alpha(rgba):
    """int32 (..., 4) RGBA (numpy or tf) -> int32 (..., 3) RGB composited on ALPHA_BACKGROUND.

    Integer arithmetic rounded to nearest, so opaque pixels come back unchanged.
    """
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return (rgb * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255


def luma(rgb):
    """int32 (..., 3) RGB (numpy or tf) -> int32 (..., 1) ITU-R 601 luma, exactly PIL's "L"."""
    return (rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 32768) // 65536


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> "L" by its high byte, as libpng (tf.io.decode_png) reads it.

    PIL's own conversion clips 16-bit values at 255, which saturates the image.
    16-bit RGB(A) PNGs already open as 8-bit "RGB(A)" (high byte).
    """
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    values = np.clip(np.asarray(image, np.int64), 0, 65_535) >> 8
    return Image.fromarray(values.astype(np.uint8), "L")


def _flattened(image: Image.Image) -> Image.Image:
    """An image with an alpha channel or a transparent palette entry composited on white.

    A single transparent colour of a grey or RGB PNG (its tRNS chunk) is ignored,
    as TensorFlow's PNG decoder ignores it.
    """
    palette_alpha = image.mode == "P" and "transparency" in image.info
    if image.mode not in _ALPHA_MODES and not palette_alpha:
        return image
    rgba = np.asarray(image.convert("RGBA"), np.int32)
    return Image.fromarray(flatten_alpha(rgba).astype(np.uint8), "RGB")


def open_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """The image at `path`, upright (EXIF orientation applied), as PIL "RGB" or "L" (channels=1).

    Greyscale, palette, CMYK, 16-bit and transparent images are converted by the
    module's rules (alpha composited on white). A missing, unreadable or
    truncated file raises an error that names it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file {path!r} does not exist.")
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything now, so truncated files fail here
            image = _flattened(_eight_bit(ImageOps.exif_transpose(image)))
            image = image.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read image {path!r}: {e}. Is it a valid JPEG/PNG file?") from e
    return image


def unit_float(image: np.ndarray) -> np.ndarray:
    """float32 pixels in [0, 1] from uint8 ones (0-255); float images pass unchanged."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.asarray(image, np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 pixels (0-255) from floats in [0, 1], clipped and rounded: `unit_float`'s inverse."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def pixels(image: Image.Image) -> np.ndarray:
    """A PIL "RGB" or "L" image as float32 (H, W, 3 or 1) in [0, 1]."""
    array = unit_float(np.asarray(image))
    return array[..., None] if array.ndim == 2 else array


def load_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """The image at `path` as float32 (H, W, channels) in [0, 1] (see `open_image`)."""
    return pixels(open_image(path, channels))
