"""Input pipeline: sources -> tf.data -> numpy batches of this process's share (PAPER.md 2-3).

Public interface (every function takes the experiment's `config`, fields in
configs/default.py):

`train_dataset(config, *, start_step=0, process_index=None, process_count=None, bad_images=None)`
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
    from step k on, for the same process_count, corrupt files or not. Skipped
    steps are skipped before decoding. Bad images (config.bad_images): batch b
    holds the records at positions [bB, (b+1)B) of its epoch; with "skip" (the
    default) one that cannot be decoded is replaced by the next decodable record
    of [(b+1)B, (b+2)B) and counted exactly once per epoch, in `bad_images` (a
    `BadImageCounter`, updated before each batch is yielded) and in one warning
    at each epoch's end; "fail" raises an error naming the file. Training stops
    (RuntimeError, one line) only when a batch cannot be filled.

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
    A corrupt evaluation image is skipped and counted in `bad_images` (with the last
    batch; a warning names it), or with config.bad_images="fail" an error naming it.

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
on 2 CPU cores competes with the train step for the same cores. Undecodable
files are left out (or, with bad_images="fail", an error) and counted at each
epoch's first step; the permutation is read cyclically to fill the epoch.

Pixels: `decode_image` follows `image_io`'s rules (16-bit, palette, alpha on
white, luma), so PNGs read exactly as `predict` reads them (PIL); JPEGs agree
up to IDCT rounding. EXIF orientation is applied by `image_io` only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from vgg_jax import data_sources, image_io

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
BAD_IMAGE_POLICIES = ("skip", "fail")


@dataclasses.dataclass
class BadImageCounter:
    """Undecodable images skipped by a `train_dataset` or `eval_dataset` iterator.

    Create one, pass it as `bad_images=`; after every `next()` it describes the
    batch just yielded (this process only; sum over processes for a global count):

      batch        images skipped for that batch: a pure function of (config.seed,
                   step) and the data, so a resumed run counts what the first run did;
      names        their file names (tfds ids for tfds datasets);
      epoch        that batch's epoch (always 0 for evaluation);
      epoch_count  skipped in that epoch so far; total: skipped in all.

    Every bad file is counted once per epoch it is skipped in (`total` sums
    epochs). A resumed run starts from the counts it is given, e.g.
    `BadImageCounter(epoch=e, epoch_count=n, total=t)` or `resume` (each process's
    share of what a checkpoint kept); `epoch_count` restarts at 0 when the epoch changes.
    """

    batch: int = 0
    epoch: int = 0
    epoch_count: int = 0
    total: int = 0
    names: list[str] = dataclasses.field(default_factory=list)

    def add(self, epoch: int, names: list[str]) -> None:
        """Records the skipped files of one batch of `epoch`."""
        if epoch != self.epoch:
            self.epoch, self.epoch_count = epoch, 0
        self.batch, self.names = len(names), list(names)
        self.epoch_count += len(names)
        self.total += len(names)

    def saved(self, shares: np.ndarray) -> dict[str, Any]:
        """What a checkpoint keeps of the counts: the epoch, the counts summed over processes
        and each process's own [epoch_count, total] (`shares`, one row per process)."""
        shares = np.asarray(shares, np.int64).reshape(-1, 2)
        epoch_count, total = (int(v) for v in shares.sum(axis=0))
        return {
            "epoch": self.epoch,
            "epoch_count": epoch_count,
            "total": total,
            "processes": shares.tolist(),
        }

    def resume(self, saved: dict[str, Any], process_index: int, process_count: int) -> None:
        """Continues the counts of a checkpoint (`saved`: what `saved` returned then).

        Each process takes its own share when the run had as many processes; otherwise
        (another process count, or a checkpoint of an earlier version, which kept process
        0's counts only) process 0 takes them all and the others start at 0, so that the
        sum over processes stays the run's.
        """
        shares = saved.get("processes") or [[saved["epoch_count"], saved["total"]]]
        if len(shares) == process_count:
            own = shares[process_index]
        else:
            own = np.sum(shares, axis=0) if process_index == 0 else (0, 0)
        self.epoch = int(saved["epoch"])
        self.epoch_count, self.total = (int(v) for v in own)


def bad_image_policy(config) -> str:
    """config.bad_images: "skip" (default: skip and count) or "fail" (stop at the first)."""
    policy = config.get("bad_images", "skip")
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"config.bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}.")
    return policy


def _check_bad(config, names: list[str], what: str) -> None:
    """With config.bad_images="fail", an error naming the first undecodable file."""
    if names and bad_image_policy(config) == "fail":
        raise ValueError(
            f"{what} image {names[0]!r} cannot be decoded; repair or remove it, or set "
            "config.bad_images='skip' to skip and count such files."
        )


def _shown(names: list[str], most: int = 5) -> str:
    """The first few names, for a log line."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


def _log_epoch(epoch: int, pi: int, counter: BadImageCounter) -> None:
    log.warning(
        "Epoch %d, process %d: skipped %d training image(s) that could not be decoded "
        "(%d in all so far).",
        epoch,
        pi,
        counter.epoch_count,
        counter.total,
    )


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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _with_channels(rgb: tf.Tensor, channels: int) -> tf.Tensor:
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
        return _with_channels(image_io.flatten_alpha(tf.concat([colour, alpha], -1)), channels)

    def other():
        # Decoded as RGB, then luma for one channel: libjpeg refuses CMYK -> grey.
        rgb = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        return rgb if channels == 3 else _with_channels(tf.cast(rgb, tf.int32), channels)

    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
    image = tf.cond(is_png, png, other)
    image.set_shape([None, None, channels])
    return image


def _decode_jpeg_window(encoded: tf.Tensor, window: tf.Tensor, channels: int) -> tf.Tensor:
    """The [y, x, h, w] window of a JPEG, by `decode_image`'s rules (RGB, then luma)."""
    rgb = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    return rgb if channels == 3 else _with_channels(tf.cast(rgb, tf.int32), channels)


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


# Seed offset for a record borrowed into the batch before its own: its augmentation then
# differs from the one it gets in its own batch.
_BORROWED = 1 << 40


def _chunk_pairs(records: tf.data.Dataset, skip: int, local_batch: int) -> tf.data.Dataset:
    """(chunk b, chunk b + 1) of the epoch's encoded records, chunk b = positions [bB, (b+1)B).

    A second pass of the records follows the first, so the last batch has a successor.
    Records are only read here (never decoded), so skipped steps cost no decoding.
    """
    flat = records.repeat(2).enumerate().skip(skip * local_batch)
    chunks = flat.map(lambda p, ex: {**ex, "position": p}).batch(local_batch, drop_remainder=True)
    empty = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), chunks.element_spec)
    pairs = chunks.scan(empty, lambda prev, cur: (cur, (prev, cur)))
    return pairs.skip(1)


def _train_epoch(config, source, aug, epoch, skip, steps, pi, pc, local_batch) -> tf.data.Dataset:
    """This process's batches of one epoch, starting `skip` batches in.

    Batch b holds the records at positions [bB, (b+1)B) of the epoch's order, B =
    local_batch. A record that cannot be decoded is replaced by the next decodable
    record of positions [(b+1)B, (b+2)B), decoded with another augmentation seed,
    so each batch is a function of (seed, epoch, b) and the data alone: resuming
    at any step is exact with corrupt files too. Each element also carries the
    positions it used ('position') and the names of all its candidates ('names')
    for counting; a batch with fewer than B rows could not be filled.
    """
    shuffle_seed = _epoch_seed(config.seed, epoch, pi)
    records = source.records(config.train_split, pi, pc, shuffle_seed, config.shuffle_buffer)
    num_classes = config.num_classes

    def preprocess(ex):
        own = ex["position"] < ex["limit"]
        position = tf.where(own, ex["position"], ex["position"] + _BORROWED)
        seed = _example_seed(config.seed, epoch, pi, position)
        image = train_preprocess(ex["image"], seed, aug, config)
        return {"image": image, "label": ex["label"], "position": ex["position"]}

    def fill(prev, cur):
        candidates = tf.nest.map_structure(lambda a, b: tf.concat([a, b], 0), prev, cur)
        limit = prev["position"][0] + local_batch
        rows = tf.data.Dataset.from_tensor_slices(candidates)
        # Sequential map: a borrowed record is decoded only when an own one failed.
        rows = rows.map(lambda ex: preprocess({**ex, "limit": limit})).ignore_errors()
        batch = rows.take(local_batch).batch(local_batch)
        spec = batch.element_spec
        empty = tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape[1:]], s.dtype), spec)
        batch = batch.concatenate(tf.data.Dataset.from_tensors(empty)).take(1)
        return batch.map(lambda b: {**b, "names": candidates["name"]})

    def check_label(ex):
        label = tf.cast(ex["label"], tf.int32)
        tf.debugging.assert_less(
            label, num_classes, message="label out of range: set config.num_classes > label"
        )
        tf.debugging.assert_non_negative(label, message="negative label")
        return {**ex, "label": label}

    pairs = _chunk_pairs(records, skip, local_batch).take(steps - skip)
    ds = pairs.interleave(
        fill, cycle_length=tf.data.AUTOTUNE, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return ds.map(check_label).prefetch(tf.data.AUTOTUNE)


def _bad_names(batch: Batch, b: int, local_batch: int, steps: int, shard: int) -> list[str]:
    """Names of the undecodable records a batch skipped, each counted by exactly one batch.

    Batch b counts its own positions [bB, (b+1)B) that it did not use; the last batch
    also counts the records of the epoch's tail [steps*B, shard) that it tried. Records
    of the next batch that failed as substitutes are left for that batch to count.
    """
    used = set(batch["position"].tolist())
    first = b * local_batch
    tried_end = max(used) + 1 if len(used) == local_batch else first + 2 * local_batch
    own_end = first + local_batch
    if b == steps - 1:
        own_end = max(own_end, min(tried_end, shard))
    names = batch["names"]
    return [names[p - first].decode() for p in range(first, own_end) if p not in used]


def train_dataset(
    config,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    bad_images: BadImageCounter | None = None,
) -> Iterator[Batch]:
    """Infinite iterator over this process's share of each global training batch.

    `bad_images` (optional) is updated before each batch is yielded.
    """
    counter = BadImageCounter() if bad_images is None else bad_images
    bad_image_policy(config)
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
        images, labels, bad = _in_memory(config, source, aug, pi, pc)
        return _memory_iterator(
            config.seed, images, labels, start_step, steps, pi, local_batch, bad, counter
        )
    return _train_iterator(config, source, aug, start_step, steps, pi, pc, local_batch, counter)


def _train_iterator(config, source, aug, start_step, steps, pi, pc, local_batch, counter):
    epoch, skip = divmod(start_step, steps)
    shard = source.shard_sizes(config.train_split, pc)[pi]
    while True:
        ds = _train_epoch(config, source, aug, epoch, skip, steps, pi, pc, local_batch)
        for b, batch in enumerate(ds.as_numpy_iterator(), start=skip):
            bad = _bad_names(batch, b, local_batch, steps, shard)
            _check_bad(config, bad, "Training")
            if len(batch["label"]) < local_batch:
                raise RuntimeError(
                    f"Epoch {epoch}, step {epoch * steps + b}, process {pi}: only "
                    f"{len(batch['label'])} of {2 * local_batch} training images around this "
                    f"batch decode, fewer than its {local_batch}; too many files are corrupt or "
                    "unreadable (check the data in config.data_dir)."
                )
            counter.add(epoch, bad)
            if b == steps - 1 and counter.epoch_count:
                _log_epoch(epoch, pi, counter)
            yield {"image": batch["image"], "label": batch["label"]}
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


def _in_memory(config, source, aug: Augment, pi: int, pc: int):
    """This process's training share, rescaled to S = image_size, centre-cropped, normalised.

    Returns (images, labels, names of the files that could not be decoded).
    """
    _check_cacheable(aug)
    key = (
        config.dataset, config.data_dir, config.get("manual_dir", ""), tuple(config.classes),
        config.train_split, pi, pc, aug, config.value_range, tuple(config.mean_rgb),
        tuple(config.std_rgb),
    )  # fmt: skip
    if key not in _MEMORY:
        _MEMORY.clear()  # one training set at a time
        records = source.records(config.train_split, pi, pc, None, 0)

        def preprocess(position, ex):
            image = eval_preprocess(ex["image"], aug.channels, aug.size, aug.size, aug.method)
            return normalize(image, config), tf.cast(ex["label"], tf.int32), position

        ds = records.enumerate().map(
            preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        images, labels, kept = [], [], []
        for image, label, position in ds.ignore_errors().batch(1024).as_numpy_iterator():
            images.append(image)
            labels.append(label)
            kept.append(position)
        empty = (np.zeros((0, aug.size, aug.size, aug.channels), np.float32), np.zeros(0, np.int32))
        images_np = np.concatenate(images) if images else empty[0]
        labels_np = np.concatenate(labels) if labels else empty[1]
        if labels_np.size and not 0 <= labels_np.min() <= labels_np.max() < config.num_classes:
            raise ValueError(
                f"Training labels span {labels_np.min()}..{labels_np.max()}: set "
                "config.num_classes > the largest label."
            )
        shard = source.shard_sizes(config.train_split, pc)[pi]
        found = set(np.concatenate(kept).tolist()) if kept else set()
        bad = _record_names(records, sorted(set(range(shard)) - found))
        _check_bad(config, bad, "Training")
        if bad:
            log.warning(
                "Process %d: skipped %d training image(s) that could not be decoded (in "
                "every epoch): %s", pi, len(bad), _shown(bad),
            )  # fmt: skip
        _MEMORY[key] = (images_np, labels_np, bad)  # float32 already: normalize() returns it
        log.info("Cached %d training images (%.0f MiB).", len(labels_np), images_np.nbytes / 2**20)
    return _MEMORY[key]


def _record_names(records: tf.data.Dataset, positions: list[int]) -> list[str]:
    """The names of the records at `positions` (sorted); reads the records only if any."""
    if not positions:
        return []
    wanted, names = set(positions), []
    for position, name in records.map(lambda ex: ex["name"]).enumerate().as_numpy_iterator():
        if position in wanted:
            names.append(name.decode())
    return names


def _memory_iterator(
    seed, images, labels, start_step, steps, pi, local_batch, bad, counter
) -> Iterator[Batch]:
    """Batches of a per-epoch permutation that depends only on (seed, epoch, process).

    With undecodable files there are fewer images than steps * local_batch: the
    permutation is then read cyclically (its first images serve twice). The
    skipped files are counted at each epoch's first step.
    """
    if len(labels) < local_batch:
        raise RuntimeError(
            f"Process {pi}: only {len(labels)} decodable training images in memory, fewer than "
            f"one batch of {local_batch}; too many files are corrupt or unreadable."
        )
    epoch, skip = divmod(start_step, steps)
    while True:
        order = np.random.default_rng(_epoch_seed(seed, epoch, pi)).permutation(len(labels))
        for b in range(skip, steps):
            rows = order[np.arange(b * local_batch, (b + 1) * local_batch) % len(labels)]
            counter.add(epoch, bad if b == 0 else [])
            if b == steps - 1 and counter.epoch_count:
                _log_epoch(epoch, pi, counter)
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
    bad_images: BadImageCounter | None = None,
    normalize: bool = True,
    scales: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """One pass over this process's share, padded to full batches with a 'mask'.

    `normalize=False`: raw pixels in [0, 1] (for networks that normalise their
    own input, as the evaluator's do). `scales=(Q1, Q2, ...)`: every example
    at each Q, each resampled from the original image, in one stream: the
    batch holds `'images'` {Q: images} instead of `'image'`. Undecodable images
    are skipped and counted in `bad_images` when the last batch is yielded
    (config.bad_images="skip"), or an error naming the first (="fail").
    """
    counter = BadImageCounter() if bad_images is None else bad_images
    policy = bad_image_policy(config)
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

    def preprocess(position, ex):
        real = tf.constant(True)
        if scales:
            images = tuple(
                _eval_pixels(ex["image"], channels, q, crop, config, normalize) for q in scales
            )
            return {"images": images, "label": ex["label"], "mask": real, "position": position}
        image = _eval_pixels(ex["image"], channels, scale, crop, config, normalize)
        return {"image": image, "label": ex["label"], "mask": real, "position": position}

    def check_label(ex):
        label = tf.cast(ex["label"], tf.int32)
        tf.debugging.assert_less(
            label, num_classes, message="label out of range: set config.num_classes > label"
        )
        return {**ex, "label": label}

    pad = {
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
        "position": tf.constant(-1, tf.int64),
    }
    if scales:
        pad["images"] = tuple(tf.zeros([crop or q, crop or q, channels]) for q in scales)
    else:
        pad["image"] = tf.zeros([crop or scale, crop or scale, channels], tf.float32)
    ds = records.enumerate().map(
        preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    if policy == "skip":
        ds = ds.ignore_errors()
    ds = ds.map(check_label).concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(num_batches * local_batch).batch(local_batch).prefetch(tf.data.AUTOTUNE)
    if policy == "fail":
        batches = _eval_iterator(ds, records, channels, local_batch)
    else:
        batches = _skipping_eval_iterator(ds, records, sizes[pi], num_batches, counter)
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
            batch.pop("position")
            yield batch
            yielded += 1
    except tf.errors.OpError as e:
        _raise_bad_file(records, yielded * local_batch, channels, e)


def _skipping_eval_iterator(ds, records, shard, num_batches, counter) -> Iterator[Batch]:
    """Eval batches, the positions they jump over counted as bad with the last batch.

    Names are looked up once, after the whole pass (one more read of the records,
    and only when a file was bad).
    """
    used = []
    try:
        for i, batch in enumerate(ds.as_numpy_iterator()):
            used.extend(batch.pop("position")[batch["mask"]].tolist())
            if i == num_batches - 1:
                bad = _record_names(records, sorted(set(range(shard)) - set(used)))
                counter.add(0, bad)
                if bad:
                    log.warning("Skipped %d undecodable evaluation image(s): %s", len(bad),
                                _shown(bad))  # fmt: skip
            yield batch
    except tf.errors.OpError as e:
        raise ValueError(f"Evaluation input failed: {e.message.strip()}") from None


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
