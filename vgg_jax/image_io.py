"""Reading one image file for the command-line tools: PIL, pixels in [0, 1], clear errors."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def open_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """The image at `path`, upright (EXIF orientation applied), as PIL "RGB" or "L" (channels=1).

    Greyscale, palette, CMYK and alpha images are converted (alpha dropped). A
    missing, unreadable or truncated file raises an error that names it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file {path!r} does not exist.")
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything now, so truncated files fail here
            image = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
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
