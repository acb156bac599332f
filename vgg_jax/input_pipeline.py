"""Input pipeline: sources -> tf.data -> numpy batches of this process's share (PAPER.md 2-3).

Public interface (every function takes the experiment's `config`, fields in
configs/default.py):

`train_dataset(config, *, start_step=0, process_index=None, process_count=None)`
    Infinite iterator of `{'image': float32 (B, size, size, C), 'label': int32 (B,)}`
    with B = config.batch_size // process_count (the trainer assembles global
    batches with `jax.make_array_from_process_local_data`). Each epoch has
    exactly `steps_per_epoch(config)` batches on every process. Training
    preprocessing per image: isotropic rescale to smallest side S (S fixed, or
    uniform in [train_scale_min, train_scale_max] per image), random
    image_size crop, random horizontal flip, AlexNet PCA colour shift (3-channel
    images only, alpha ~ N(0, color_shift)), then `normalize`. JPEG images are
    decoded only inside the crop's window (`tf.image.decode_and_crop_jpeg`).
    Order and augmentation are a pure function of (config.seed, epoch, process,
    position in the epoch): `start_step=k` yields exactly what a fresh run yields
    from step k on, for the same process_count. Skipped steps are skipped
    before decoding. A training image that cannot be decoded is dropped and
    counted (one warning per epoch); the epoch then borrows examples from a
    second pass so that the number of batches never changes (with corrupt files,
    exact resume holds only up to that substitution).

`eval_dataset(config, *, split=None, batch_size=None, mode="center_crop", scale=None,
              normalize=True, scales=None, ...)`
    One pass over this process's disjoint share of `split` (default
    config.eval_split) in a fixed order. Every batch has `'mask'` bool (B,),
    True for real examples: the last batches are padded so that all processes
    yield the same number of batches and each example counts exactly once.
      mode="center_crop": rescale smallest side to Q = scale or config.eval_scale,
        central image_size crop; B = (batch_size or config.eval_batch_size) // process_count.
      mode="full": the whole image rescaled to smallest side Q (aspect kept),
        one image per batch: image (1, H, W, C), label (1,), mask (1,). Padding
        entries are Q x Q zeros with mask False. Dense evaluation and the 5x5
        multi-crop grid are built from these by the evaluator.
      normalize=False: raw pixels in [0, 1] instead of `normalize`d ones.
      scales=(Q1, Q2, ...): every example at each Q (each resampled from the
        original image) in one stream, `'images'`: {Q: (B, H_Q, W_Q, C)}
        replacing `'image'` (the evaluator's multi-scale input).
    A corrupt evaluation image is an error naming the file.

`decode_eval_image(encoded, config, scale)` -> float32 (H, W, C): the "full"
    preprocessing for one encoded image (bytes), for tools that score files.
`num_examples(config, split)`, `steps_per_epoch(config)` (floor of train
    examples / global batch), `image_shape(config)` (size, size, channels: 1 for
    Fashion-MNIST, 3 for image folders), `normalize(images, config)`: pixel values
    in [0, 255] -> value_range units, minus mean_rgb, divided by std_rgb.

Optional config field `decode_crop` (default True): False decodes whole JPEGs,
resizes the whole image and crops (the reference path; same result).

`config.cache=True` (small datasets such as Fashion-MNIST): this process's
training share is decoded, rescaled to S = image_size, centre-cropped and
normalised once, held in memory as float32, and served as batches of a
per-epoch permutation (a function of seed, epoch and process, so resuming is
exact). Only for a fixed preprocessing: with scale jittering, random crops,
flips or colour shift it is a ValueError. Saves the per-epoch decoding, which
on 2 CPU cores competes with the train step for the same cores.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from vgg_jax import data_sources

log = logging.getLogger(__name__)


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

# AlexNet's PCA of ImageNet RGB pixels (values in [0, 1]): eigenvalues and
# eigenvectors (columns), as used for its colour augmentation.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
    np.float32,
)

Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------
# Configuration checks and small helpers.


@functools.lru_cache(maxsize=8)
def _cached_source(
    dataset: str, data_dir: str, manual_dir: str, classes: tuple[int, ...] = ()
) -> data_sources.Source:
    return data_sources.create_source(dataset, data_dir, manual_dir, classes)


def get_source(config) -> data_sources.Source:
    """The (cached) source of config.dataset, restricted to config.classes when set."""
    classes = tuple(int(c) for c in config.get("classes", ()) or ())
    return _cached_source(config.dataset, config.data_dir, config.get("manual_dir", ""), classes)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    return process_index, process_count


def _local_batch(batch_size: int, process_count: int, what: str) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"{what} {batch_size} must be a positive multiple of the number of processes "
            f"({process_count}); change config.{what}."
        )
    return batch_size // process_count


def _check_source(config, source: data_sources.Source, split: str) -> int:
    n = source.num_examples(split)
    if n == 0:
        raise ValueError(
            f"Split {split!r} of {source.name!r} is empty; point config.data_dir / the split "
            "setting at data that has examples."
        )
    if source.num_classes is not None and source.num_classes > config.num_classes:
        raise ValueError(
            f"{source.name!r} has {source.num_classes} classes but the model has "
            f"config.num_classes={config.num_classes}; set config.num_classes={source.num_classes}."
        )
    return n


def _channel_stats(config, channels: int) -> tuple[np.ndarray, np.ndarray]:
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
    mean, std = _channel_stats(config, int(images.shape[-1]))
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


def steps_per_epoch(config) -> int:
    """Training steps per epoch: floor(train examples / global batch size)."""
    n = num_examples(config, config.train_split)
    steps = n // config.batch_size
    if steps == 0:
        raise ValueError(
            f"Training split has {n} examples, fewer than one batch of {config.batch_size}; "
            "lower config.batch_size."
        )
    return steps


# ---------------------------------------------------------------------------
# Per-image preprocessing (TensorFlow graph code).


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
        if not size <= lo <= hi:
            raise ValueError(
                f"Need image_size <= train_scale_min <= train_scale_max, got {size}, {lo}, {hi}."
            )
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


def decode_image(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """Any JPEG/PNG/BMP/GIF -> uint8 (H, W, channels); grey, CMYK and alpha are converted."""
    image = tf.io.decode_image(encoded, channels=channels, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def rescaled_shape(height, width, smallest_side, minimum: int = 1):
    """(H, W) after an isotropic rescale to `smallest_side`, each side at least `minimum`."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    f = tf.cast(smallest_side, tf.float32) / tf.minimum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * f), tf.int32), minimum)
    new_w = tf.maximum(tf.cast(tf.round(w * f), tf.int32), minimum)
    return new_h, new_w


def _resize(image: tf.Tensor, height, width, method: str) -> tf.Tensor:
    return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), method=method)


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
        out = _resize(image, big_h, big_w, aug.method)[oy : oy + size, ox : ox + size]
        return tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        return crop_from_window(
            lambda y, x, h, w: tf.image.decode_and_crop_jpeg(
                encoded, tf.stack([y, x, h, w]), channels=aug.channels
            ),
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
    mean, std = _channel_stats(config, aug.channels)
    gain = np.float32(config.value_range / 255.0) / std
    return image * gain + (delta * gain - mean / std)


def eval_preprocess(
    encoded: tf.Tensor, channels: int, scale: int, crop: int | None, method: str
) -> tf.Tensor:
    """Rescale smallest side to `scale`; central crop x crop if crop is set. float32 [0, 255]."""
    image = decode_image(encoded, channels)
    shape = tf.shape(image)
    h, w = rescaled_shape(shape[0], shape[1], scale, minimum=crop or 1)
    image = _resize(image, h, w, method)
    if crop:
        oy, ox = (h - crop) // 2, (w - crop) // 2
        image = tf.ensure_shape(image[oy : oy + crop, ox : ox + crop], [crop, crop, channels])
    return image


def decode_eval_image(
    encoded: bytes, config, scale: int | None = None, channels: int = 3
) -> np.ndarray:
    """One encoded image -> normalised float32 (H, W, C) with smallest side Q (mode "full")."""
    scale = scale or config.eval_scale
    image = eval_preprocess(tf.constant(encoded), channels, scale, None, config.resize_method)
    return np.asarray(normalize(image, config))


# ---------------------------------------------------------------------------
# Training iterator.


def _epoch_seed(seed: int, epoch: int, process_index: int) -> int:
    """A 63-bit seed for one process's epoch (shuffle order)."""
    state = np.random.SeedSequence([seed, epoch, process_index]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def _example_seed(seed: int, epoch: int, process_index: int, position: tf.Tensor) -> tf.Tensor:
    """Stateless-op seed of one example: a function of (seed, epoch, process, position)."""
    base = tf.constant([seed, epoch * 65_536 + process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, position)


def _train_epoch(config, source, aug, epoch, skip, steps, pi, pc, local_batch) -> tf.data.Dataset:
    """This process's batches of one epoch, starting `skip` batches in."""
    shuffle_seed = _epoch_seed(config.seed, epoch, pi)
    records = source.records(config.train_split, pi, pc, shuffle_seed, config.shuffle_buffer)
    # A second pass stands in for any records dropped as undecodable.
    ds = records.repeat(2).enumerate().skip(skip * local_batch)
    num_classes = config.num_classes

    def preprocess(position, ex):
        seed = _example_seed(config.seed, epoch, pi, position)
        image = train_preprocess(ex["image"], seed, aug, config)
        return {"image": image, "label": ex["label"], "position": position}

    def check_label(ex):
        label = tf.cast(ex["label"], tf.int32)
        tf.debugging.assert_less(
            label, num_classes, message="label out of range: set config.num_classes > label"
        )
        tf.debugging.assert_non_negative(label, message="negative label")
        return {**ex, "label": label}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().map(check_label)
    ds = ds.batch(local_batch, drop_remainder=True).take(steps - skip)
    return ds.prefetch(tf.data.AUTOTUNE)


def train_dataset(
    config,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Infinite iterator over this process's share of each global training batch."""
    pi, pc = _processes(process_index, process_count)
    local_batch = _local_batch(config.batch_size, pc, "batch_size")
    source = get_source(config)
    _check_source(config, source, config.train_split)
    _channel_stats(config, source.channels)
    aug = Augment.from_config(config, source.channels, config.get("decode_crop", True))
    steps = steps_per_epoch(config)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    if config.cache:
        images, labels = _in_memory(config, source, aug, pi, pc)
        return _memory_iterator(config.seed, images, labels, start_step, steps, pi, local_batch)
    return _train_iterator(config, source, aug, start_step, steps, pi, pc, local_batch)


def _train_iterator(config, source, aug, start_step, steps, pi, pc, local_batch):
    epoch, skip = divmod(start_step, steps)
    while True:
        ds = _train_epoch(config, source, aug, epoch, skip, steps, pi, pc, local_batch)
        seen, last = 0, skip * local_batch - 1
        for batch in ds.as_numpy_iterator():
            positions = batch.pop("position")
            seen += positions.size
            last = int(positions[-1])
            yield batch
        if seen < (steps - skip) * local_batch:
            raise RuntimeError(
                f"Epoch {epoch}, process {pi}: only {seen} decodable training images for "
                f"{steps - skip} batches of {local_batch}; too many files are corrupt or "
                "unreadable (check the data in config.data_dir)."
            )
        dropped = (last + 1 - skip * local_batch) - seen
        if dropped:
            log.warning(
                "Epoch %d, process %d: skipped %d training image(s) that could not be decoded.",
                epoch,
                pi,
                dropped,
            )
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------
# In-memory training set (config.cache): preprocessed once, shuffled per epoch.

_MEMORY: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _check_cacheable(aug: Augment) -> None:
    """config.cache stores each image preprocessed once: only for a fixed preprocessing."""
    varying = []
    if not aug.scale_min == aug.scale_max == aug.size:
        varying.append("random crops/scale jittering (train_scale_min/max != image_size)")
    if aug.flip:
        varying.append("random flips (random_flip)")
    if aug.color_shift > 0 and aug.channels == 3:
        varying.append("colour shift (color_shift)")
    if varying:
        raise ValueError(
            "config.cache keeps every training image preprocessed once, but this config "
            f"changes images every epoch: {', '.join(varying)}. Set cache=False, or fix "
            "those augmentations."
        )


def _in_memory(config, source, aug: Augment, pi: int, pc: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's training share, rescaled to S = image_size, centre-cropped, normalised."""
    _check_cacheable(aug)
    key = (
        config.dataset, config.data_dir, config.get("manual_dir", ""), tuple(config.classes),
        config.train_split, pi, pc, aug, config.value_range, tuple(config.mean_rgb),
        tuple(config.std_rgb),
    )  # fmt: skip
    if key not in _MEMORY:
        _MEMORY.clear()  # one training set at a time
        records = source.records(config.train_split, pi, pc, None, 0)

        def preprocess(ex):
            image = eval_preprocess(ex["image"], aug.channels, aug.size, aug.size, aug.method)
            return normalize(image, config), tf.cast(ex["label"], tf.int32)

        ds = records.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        images, labels = [], []
        for image, label in ds.ignore_errors().batch(1024).as_numpy_iterator():
            images.append(image)
            labels.append(label)
        empty = (np.zeros((0, aug.size, aug.size, aug.channels), np.float32), np.zeros(0, np.int32))
        images_np = np.concatenate(images) if images else empty[0]
        labels_np = np.concatenate(labels) if labels else empty[1]
        if labels_np.size and not 0 <= labels_np.min() <= labels_np.max() < config.num_classes:
            raise ValueError(
                f"Training labels span {labels_np.min()}..{labels_np.max()}: set "
                "config.num_classes > the largest label."
            )
        dropped = source.shard_sizes(config.train_split, pc)[pi] - len(labels_np)
        if dropped > 0:
            log.warning(
                "Process %d: skipped %d training image(s) that could not be decoded.", pi, dropped
            )
        _MEMORY[key] = (images_np, labels_np)  # float32 already: normalize() returns it
        log.info("Cached %d training images (%.0f MiB).", len(labels_np), images_np.nbytes / 2**20)
    return _MEMORY[key]


def _memory_iterator(seed, images, labels, start_step, steps, pi, local_batch) -> Iterator[Batch]:
    """Batches of a per-epoch permutation that depends only on (seed, epoch, process)."""
    need = steps * local_batch
    if len(labels) < need:
        raise RuntimeError(
            f"Process {pi}: only {len(labels)} decodable training images in memory for "
            f"{steps} batches of {local_batch}; too many files are corrupt or unreadable."
        )
    epoch, skip = divmod(start_step, steps)
    while True:
        order = np.random.default_rng(_epoch_seed(seed, epoch, pi)).permutation(len(labels))
        for b in range(skip, steps):
            rows = order[b * local_batch : (b + 1) * local_batch]
            yield {"image": images[rows], "label": labels[rows]}
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------
# Evaluation iterator.


def eval_dataset(
    config,
    *,
    split: str | None = None,
    batch_size: int | None = None,
    mode: str = "center_crop",
    scale: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    normalize: bool = True,
    scales: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """One pass over this process's share, padded to full batches with a 'mask'.

    `normalize=False`: raw pixels in [0, 1] (for networks that normalise their
    own input, as the evaluator's do). `scales=(Q1, Q2, ...)`: every example
    at each Q, each resampled from the original image, in one stream: the
    batch holds `'images'` {Q: images} instead of `'image'`.
    """
    if mode not in ("center_crop", "full"):
        raise ValueError(f"eval mode must be 'center_crop' or 'full', got {mode!r}.")
    if scales is not None and not scales:
        raise ValueError("scales must name at least one test scale Q.")
    pi, pc = _processes(process_index, process_count)
    split = split or config.eval_split
    source = get_source(config)
    _check_source(config, source, split)
    if normalize:  # raw pixels need no statistics
        _channel_stats(config, source.channels)
    scale = scale or config.eval_scale
    crop = config.image_size if mode == "center_crop" else None
    for q in scales or (scale,):
        if crop and q < crop:
            raise ValueError(f"eval scale Q={q} is smaller than image_size={crop}.")
    if mode == "full":
        local_batch = 1
    else:
        local_batch = _local_batch(batch_size or config.eval_batch_size, pc, "eval_batch_size")
    sizes = source.shard_sizes(split, pc)
    num_batches = math.ceil(max(sizes) / local_batch)
    records = source.records(split, pi, pc, None, 0)
    channels, num_classes = source.channels, config.num_classes

    def preprocess(ex):
        label = tf.cast(ex["label"], tf.int32)
        tf.debugging.assert_less(
            label, num_classes, message="label out of range: set config.num_classes > label"
        )
        if scales:
            images = tuple(
                _eval_pixels(ex["image"], channels, q, crop, config, normalize) for q in scales
            )
            return {"images": images, "label": label, "mask": tf.constant(True)}
        image = _eval_pixels(ex["image"], channels, scale, crop, config, normalize)
        return {"image": image, "label": label, "mask": tf.constant(True)}

    pad = {"label": tf.constant(0, tf.int32), "mask": tf.constant(False)}
    if scales:
        pad["images"] = tuple(tf.zeros([crop or q, crop or q, channels]) for q in scales)
    else:
        pad["image"] = tf.zeros([crop or scale, crop or scale, channels], tf.float32)
    ds = records.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(num_batches * local_batch).batch(local_batch).prefetch(tf.data.AUTOTUNE)
    batches = _eval_iterator(ds, records, channels, local_batch)
    return _by_scale(batches, tuple(scales)) if scales else batches


def _eval_pixels(encoded, channels: int, scale: int, crop, config, normalized: bool) -> tf.Tensor:
    """One evaluation image at Q = `scale`: normalised, or raw pixels in [0, 1]."""
    image = eval_preprocess(encoded, channels, scale, crop, config.resize_method)
    # Raw pixels scaled exactly as normalize() with value_range 1, mean 0, std 1 would.
    return normalize(image, config) if normalized else image * np.float32(1.0 / 255.0)


def _by_scale(batches: Iterator[Batch], scales: tuple[int, ...]) -> Iterator[Batch]:
    """The per-scale image tuple of each batch as {Q: images}."""
    for batch in batches:
        batch["images"] = dict(zip(scales, batch["images"], strict=True))
        yield batch


def _eval_iterator(ds, records, channels, local_batch) -> Iterator[Batch]:
    yielded = 0
    try:
        for batch in ds.as_numpy_iterator():
            yield batch
            yielded += 1
    except tf.errors.OpError as e:
        _raise_bad_file(records, yielded * local_batch, channels, e)


def _raise_bad_file(records, start: int, channels: int, error: Exception):
    """Finds the first undecodable record from `start` on and names it in the error."""
    for ex in records.skip(start).as_numpy_iterator():
        try:
            decode_image(tf.constant(ex["image"]), channels)
        except tf.errors.OpError as e:
            name = ex["name"].decode()
            raise ValueError(
                f"Evaluation image {name!r} cannot be decoded ({e.message.strip()}); "
                "repair or remove it."
            ) from None
    raise ValueError(f"Evaluation input failed: {getattr(error, 'message', error)}") from error
