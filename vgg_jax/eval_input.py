"""The evaluation stream: one padded pass over a split, each example counted once.

`eval_dataset(config, *, split=None, batch_size=None, mode="center_crop", scale=None,
              normalize=True, scales=None, ...)`
    One pass over this process's disjoint share of `split` (default
    config.eval_split) in a fixed order. Every batch has `'mask'` bool (B,),
    True for real examples: the last batches are padded so that all processes
    yield the same number of batches and each example counts exactly once.
      mode="center_crop": rescale smallest side to Q = scale or config.eval_scale,
        central image_size crop; B = (batch_size or config.eval_batch_size) // process_count.
      mode="full": the whole image rescaled to smallest side Q (aspect kept),
        one image per batch: image (1, H, W, C), label (1,), mask (1,); or, when
        every image of the source has one size (`Source.image_size`, e.g.
        Fashion-MNIST), batch_size images of this process per batch (default 1),
        which spares the host a step per image. Padding entries are zeros with
        mask False. Dense evaluation and the 5x5 multi-crop grid are built from
        these by the evaluator.
      normalize=False: raw pixels in [0, 1] instead of `normalize`d ones.
      scales=(Q1, Q2, ...): every example at each Q (each resampled from the
        original image) in one stream, `'images'`: {Q: (B, H_Q, W_Q, C)}
        replacing `'image'` (the evaluator's multi-scale input).
    A corrupt evaluation image is skipped and counted in `bad_images` (with the last
    batch; a warning names it), or with config.bad_images="fail" an error naming it.

`decode_eval_image(encoded, config, scale)` -> float32 (H, W, C): the "full"
    preprocessing for one encoded image (bytes), for tools that score files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from vgg_jax.input_common import (
    BadImageCounter,
    Batch,
    bad_image_policy,
    channel_stats,
    check_source,
    decode_image,
    eval_preprocess,
    get_source,
    local_batch_size,
    map_skipping_errors,
    normalize,
    numpy_batches,
    process_share,
    record_names,
    rescaled_shape,
    shown_names,
    traced_as_written,
)

log = logging.getLogger(__name__)


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
    batch holds `'images'` {Q: images} instead of `'image'`. mode="full" batches
    `batch_size` images of this process when the source's images all have one
    size (`Source.image_size`), else one image. Undecodable images
    are skipped and counted in `bad_images` when the last batch is yielded
    (config.bad_images="skip"), or an error naming the first (="fail").
    """
    counter = BadImageCounter() if bad_images is None else bad_images
    policy = bad_image_policy(config)
    if mode not in ("center_crop", "full"):
        raise ValueError(f"eval mode must be 'center_crop' or 'full', got {mode!r}.")
    if scales is not None and not scales:
        raise ValueError("scales must name at least one test scale Q.")
    pi, pc = process_share(process_index, process_count)
    split = split or config.eval_split
    source = get_source(config)
    check_source(config, source, split)
    if normalize:  # raw pixels need no statistics
        channel_stats(config, source.channels)
    scale = scale or config.eval_scale
    crop = config.image_size if mode == "center_crop" else None
    for q in scales or (scale,):
        if crop and q < crop:
            raise ValueError(f"eval scale Q={q} is smaller than image_size={crop}.")
    fixed_size = None  # the rescaled (H, W) at each Q when every image has one size
    if mode == "full":
        local_batch = 1
        if source.image_size and batch_size:
            local_batch = batch_size
            fixed_size = {q: _rescaled(source.image_size, q) for q in scales or (scale,)}
    else:
        local_batch = local_batch_size(batch_size or config.eval_batch_size, pc, "eval_batch_size")
    sizes = source.shard_sizes(split, pc)
    num_batches = math.ceil(max(sizes) / local_batch)
    records = source.records(split, pi, pc, None, 0)
    channels, num_classes = source.channels, config.num_classes

    def pixels(encoded, q):
        image = _eval_pixels(encoded, channels, q, crop, config, normalize)
        if fixed_size:  # a static shape, so that batches of them can form
            image = tf.ensure_shape(image, [*fixed_size[q], channels])
        return image

    def preprocess(position, ex):
        real = tf.constant(True)
        if scales:
            images = tuple(pixels(ex["image"], q) for q in scales)
            return {"images": images, "label": ex["label"], "mask": real, "position": position}
        image = pixels(ex["image"], scale)
        return {"image": image, "label": ex["label"], "mask": real, "position": position}

    def pad_image(q):
        return tf.zeros([*(fixed_size[q] if fixed_size else (crop or q, crop or q)), channels])

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
        pad["images"] = tuple(pad_image(q) for q in scales)
    else:
        pad["image"] = pad_image(scale)
    indexed, preprocess = records.enumerate(), traced_as_written(preprocess)
    if policy == "skip":
        ds = map_skipping_errors(indexed, preprocess)
    else:
        ds = indexed.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(traced_as_written(check_label))
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(num_batches * local_batch).batch(local_batch).prefetch(tf.data.AUTOTUNE)
    read = numpy_batches(ds, source, split)
    if policy == "fail":
        batches = _eval_iterator(read, records, channels, local_batch)
    else:
        batches = _skipping_eval_iterator(read, records, sizes[pi], num_batches, counter)
    return _by_scale(batches, tuple(scales)) if scales else batches


def _rescaled(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """(H, W) of a `size` image rescaled to smallest side `scale`, rounded as the pipeline does."""
    h, w = rescaled_shape(size[0], size[1], scale)
    return int(h), int(w)


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


def _eval_iterator(read, records, channels, local_batch) -> Iterator[Batch]:
    yielded = 0
    try:
        for batch in read:
            batch.pop("position")
            yield batch
            yielded += 1
    except tf.errors.OpError as e:
        _raise_bad_file(records, yielded * local_batch, channels, e)


def _skipping_eval_iterator(read, records, shard, num_batches, counter) -> Iterator[Batch]:
    """Eval batches, the positions they jump over counted as bad with the last batch.

    Names are looked up once, after the whole pass (one more read of the records,
    and only when a file was bad).
    """
    used = []
    try:
        for i, batch in enumerate(read):
            used.extend(batch.pop("position")[batch["mask"]].tolist())
            if i == num_batches - 1:
                bad = record_names(records, sorted(set(range(shard)) - set(used)))
                counter.add(0, bad)
                if bad:
                    log.warning("Skipped %d undecodable evaluation image(s): %s", len(bad),
                                shown_names(bad))  # fmt: skip
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


def decode_eval_image(
    encoded: bytes, config, scale: int | None = None, channels: int = 3
) -> np.ndarray:
    """One encoded image -> normalised float32 (H, W, C) with smallest side Q (mode "full")."""
    scale = scale or config.eval_scale
    image = eval_preprocess(tf.constant(encoded), channels, scale, None, config.resize_method)
    return np.asarray(normalize(image, config))
