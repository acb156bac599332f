"""The training stream: this process's share of each global batch, resumable at any step.

`train_dataset(config, *, start_step=0, process_index=None, process_count=None, bad_images=None)`
    Infinite iterator of `{'image': float32 (B, size, size, C), 'label': int32 (B,)}`
    with B = config.batch_size // process_count (the trainer assembles global
    batches with `jax.make_array_from_process_local_data`). Each epoch has
    exactly `steps_per_epoch(config)` batches (floor of train examples /
    global batch) on every process. Images get `vgg_jax.augment`'s training
    preprocessing, then `normalize`.
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

`config.cache=True` (small datasets such as Fashion-MNIST): this process's
training share is decoded, rescaled to S = image_size, centre-cropped and
normalised once, held in memory as float32, and served as batches of a
per-epoch permutation (a function of seed, epoch and process, so resuming is
exact). With scale jittering, random crops, flips or colour shift the images
are kept as decoded (one size for all) and each batch is augmented in numpy
(`scaled_crops`, bilinear as tf.image.resize) from a generator of (seed, epoch,
process, step). Saves the per-epoch decoding, which on 2 CPU cores competes
with the train step for the same cores. Undecodable
files are left out (or, with bad_images="fail", an error) and counted at each
epoch's first step; the permutation is read cyclically to fill the epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from vgg_jax.augment import PCA_EIGVAL, PCA_EIGVEC, Augment, train_preprocess
from vgg_jax.input_common import (
    BadImageCounter,
    Batch,
    bad_image_policy,
    channel_stats,
    check_bad_images,
    check_source,
    decode_image,
    eval_preprocess,
    get_source,
    local_batch_size,
    map_skipping_errors,
    normalize,
    num_examples,
    numpy_batches,
    process_share,
    record_names,
    rescaled_shape,
    shown_names,
    traced_as_written,
)

log = logging.getLogger(__name__)


def _log_epoch(epoch: int, pi: int, counter: BadImageCounter) -> None:
    log.warning(
        "Epoch %d, process %d: skipped %d training image(s) that could not be decoded "
        "(%d in all so far).",
        epoch + 1,  # counted from 1, as the trainer's summary and progress lines count
        pi,
        counter.epoch_count,
        counter.total,
    )


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
# Streaming: one tf.data pipeline per epoch, a function of (seed, epoch, process).


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
    with_position = traced_as_written(lambda p, ex: {**ex, "position": p})
    chunks = flat.map(with_position).batch(local_batch, drop_remainder=True)
    empty = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), chunks.element_spec)
    pairs = chunks.scan(empty, traced_as_written(lambda prev, cur: (cur, (prev, cur))))
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
        rows = rows.map(traced_as_written(lambda ex: preprocess({**ex, "limit": limit})))
        rows = rows.ignore_errors()
        batch = rows.take(local_batch).batch(local_batch)
        spec = batch.element_spec
        empty = tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape[1:]], s.dtype), spec)
        batch = batch.concatenate(tf.data.Dataset.from_tensors(empty)).take(1)
        return batch.map(traced_as_written(lambda b: {**b, "names": candidates["name"]}))

    def check_label(ex):
        label = tf.cast(ex["label"], tf.int32)
        tf.debugging.assert_less(
            label, num_classes, message="label out of range: set config.num_classes > label"
        )
        tf.debugging.assert_non_negative(label, message="negative label")
        return {**ex, "label": label}

    pairs = _chunk_pairs(records, skip, local_batch).take(steps - skip)
    ds = pairs.interleave(
        traced_as_written(fill),
        cycle_length=tf.data.AUTOTUNE,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.map(traced_as_written(check_label)).prefetch(tf.data.AUTOTUNE)


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
    pi, pc = process_share(process_index, process_count)
    local_batch = local_batch_size(config.batch_size, pc, "batch_size")
    source = get_source(config)
    check_source(config, source, config.train_split)
    channel_stats(config, source.channels)
    aug = Augment.from_config(config, source.channels, config.get("decode_crop", True))
    steps = steps_per_epoch(config)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    if config.cache:
        images, labels, bad = _in_memory(config, source, aug, pi, pc)
        return _memory_iterator(
            config, aug, images, labels, start_step, steps, pi, local_batch, bad, counter
        )
    return _train_iterator(config, source, aug, start_step, steps, pi, pc, local_batch, counter)


def _train_iterator(config, source, aug, start_step, steps, pi, pc, local_batch, counter):
    epoch, skip = divmod(start_step, steps)
    shard = source.shard_sizes(config.train_split, pc)[pi]
    while True:
        ds = _train_epoch(config, source, aug, epoch, skip, steps, pi, pc, local_batch)
        for b, batch in enumerate(numpy_batches(ds, source, config.train_split), start=skip):
            bad = _bad_names(batch, b, local_batch, steps, shard)
            check_bad_images(config, bad, "Training")
            if len(batch["label"]) < local_batch:
                raise RuntimeError(
                    f"Epoch {epoch + 1}, step {epoch * steps + b}, process {pi}: only "
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
# In-memory training set (config.cache): decoded once, shuffled per epoch.

_MEMORY: dict[tuple, tuple[np.ndarray, np.ndarray, list[str]]] = {}


def _fixed(aug: Augment) -> bool:
    """Whether every epoch sees each image preprocessed the same way."""
    colour = aug.color_shift > 0 and aug.channels == 3
    return aug.scale_min == aug.scale_max == aug.size and not aug.flip and not colour


def _in_memory(config, source, aug: Augment, pi: int, pc: int):
    """This process's training share, decoded once.

    With a fixed preprocessing the images are stored rescaled to S = image_size,
    centre-cropped and normalised (float32); otherwise as decoded (uint8, one
    size for all), for `_augment_in_memory` to rescale, crop, flip and shift
    anew each epoch. Returns (images, labels, names of undecodable files).
    """
    fixed = _fixed(aug)
    if not fixed and aug.method != "bilinear":
        raise ValueError(
            "config.cache with scale jittering, flips or colour shift resamples bilinearly, "
            f"but resize_method={aug.method!r}: set resize_method='bilinear' or cache=False."
        )
    key = (
        config.dataset, config.data_dir, config.get("manual_dir", ""), tuple(config.classes),
        config.train_split, pi, pc, aug, config.value_range, tuple(config.mean_rgb),
        tuple(config.std_rgb),
    )  # fmt: skip
    if key not in _MEMORY:
        _MEMORY.clear()  # one training set at a time
        records = source.records(config.train_split, pi, pc, None, 0)

        def preprocess(position, ex):
            if fixed:
                image = eval_preprocess(ex["image"], aug.channels, aug.size, aug.size, aug.method)
                image = normalize(image, config)
            else:
                image = decode_image(ex["image"], aug.channels)
            return image, tf.cast(ex["label"], tf.int32), position

        ds = map_skipping_errors(records.enumerate(), traced_as_written(preprocess))
        images, labels, kept = [], [], []
        try:
            for image, label, position in numpy_batches(ds.batch(1024), source, config.train_split):
                images.append(image)
                labels.append(label)
                kept.append(position)
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(
                "config.cache with scale jittering, flips or colour shift keeps the decoded "
                "images, which needs training images of one size; these differ "
                f"({str(e).splitlines()[0][:120]}). Set cache=False."
            ) from None
        size = (aug.size, aug.size) if fixed else (0, 0)
        empty = np.zeros((0, *size, aug.channels), np.float32 if fixed else np.uint8)
        images_np = np.concatenate(images) if images else empty
        labels_np = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        if labels_np.size and not 0 <= labels_np.min() <= labels_np.max() < config.num_classes:
            raise ValueError(
                f"Training labels span {labels_np.min()}..{labels_np.max()}: set "
                "config.num_classes > the largest label."
            )
        shard = source.shard_sizes(config.train_split, pc)[pi]
        found = set(np.concatenate(kept).tolist()) if kept else set()
        bad = record_names(records, sorted(set(range(shard)) - found))
        check_bad_images(config, bad, "Training")
        if bad:
            log.warning(
                "Process %d: skipped %d training image(s) that could not be decoded (in "
                "every epoch): %s", pi, len(bad), shown_names(bad),
            )  # fmt: skip
        _MEMORY[key] = (images_np, labels_np, bad)
        log.info("Cached %d training images (%.0f MiB).", len(labels_np), images_np.nbytes / 2**20)
    return _MEMORY[key]


def _rescaled(h: int, w: int, scales: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`input_common.rescaled_shape` of one (h, w) for an array of smallest sides."""
    big_h, big_w = rescaled_shape(h, w, scales, minimum=size)
    return big_h.numpy().astype(np.int64), big_w.numpy().astype(np.int64)


def _bilinear_rows(coords: np.ndarray, length: int):
    """Neighbours and weights where tf.image.resize (bilinear, no antialias) samples `coords`."""
    clipped = np.clip(coords, 0.0, length - 1.0)
    low = np.floor(clipped).astype(np.int64)
    return low, np.minimum(low + 1, length - 1), (clipped - low).astype(np.float32)


def scaled_crops(images, scales, oy, ox, flip, size: int) -> np.ndarray:
    """Each uint8 image rescaled to smallest side S (bilinear), its size x size crop at (oy, ox).

    The samples are those of `tf.image.resize` of the whole image followed by the
    crop (and a horizontal mirror where `flip`), computed for the crop alone.
    Returns float32 in [0, 255] units, shape (B, size, size, C).
    """
    n, h, w, _ = images.shape
    big_h, big_w = _rescaled(h, w, scales, size)
    steps = np.arange(size) + 0.5
    ys = (oy[:, None] + steps) * (h / big_h)[:, None] - 0.5
    xs = (ox[:, None] + steps) * (w / big_w)[:, None] - 0.5
    xs = np.where(flip[:, None], xs[:, ::-1], xs)
    y0, y1, fy = _bilinear_rows(ys, h)
    x0, x1, fx = _bilinear_rows(xs, w)
    b = np.arange(n)[:, None, None]
    pixels = images.astype(np.float32)

    def rows(y):  # one row of neighbours, interpolated along x
        left = pixels[b, y[:, :, None], x0[:, None, :]]
        right = pixels[b, y[:, :, None], x1[:, None, :]]
        return left + (right - left) * fx[:, None, :, None]

    top, bottom = rows(y0), rows(y1)
    return top + (bottom - top) * fy[:, :, None, None]


def _augment_in_memory(config, aug: Augment, images, rows, rng) -> np.ndarray:
    """The training preprocessing (PAPER.md 3.1) of decoded images, in numpy: normalised float32."""
    chosen = images[rows]
    n, h, w, _ = chosen.shape
    scales = rng.integers(aug.scale_min, aug.scale_max + 1, n)
    big_h, big_w = _rescaled(h, w, scales, aug.size)
    oy = np.floor(rng.random(n) * (big_h - aug.size + 1)).astype(np.int64)
    ox = np.floor(rng.random(n) * (big_w - aug.size + 1)).astype(np.int64)
    flip = rng.random(n) < 0.5 if aug.flip else np.zeros(n, bool)
    crops = scaled_crops(chosen, scales, oy, ox, flip, aug.size)
    if aug.color_shift > 0 and aug.channels == 3:
        alpha = rng.normal(0.0, aug.color_shift, (n, 3)).astype(np.float32)
        crops += ((alpha * PCA_EIGVAL) @ PCA_EIGVEC.T * 255.0)[:, None, None, :]
    return normalize(crops, config)


def _memory_iterator(
    config, aug, images, labels, start_step, steps, pi, local_batch, bad, counter
) -> Iterator[Batch]:
    """Batches of a per-epoch permutation that depends only on (seed, epoch, process).

    Decoded images (an augmenting preprocessing) are rescaled, cropped, flipped and
    shifted per batch from a generator of (seed, epoch, process, step), so resuming
    at any step is exact. With undecodable files there are fewer images than
    steps * local_batch: the permutation is then read cyclically (its first images
    serve twice). The skipped files are counted at each epoch's first step.
    """
    if len(labels) < local_batch:
        raise RuntimeError(
            f"Process {pi}: only {len(labels)} decodable training images in memory, fewer than "
            f"one batch of {local_batch}; too many files are corrupt or unreadable."
        )
    epoch, skip = divmod(start_step, steps)
    while True:
        epoch_seed = _epoch_seed(config.seed, epoch, pi)
        order = np.random.default_rng(epoch_seed).permutation(len(labels))
        for b in range(skip, steps):
            rows = order[np.arange(b * local_batch, (b + 1) * local_batch) % len(labels)]
            counter.add(epoch, bad if b == 0 else [])
            if b == steps - 1 and counter.epoch_count:
                _log_epoch(epoch, pi, counter)
            if not _fixed(aug):
                rng = np.random.default_rng([epoch_seed, b])
                batch = _augment_in_memory(config, aug, images, rows, rng)
            else:
                batch = images[rows]
            yield {"image": batch, "label": labels[rows]}
        epoch, skip = epoch + 1, 0
