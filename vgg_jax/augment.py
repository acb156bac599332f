"""The training preprocessing of one image: random rescale and crop, flip, colour shift.

Per image (PAPER.md 3.1): isotropic rescale to smallest side S (S fixed, or
uniform in [train_scale_min, train_scale_max] per image), random image_size
crop, random horizontal flip, AlexNet PCA colour shift (3-channel images only,
alpha ~ N(0, color_shift)), then `normalize` folded into one multiply-add.
Every random choice is a stateless function of the seed it is given, so
`vgg_jax.train_input` can make augmentation a function of (seed, epoch,
process, position).

JPEG images are decoded only inside the crop's window
(`tf.image.decode_and_crop_jpeg`) and resampled exactly where a resize of the
whole image would sample. Optional config field `decode_crop` (default True):
False decodes whole JPEGs, resizes the whole image and crops (the reference
path; same result).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from vgg_jax import configuration
from vgg_jax.input_common import (
    channel_stats,
    decode_image,
    rescaled_shape,
    resize,
    with_channels,
)

# AlexNet's PCA of ImageNet RGB pixels (values in [0, 1]): eigenvalues and
# eigenvectors (columns), as used for its colour augmentation.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
    np.float32,
)


@dataclasses.dataclass(frozen=True)
class Augment:
    """The training preprocessing, resolved from a config."""

    size: int
    scale_min: int
    scale_max: int
    flip: bool
    color_shift: float
    channels: int
    method: str
    decode_crop: bool = True  # decode JPEGs only inside the crop window

    @classmethod
    def from_config(cls, config, channels: int, decode_crop: bool = True) -> Augment:
        size, lo, hi = config.image_size, config.train_scale_min, config.train_scale_max
        if config.resize_method not in _KERNELS:
            raise ValueError(
                f"config.resize_method {config.resize_method!r} not supported; use one of "
                f"{sorted(_KERNELS)}."
            )
        configuration.check_scales(config)
        return cls(
            size,
            lo,
            hi,
            bool(config.random_flip),
            float(config.color_shift),
            channels,
            config.resize_method,
            decode_crop,
        )


def _decode_jpeg_window(encoded: tf.Tensor, window: tf.Tensor, channels: int) -> tf.Tensor:
    """The [y, x, h, w] window of a JPEG, by `decode_image`'s rules (RGB, then luma)."""
    rgb = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    return rgb if channels == 3 else with_channels(tf.cast(rgb, tf.int32), channels)


# tf.image.resize method -> the equivalent ScaleAndTranslate kernel (same samples, no antialias).
_KERNELS = {
    "bilinear": "triangle",
    "bicubic": "keyscubic",
    "lanczos3": "lanczos3",
    "lanczos5": "lanczos5",
    "gaussian": "gaussian",
    "mitchellcubic": "mitchellcubic",
}


def _window(offset, rescaled, original, size: int):
    """Original rows [start, start + length) read by a crop of rescaled rows [offset, offset+size).

    Output row r samples original coordinate (offset + r + 0.5) / scale - 0.5; the
    window adds a margin of two pixels for the resampling kernel's support.
    """
    inv = tf.cast(original, tf.float32) / tf.cast(rescaled, tf.float32)
    first = tf.floor((tf.cast(offset, tf.float32) + 0.5) * inv - 0.5)
    last = tf.floor((tf.cast(offset + size, tf.float32) - 0.5) * inv - 0.5)
    start = tf.maximum(tf.cast(first, tf.int32) - 2, 0)
    end = tf.minimum(tf.cast(last, tf.int32) + 3, original)
    return start, end - start


def _pad_edges(image: tf.Tensor) -> tf.Tensor:
    """Repeat the outermost rows and columns once (much faster than a SYMMETRIC tf.pad)."""
    image = tf.concat([image[:1], image, image[-1:]], 0)
    return tf.concat([image[:, :1], image, image[:, -1:]], 1)


def _resample_crop(window, y0, x0, big_h, big_w, h, w, oy, ox, size: int, method: str, flip):
    """The size x size crop at (oy, ox) of the (h, w) image rescaled to (big_h, big_w).

    `window` is the part of the image starting at (y0, x0). Samples are taken
    exactly where tf.image.resize of the whole image would take them (output row r
    at original coordinate (oy + r + 0.5) * h / big_h - 0.5), so the result equals
    resize-then-crop while computing only the crop's pixels. `flip` (bool tensor)
    mirrors the crop horizontally at no cost.
    """
    ratio_y = tf.cast(h, tf.float32) / tf.cast(big_h, tf.float32)
    ratio_x = tf.cast(w, tf.float32) / tf.cast(big_w, tf.float32)
    if method == "bilinear":
        # crop_and_resize is the fastest sampler; a one-pixel edge copy reproduces resize's
        # clamping at the image border (crop_and_resize would extrapolate there).
        padded = _pad_edges(tf.cast(window, tf.float32))
        last = tf.cast(tf.shape(padded)[:2] - 1, tf.float32)
        top = (tf.cast(oy, tf.float32) + 0.5) * ratio_y - 0.5 - tf.cast(y0, tf.float32) + 1.0
        left = (tf.cast(ox, tf.float32) + 0.5) * ratio_x - 0.5 - tf.cast(x0, tf.float32) + 1.0
        bottom, right = top + (size - 1) * ratio_y, left + (size - 1) * ratio_x
        left, right = tf.where(flip, right, left), tf.where(flip, left, right)
        box = tf.stack([top / last[0], left / last[1], bottom / last[0], right / last[1]])
        return tf.image.crop_and_resize(padded[None], box[None], [0], [size, size])[0]
    scale = tf.stack([1.0 / ratio_y, 1.0 / ratio_x])
    shift = tf.cast(tf.stack([y0, x0]), tf.float32) * scale - tf.cast(
        tf.stack([oy, ox]), tf.float32
    )
    out = tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(window, tf.float32)[None],
        size=tf.constant([size, size]),
        scale=scale,
        translation=shift,
        kernel_type=_KERNELS[method],
        antialias=False,
    )[0]
    return tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)


def sample_crop(height, width, seed: tf.Tensor, aug: Augment):
    """Random S, rescaled (H, W) with smallest side S, and the crop's top-left (oy, ox) in it."""
    s_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    scale = tf.random.stateless_uniform(
        [], s_seed, minval=aug.scale_min, maxval=aug.scale_max + 1, dtype=tf.int32
    )
    big_h, big_w = rescaled_shape(height, width, scale, minimum=aug.size)
    oy = tf.random.stateless_uniform([], y_seed, 0, big_h - aug.size + 1, dtype=tf.int32)
    ox = tf.random.stateless_uniform([], x_seed, 0, big_w - aug.size + 1, dtype=tf.int32)
    return scale, big_h, big_w, oy, ox


def random_scaled_crop(
    encoded: tf.Tensor, seed: tf.Tensor, aug: Augment, flip: tf.Tensor | bool = False
) -> tf.Tensor:
    """Rescale to a random smallest side S, take a random size x size crop: float32 [0, 255].

    The crop is mirrored horizontally where `flip` is true.
    With aug.decode_crop, JPEGs are decoded only inside the original-image window
    that the crop maps back to, which is then rescaled by the same factor; the
    result equals the full-decode crop up to resampling at the window edges.
    """
    size = aug.size

    def geometry(h, w):
        return sample_crop(h, w, seed, aug)[1:]

    flip = tf.convert_to_tensor(flip)

    def crop_from_window(decode_window, h, w):
        big_h, big_w, oy, ox = geometry(h, w)
        y0, hh = _window(oy, big_h, h, size)
        x0, ww = _window(ox, big_w, w, size)
        window = decode_window(y0, x0, hh, ww)
        return _resample_crop(window, y0, x0, big_h, big_w, h, w, oy, ox, size, aug.method, flip)

    if not aug.decode_crop:
        image = decode_image(encoded, aug.channels)
        shape = tf.shape(image)
        big_h, big_w, oy, ox = geometry(shape[0], shape[1])
        out = resize(image, big_h, big_w, aug.method)[oy : oy + size, ox : ox + size]
        return tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        return crop_from_window(
            lambda y, x, h, w: _decode_jpeg_window(encoded, tf.stack([y, x, h, w]), aug.channels),
            shape[0],
            shape[1],
        )

    def other():
        image = decode_image(encoded, aug.channels)
        shape = tf.shape(image)
        return crop_from_window(lambda y, x, h, w: image[y : y + h, x : x + w], shape[0], shape[1])

    out = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(out, [size, size, aug.channels])


def color_shift_delta(seed: tf.Tensor, std: float) -> tf.Tensor:
    """AlexNet PCA lighting in [0, 255] units: eigvec @ (alpha * eigval), alpha ~ N(0, std)."""
    alpha = tf.random.stateless_normal([3], seed, stddev=std)
    return tf.linalg.matvec(PCA_EIGVEC, alpha * PCA_EIGVAL) * 255.0


def train_preprocess(encoded: tf.Tensor, seed: tf.Tensor, aug: Augment, config=None) -> tf.Tensor:
    """One training image: float32 in [0, 255] units, or normalised when `config` is given.

    The colour shift and `normalize` are folded into one multiply-add per pixel.
    """
    crop_seed, flip_seed, color_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5 if aug.flip else tf.constant(False)
    image = random_scaled_crop(encoded, crop_seed, aug, flip)
    delta = tf.zeros([aug.channels])
    if aug.color_shift > 0 and aug.channels == 3:
        delta = color_shift_delta(color_seed, aug.color_shift)
    if config is None:
        return image + delta
    mean, std = channel_stats(config, aug.channels)
    gain = np.float32(config.value_range / 255.0) / std
    return image * gain + (delta * gain - mean / std)
