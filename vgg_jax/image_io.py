"""Images on the host: reading files (PIL, pixels in [0, 1], clear errors) and rescaling.

`open_image` / `load_image` read one file for the command-line tools;
`rescaled_size` / `resize_image` rescale to a smallest side Q as the input
pipeline does; `ImageSet` holds a batch of images with their rescaled
versions, shared by the evaluators of `vgg_jax.protocols`.

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

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

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
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; give image files (DIR/*.png).")
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


def rescaled_size(height: int, width: int, smallest_side: int) -> tuple[int, int]:
    """(H, W) after an isotropic rescale to `smallest_side` (rounded as the input pipeline does)."""
    f = smallest_side / min(height, width)
    return max(1, int(round(height * f))), max(1, int(round(width * f)))


@functools.lru_cache(maxsize=1)
def _tf():
    import tensorflow as tf

    try:  # TensorFlow only resizes on the host; never let it take accelerator memory.
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    return tf


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one HxWxC float image (antialiased when shrinking).

    TensorFlow's eager op, not jax.image.resize: it runs on any shape without
    compiling, and ImageNet images come in hundreds of shapes.
    """
    if image.shape[:2] == (height, width):
        return image
    tf = _tf()
    out = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
    return out.numpy().astype(np.float32)


class ImageSet:
    """A batch of images plus their rescaled versions, shared by evaluators.

    `images`: NHWC array or list of HxWxC arrays, pixels in [0, 1].
    `rescaled`: optional {Q: list of images already rescaled to smallest side
    Q} (the input pipeline produces these); missing scales are computed from
    `images` (or from the largest given scale) and cached.
    """

    def __init__(
        self,
        images: np.ndarray | Sequence[np.ndarray] | None = None,
        rescaled: Mapping[int, Sequence[np.ndarray]] | None = None,
    ) -> None:
        self._rescaled: dict[int, list[np.ndarray]] = {
            int(q): [_check_image(im) for im in ims] for q, ims in (rescaled or {}).items()
        }
        if images is None:
            if not self._rescaled:
                raise ValueError("ImageSet needs images or rescaled images.")
            images = self._rescaled[max(self._rescaled)]
        self.images = [_check_image(im) for im in images]
        for q, ims in self._rescaled.items():
            if len(ims) != len(self.images):
                raise ValueError(f"rescaled[{q}] has {len(ims)} images, expected {len(self)}.")

    def __len__(self) -> int:
        return len(self.images)

    def at_scale(self, q: int) -> list[np.ndarray]:
        """The images rescaled to smallest side q (aspect ratio kept)."""
        if q not in self._rescaled:
            self._rescaled[q] = [
                resize_image(im, *rescaled_size(im.shape[0], im.shape[1], q)) for im in self.images
            ]
        return self._rescaled[q]

    def subset(self, indices: Sequence[int]) -> ImageSet:
        rescaled = {q: [ims[i] for i in indices] for q, ims in self._rescaled.items()}
        return ImageSet([self.images[i] for i in indices], rescaled)


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(
            f"Expected an HxWxC image (or a batch of them), got an array of shape {image.shape}."
        )
    return image


def as_image_set(images: ImageSet | np.ndarray | Sequence[np.ndarray]) -> ImageSet:
    if isinstance(images, ImageSet):
        return images
    if hasattr(images, "shape") and np.ndim(images) == 3:
        raise ValueError(
            f"Expected a batch of images (N, H, W, C) or a list of HxWxC images; got shape "
            f"{np.shape(images)}. Add a batch axis for a single image."
        )
    return ImageSet(images)

