"""The source frameworks' own single-image preprocessing, to the pixel.

* torchvision's classification preset (`ImageClassification(crop_size=224)`:
  `Resize(256)` + `CenterCrop(224)` on a PIL image). `Resize` with one int
  sets the short side and truncates the long side,
  `int(size * long / short)` (`_compute_resized_output_size`); on a PIL image
  it is `Image.resize(..., BILINEAR)`, which antialiases. `CenterCrop` takes
  its offsets as `int(round((h - crop) / 2.0))` (Python's round: half to even).
* Keras applications' examples: `keras.utils.load_img(path, target_size=(224,
  224))`, which squashes the whole image to 224x224 with `Image.resize(...,
  NEAREST)` (its default `interpolation="nearest"`, no aspect ratio kept), then
  `preprocess_input` ('caffe' mode: BGR, mean subtracted, no scaling), which
  is the bundle's `Preprocessing`.

* A training run (`vgg_jax.pretrained.load_run`): its own validation view
  (`input_common.rescale_and_crop`, the same TensorFlow ops): smallest side
  rescaled to the run's eval_scale with its resize_method, central image_size
  crop.

Other networks trained here (bundles without a run's eval_scale) take the
torchvision path, scaled to their image_size (short side
round(image_size * 256 / 224)).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from vgg_jax.image_io import pixels, to_uint8

RESIZE_FOR_224 = 256


def torchvision_resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size)`: short side `size`, long truncated."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def torchvision_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of torchvision's `CenterCrop(crop)`."""
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return left, top, left + crop, top + crop


def torchvision_crop(image: Image.Image, crop: int = 224, resize: int | None = None) -> Image.Image:
    """`Resize(resize)` + `CenterCrop(crop)` on a PIL image; resize defaults to crop * 256 / 224."""
    resize = resize or round(crop * RESIZE_FOR_224 / 224)
    size = torchvision_resized_size(*image.size, resize)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    return image.crop(torchvision_crop_box(*image.size, crop))


def keras_resize(image: Image.Image, size: int = 224) -> Image.Image:
    """`keras.utils.load_img(target_size=(size, size))`: the whole image, nearest neighbour."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.NEAREST)
    return image


def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image from a PIL image or float pixels in [0, 1] (H, W, 1 or 3)."""
    if isinstance(image, Image.Image):
        return image
    quantised = to_uint8(image)
    return Image.fromarray(quantised[..., 0] if quantised.shape[-1] == 1 else quantised)


def run_view(image: Image.Image | np.ndarray, scale: int, crop: int, method: str) -> np.ndarray:
    """A training run's validation view of one image, as float pixels in [0, 1]."""
    from vgg_jax import input_common  # TensorFlow, imported only for runs

    uint8 = np.asarray(as_pil(image))
    uint8 = uint8[..., None] if uint8.ndim == 2 else uint8
    view = input_common.rescale_and_crop(uint8, scale, crop, method)
    return np.asarray(view, np.float32) / 255.0


def describe_view(bundle: Any) -> str:
    """How `reference_crop` views images for this bundle, in a few words."""
    meta, size = bundle.metadata or {}, bundle.image_size
    if meta.get("eval_scale"):
        return f"the run's view: smallest side {meta['eval_scale']}, central {size} crop"
    if meta.get("source_format") == "keras":
        return f"Keras's squash to {size}"
    return f"torchvision's central {size} crop"


def reference_crop(image: Image.Image | np.ndarray, bundle: Any) -> np.ndarray:
    """The network input view of one image for this bundle's source, as float pixels in [0, 1].

    Training runs get their own validation view, Keras-converted bundles
    (`metadata["source_format"] == "keras"`) Keras's squash to image_size, every
    other bundle torchvision's resize + centre crop.
    """
    meta, size = bundle.metadata or {}, bundle.image_size
    if meta.get("eval_scale"):
        method = meta.get("resize_method", "bilinear")
        return run_view(image, int(meta["eval_scale"]), size, method)
    image = as_pil(image)
    if meta.get("source_format") == "keras":
        return pixels(keras_resize(image, size))
    return pixels(torchvision_crop(image, size))
