"""What the training and evaluation streams share: sources, shares, pixels, bad images.

Both `vgg_jax.train_input` and `vgg_jax.eval_input` read config.dataset
through `get_source` (cached per dataset, directories and classes), split it
into this process's disjoint share (`process_share`, `local_batch_size`),
decode and rescale images by the same rules and count the files that cannot be
decoded in a `BadImageCounter` (config.bad_images: "skip" counts them, "fail"
stops at the first with an error naming it).

`num_examples(config, split)`, `image_shape(config)` (size, size, channels: 1
for Fashion-MNIST, 3 for image folders), `normalize(images, config)`: pixel
values in [0, 255] -> value_range units, minus mean_rgb, divided by std_rgb.
`eval_preprocess` is the fixed preprocessing (rescale the smallest side to Q,
optional central crop) of evaluation and of the in-memory training set.

Pixels: `decode_image` follows `image_io`'s rules (16-bit, palette, alpha on
white, luma), so PNGs read exactly as `predict` reads them (PIL); JPEGs agree
up to IDCT rounding. EXIF orientation is applied by `image_io` only.

Importing this module keeps TensorFlow off the accelerators (it only
preprocesses, on the CPU) and drops one tfds notice that concerns tfds's code.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from vgg_jax import data_sources, image_io
from vgg_jax.bad_images import (  # noqa: F401  (re-exported: the streams' shared names)
    BAD_IMAGE_POLICIES,
    BadImageCounter,
    bad_image_policy,
    check_bad_images,
)


class _DropTfdsCounterNotice(logging.Filter):
    """Drops TensorFlow's notice that tfds's reader uses the deprecated CounterV2.

    It is printed at the first read of every tfds dataset and concerns tfds's
    code, not the user's; every other TensorFlow warning still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "CounterV2 (from tensorflow.python.data.experimental" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_DropTfdsCounterNotice())

# TensorFlow only preprocesses on the CPU; never let it take accelerator memory.
try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised: nothing to do
    pass

Batch = dict[str, np.ndarray]


def shown_names(names: list[str], most: int = 5) -> str:
    """The first few names, for a log line."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


# ---------------------------------------------------------------------------
# Sources, process shares and configuration checks.


@functools.lru_cache(maxsize=8)
def _cached_source(
    dataset: str, data_dir: str, manual_dir: str, classes: tuple[int, ...] = ()
) -> data_sources.Source:
    return data_sources.create_source(dataset, data_dir, manual_dir, classes)


def clear_source_cache() -> None:
    """Forgets the sources `get_source` holds, e.g. after files under a data_dir changed."""
    _cached_source.cache_clear()


def get_source(config) -> data_sources.Source:
    """The (cached) source of config.dataset, restricted to config.classes when set."""
    classes = tuple(int(c) for c in config.get("classes", ()) or ())
    return _cached_source(config.dataset, config.data_dir, config.get("manual_dir", ""), classes)


def process_share(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), each defaulting to JAX's, checked to be consistent."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    return process_index, process_count


def local_batch_size(batch_size: int, process_count: int, what: str) -> int:
    """One process's part of a global batch; `what` names the config field in the error."""
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"{what} {batch_size} must be a positive multiple of the number of processes "
            f"({process_count}); change config.{what}."
        )
    return batch_size // process_count


def check_source(config, source: data_sources.Source, split: str) -> int:
    """The number of examples of `split`, which must be non-empty and have config.num_classes.

    More outputs than classes would train, and then fail the test evaluation at the end.
    """
    n = source.num_examples(split)
    if n == 0:
        raise ValueError(
            f"Split {split!r} of {source.name!r} is empty; point config.data_dir / the split "
            "setting at data that has examples."
        )
    if source.num_classes is not None and source.num_classes != config.num_classes:
        raise ValueError(
            f"{source.name!r} has {source.num_classes} classes but the model has "
            f"config.num_classes={config.num_classes}; set config.num_classes={source.num_classes}."
        )
    return n


def channel_stats(config, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """config.mean_rgb and std_rgb as float32 arrays, checked against the channel count."""
    mean = np.asarray(config.mean_rgb, np.float32).reshape(-1)
    std = np.asarray(config.std_rgb, np.float32).reshape(-1)
    for name, v in (("mean_rgb", mean), ("std_rgb", std)):
        if v.size not in (1, channels):
            raise ValueError(
                f"config.{name} has {v.size} values but the images have {channels} channel(s); "
                f"give 1 or {channels} values."
            )
    if np.any(std <= 0):
        raise ValueError(f"config.std_rgb must be positive, got {config.std_rgb}.")
    return mean, std


def normalize(images, config):
    """Pixel values in [0, 255] (any dtype, numpy or tf) -> (x * value_range / 255 - mean) / std."""
    mean, std = channel_stats(config, int(images.shape[-1]))
    scale = np.float32(config.value_range / 255.0)
    if isinstance(images, tf.Tensor):
        return (tf.cast(images, tf.float32) * scale - mean) / std
    return (np.asarray(images, np.float32) * scale - mean) / std


def num_examples(config, split: str) -> int:
    """Number of examples in a split of config.dataset."""
    return get_source(config).num_examples(split)


def image_shape(config) -> tuple[int, int, int]:
    """(image_size, image_size, channels) of training batches, e.g. to initialise a model."""
    return (config.image_size, config.image_size, get_source(config).channels)


# ---------------------------------------------------------------------------
# Decoding and rescaling (TensorFlow graph code).


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The functions the training and evaluation streams hand tf.data decide on tensors with
# tf.cond / tf.where and use Python `if` on settings only, so AutoGraph's rewrite of their
# source is not needed; it cost about 1.5 s per pipeline built on a 2-core CPU
# (benchmarks/RESULTS.md). data_sources' record maps are one-line lambdas and keep it.
traced_as_written = tf.autograph.experimental.do_not_convert


def with_channels(rgb: tf.Tensor, channels: int) -> tf.Tensor:
    """int32 RGB -> uint8 RGB, or its luma (`image_io.luma`) for one channel."""
    return tf.cast(image_io.luma(rgb) if channels == 1 else rgb, tf.uint8)


def decode_image(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """Any JPEG/PNG/BMP/GIF -> uint8 (H, W, channels) by `image_io`'s pixel rules.

    PNGs (16-bit, palette, grey, alpha) give exactly `image_io.open_image`'s
    pixels: decoded as 8-bit RGBA (libpng keeps a 16-bit sample's high byte),
    alpha composited on white, luma for one channel. JPEG (grey and CMYK too),
    BMP and GIF use TensorFlow's decoders, which agree with PIL's up to JPEG's
    IDCT rounding and CMYK conversion.
    """
    if channels not in (1, 3):
        raise ValueError(f"Images decode to 1 or 3 channels, not {channels}.")

    def png():
        # channels=0: as stored (grey, grey+alpha, RGB, RGBA; palette expanded, its tRNS as
        # alpha). decode_png(channels=4) would fill a wrong alpha into low-bit-depth files.
        native = tf.cast(tf.io.decode_png(encoded, channels=0), tf.int32)
        shape = tf.shape(native)
        has_alpha = shape[2] % 2 == 0
        colour = native[..., : shape[2] - tf.cast(has_alpha, tf.int32)]
        colour = tf.broadcast_to(colour, tf.concat([shape[:2], [3]], 0))
        alpha = tf.where(has_alpha, native[..., -1:], 255)
        return with_channels(image_io.flatten_alpha(tf.concat([colour, alpha], -1)), channels)

    def other():
        # Decoded as RGB, then luma for one channel: libjpeg refuses CMYK -> grey.
        rgb = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        return rgb if channels == 3 else with_channels(tf.cast(rgb, tf.int32), channels)

    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
    image = tf.cond(is_png, png, other)
    image.set_shape([None, None, channels])
    return image


def rescaled_shape(height, width, smallest_side, minimum: int = 1):
    """(H, W) after an isotropic rescale to `smallest_side`, each side at least `minimum`."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    f = tf.cast(smallest_side, tf.float32) / tf.minimum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * f), tf.int32), minimum)
    new_w = tf.maximum(tf.cast(tf.round(w * f), tf.int32), minimum)
    return new_h, new_w


def resize(image: tf.Tensor, height, width, method: str) -> tf.Tensor:
    """`image` resampled to (height, width) by tf.image.resize's `method`: float32."""
    return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), method=method)


def eval_preprocess(
    encoded: tf.Tensor, channels: int, scale: int, crop: int | None, method: str
) -> tf.Tensor:
    """Rescale smallest side to `scale`; central crop x crop if crop is set. float32 [0, 255]."""
    return rescale_and_crop(decode_image(encoded, channels), scale, crop, method)


def rescale_and_crop(image: tf.Tensor, scale: int, crop: int | None, method: str) -> tf.Tensor:
    """`eval_preprocess` of a decoded (H, W, C) image: float32 in its input's units."""
    channels = image.shape[-1]
    shape = tf.shape(image)
    h, w = rescaled_shape(shape[0], shape[1], scale, minimum=crop or 1)
    image = resize(image, h, w, method)
    if crop:
        oy, ox = (h - crop) // 2, (w - crop) // 2
        image = tf.ensure_shape(image[oy : oy + crop, ox : ox + crop], [crop, crop, channels])
    return image


# Rows per chunk of `map_skipping_errors`: the span of rows one failure can be confined to.
SKIP_CHUNK = 256


def map_skipping_errors(records: tf.data.Dataset, fn) -> tf.data.Dataset:
    """`records.map(fn)` in order and in parallel, without the rows whose `fn` fails.

    A row fails when its image cannot be decoded; it is skipped. The skipping stays inside
    each chunk of rows, because `ignore_errors()` after the reader would retry a failed
    *read* (a truncated or corrupt TFRecord file) forever: the run hung. Such a failure is
    raised instead (`tf.errors.DataLossError`; `numpy_batches` reports it).
    """

    def chunk(*rows):  # a tuple of columns arrives unpacked (records.enumerate())
        columns = rows if len(rows) > 1 else rows[0]
        return tf.data.Dataset.from_tensor_slices(columns).map(fn).ignore_errors()

    return records.batch(SKIP_CHUNK).interleave(
        traced_as_written(chunk),
        cycle_length=tf.data.AUTOTUNE,
        block_length=SKIP_CHUNK,  # each chunk's rows in a row: the records' order is kept
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def numpy_batches(ds: tf.data.Dataset, source: data_sources.Source, split: str) -> Iterator:
    """`ds.as_numpy_iterator()`; a failed read of the split's record files as one clear error."""
    try:
        yield from ds.as_numpy_iterator()
    except tf.errors.DataLossError as e:
        where = getattr(getattr(source, "builder", None), "data_dir", None) or "its directory"
        reason = str(e).split("}}")[-1].split("[Op:")[0].strip().rstrip("'")
        raise ValueError(
            f"The {split!r} records of {source.name} in {where} are damaged ({reason}): "
            "prepare the dataset again (delete that directory and run again) or restore them."
        ) from None


def record_names(records: tf.data.Dataset, positions: list[int]) -> list[str]:
    """The names of the records at `positions` (sorted); reads the records only if any."""
    if not positions:
        return []
    wanted, names = set(positions), []
    names_only = traced_as_written(lambda ex: ex["name"])
    for position, name in records.map(names_only).enumerate().as_numpy_iterator():
        if position in wanted:
            names.append(name.decode())
    return names
