"""The paper's test protocols (PAPER.md, section 3): dense, multi-crop, fusion, ensembles.

Evaluators work on arrays of raw pixels in [0, 1] (NHWC, or a list of HxWxC
images of different sizes); each applies its own `preprocess` callable
(`checkpoints.Preprocessing`), so weights trained with other normalisations
(converted Keras/torchvision files) are evaluated on the same pixels.

* `DenseEvaluator`: each image rescaled to smallest side Q (aspect kept), the
  network run fully convolutionally (`score_map`), the class score map
  averaged spatially, soft-max; the same for the horizontally flipped image;
  soft-max outputs averaged over flips and scales.

  Which average: the paper says "the class score map is spatially averaged
  (sum-pooled) to obtain a fixed-size vector of class scores", and only then
  speaks of soft-max class posteriors. So by default the *scores* (fc8
  outputs, pre-soft-max) are averaged over positions and one soft-max follows
  (`spatial_average="scores"`); `"softmax"` averages per-position soft-max
  outputs instead, for comparison.

  Bucketing: images of a batch are zero-padded to a bucket shape (both sides
  rounded up to a multiple of 32, the network's total stride), and a
  bucket's short last chunk runs at the next power-of-two batch, so only a
  few shapes are ever compiled (`compiled_shapes` reports how many).
  "Padding never leaks" is meant exactly: the prediction for a padded image
  equals the prediction for the same image run alone at its own size (up to
  float rounding). Masking only the score-map positions whose
  window covers padding is not enough for that, because SAME convolutions
  near the right/bottom border of the real image would read the padding
  (ReLU(bias) after the first layer, not zeros). So every convolution's input
  (and FC1's) is set to zero outside the image's valid region at that
  resolution, which is what SAME padding gives the unpadded image, and the
  score map is averaged over exactly the positions the unpadded image has.
  Tested against unpadded evaluation in tests/test_evaluate.py.

* `MultiCropEvaluator`: per scale a G x G grid of image_size crops (and their
  flips), soft-max averaged over all crops of all scales. G = 1 at Q equal to
  the training size is the usual central crop.
* `FusedEvaluator` / `fuse`: soft-max average of dense and multi-crop.
* `Ensemble`: soft-max average of several evaluators (models).

Metrics (`ErrorCounts`) count top-1/top-5 errors on the host with a mask:
exact whatever the batch size and the number of devices or processes.
Batches are sharded over a 'data' mesh axis of the local devices.

Command line (one pass over the split gives every row: each scale alone, all
scales, and with `--mode both` the fusion; the table is shaped like the
paper's Tables 3-5 and `--output` writes the same numbers as JSON):

    python -m vgg_jax.evaluate --workdir runs/vgg16 --mode both
    python -m vgg_jax.evaluate --checkpoint weights/vgg16 --checkpoint weights/vgg19 \
        --config configs/vgg16.py --mode both            # ensemble of D and E
    python -m vgg_jax.evaluate --checkpoint weights/vgg16 --config configs/vgg16.py \
        --mode multicrop --grid 1 --no-flip --scales 256  # the usual single centre crop

Data come from `input_pipeline.eval_dataset(mode="full")`, one stream per
scale Q (so every Q is resampled from the original image), with the
pipeline's normalisation switched off: each network normalises the raw
pixels itself. Default scales are the paper's for the run's training scale
(`paper_scales`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import checkpoints, fileio, layers, models, parallel

Array = jax.Array
Preprocess = Callable[[Array], Array]

# Five 2x2 pools: one score-map step is 32 input pixels.
NETWORK_STRIDE = 2**models.NUM_STAGES
DEFAULT_SCALES = (256, 384, 512)
# The command line hands evaluators this many batches' worth of images at a time.
GROUP_BATCHES = 4


# ---------------------------------------------------------------------------
# Images and rescaling.


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
    if isinstance(images, np.ndarray | jax.Array) and np.ndim(images) == 3:
        raise ValueError(
            f"Expected a batch of images (N, H, W, C) or a list of HxWxC images; got shape "
            f"{np.shape(images)}. Add a batch axis for a single image."
        )
    return ImageSet(images)


# ---------------------------------------------------------------------------
# Devices: a 'data' mesh over this process's devices.


class _Devices:
    """Pads batches to a multiple of the device count and shards them over 'data'."""

    def __init__(self, devices: Sequence[jax.Device] | None) -> None:
        devices = list(devices or jax.local_devices())
        self.count = len(devices)
        self.mesh = parallel.make_mesh(devices)
        self.batch = parallel.batch_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)

    def round_up(self, n: int) -> int:
        return -(-n // self.count) * self.count

    def put_batch(self, *arrays: np.ndarray) -> tuple[Array, ...]:
        return tuple(jax.device_put(a, self.batch) for a in arrays)

    def put_replicated(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)


def _softmax(x: Array) -> Array:
    return jax.nn.softmax(x.astype(jnp.float32), axis=-1)


def _check_scales(scales: Iterable[int], image_size: int) -> tuple[int, ...]:
    scales = tuple(int(q) for q in scales)
    if not scales:
        raise ValueError("Give at least one test scale Q.")
    small = [q for q in scales if q < image_size]
    if small:
        raise ValueError(
            f"Test scales {small} are smaller than the model's image_size={image_size}; "
            f"every Q must be >= {image_size}."
        )
    return scales


class Evaluator(Protocol):
    num_classes: int

    def predict(self, images: Any) -> np.ndarray: ...


# ---------------------------------------------------------------------------
# Dense evaluation.


def _valid_mask(valid_hw: Array, height: int, width: int, factor: int) -> Array:
    """(B, height, width) True inside each image's region at 1/factor resolution."""
    vh = valid_hw[:, 0] // factor
    vw = valid_hw[:, 1] // factor
    rows = jnp.arange(height)[None, :, None] < vh[:, None, None]
    cols = jnp.arange(width)[None, None, :] < vw[:, None, None]
    return rows & cols


def _masking_interceptor(valid_hw: Array, padded_height: int):
    """Zeroes every convolution's (and FC1's) input outside the valid image region."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(
            module, layers.Conv | models.WindowDense
        ):
            x = args[0]
            factor = padded_height // x.shape[1]
            mask = _valid_mask(valid_hw, x.shape[1], x.shape[2], factor)
            args = (jnp.where(mask[..., None], x, jnp.zeros((), x.dtype)), *args[1:])
        return next_fun(*args, **kwargs)

    return interceptor


def _identity(x: Array) -> Array:
    return x


def _dense_forward(model, preprocess, spatial_average, maps, variables, x, valid_hw):
    """Soft-max of the masked spatial average (or the masked score maps) of a padded batch."""
    x = preprocess(x)
    with nn.intercept_methods(_masking_interceptor(valid_hw, x.shape[1])):
        scores = model.apply(variables, x, method="score_map")
    # Valid score-map positions: exactly those the unpadded image has.
    n = valid_hw // NETWORK_STRIDE - models.feature_map_size(model.image_size) + 1
    mask = (jnp.arange(scores.shape[1])[None, :, None] < n[:, 0, None, None]) & (
        jnp.arange(scores.shape[2])[None, None, :] < n[:, 1, None, None]
    )
    if maps:
        return jnp.where(mask[..., None], scores, 0.0)
    weights = mask[..., None] / jnp.sum(mask, axis=(1, 2))[:, None, None, None]
    if spatial_average == "scores":
        return _softmax(jnp.sum(scores * weights, axis=(1, 2)))
    return jnp.sum(_softmax(scores) * weights, axis=(1, 2))


@functools.lru_cache(maxsize=64)
def _dense_fn(model, preprocess, spatial_average, maps):
    """One jitted function per network and preprocessing, shared by all evaluators of it."""
    return jax.jit(functools.partial(_dense_forward, model, preprocess, spatial_average, maps))


@functools.lru_cache(maxsize=64)
def _crop_fn(model, preprocess):
    return jax.jit(lambda v, x: _softmax(model.apply(v, preprocess(x), train=False)))


class DenseEvaluator:
    """The paper's dense (fully-convolutional) multi-scale evaluation.

    `batch_size` images (plus their flips) go through the network per call;
    `bucket_multiple` (a multiple of 32) is the rounding of padded shapes.
    """

    def __init__(
        self,
        model: models.VGG,
        variables: Mapping[str, Any],
        scales: Iterable[int] = DEFAULT_SCALES,
        flip: bool = True,
        preprocess: Preprocess | None = None,
        *,
        batch_size: int = 8,
        bucket_multiple: int = NETWORK_STRIDE,
        spatial_average: str = "scores",
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        if bucket_multiple <= 0 or bucket_multiple % NETWORK_STRIDE:
            raise ValueError(
                f"bucket_multiple must be a positive multiple of {NETWORK_STRIDE}, "
                f"got {bucket_multiple}."
            )
        if spatial_average not in ("scores", "softmax"):
            raise ValueError(
                f"spatial_average must be 'scores' or 'softmax', got {spatial_average!r}."
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.model = model
        self.scales = _check_scales(scales, model.image_size)
        self.flip = flip
        self.preprocess = preprocess or _identity
        self.batch_size = batch_size
        self.bucket_multiple = bucket_multiple
        self.spatial_average = spatial_average
        self._devices = _Devices(devices)
        self.variables = self._devices.put_replicated(dict(variables))
        self.num_classes = model.num_classes
        self._window = models.feature_map_size(model.image_size)
        # (kind, shape) of every batch run, i.e. the shapes this evaluator needs compiled.
        self._compiled: set[tuple[str, tuple[int, ...]]] = set()
        self._predict_fn = _dense_fn(model, self.preprocess, spatial_average, False)
        self._maps_fn = _dense_fn(model, self.preprocess, spatial_average, True)

    @property
    def compiled_shapes(self) -> int:
        """How many batch shapes this evaluator ran (one compilation each, per bucket and kind)."""
        return len(self._compiled)

    def bucket_shape(self, height: int, width: int) -> tuple[int, int]:
        m = self.bucket_multiple
        return -(-height // m) * m, -(-width // m) * m

    def _run(self, fn, kind: str, images: list[np.ndarray], bucket: tuple[int, int]) -> np.ndarray:
        """One call on images of one bucket: (len(images), ...) outputs."""
        n = len(images)
        # A bucket's last chunk is usually short: run it at the next power of two rows, not
        # the full batch (a bounded set of sizes, log2(batch) + 1 per bucket at most).
        full = self._devices.round_up(self.batch_size * (2 if self.flip else 1))
        rows = min(full, self._devices.round_up(1 << (n - 1).bit_length()))
        rows = max(rows, self._devices.round_up(n))
        channels = images[0].shape[-1]
        x = np.zeros((rows, *bucket, channels), np.float32)
        valid = np.tile(np.asarray(bucket, np.int32), (rows, 1))
        for i, im in enumerate(images):
            x[i, : im.shape[0], : im.shape[1]] = im
            valid[i] = im.shape[:2]
        self._compiled.add((kind, x.shape))
        out = fn(self.variables, *self._devices.put_batch(x, valid))
        return np.asarray(out)[:n]

    def _per_image(self, fn, kind: str, images: list[np.ndarray]) -> list[np.ndarray]:
        """Runs `fn` on every image (grouped by bucket, in chunks of batch_size)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.bucket_shape(*im.shape[:2]), []).append(i)
        step = self._devices.round_up(self.batch_size * (2 if self.flip else 1))
        results: list[np.ndarray | None] = [None] * len(images)
        for bucket, idx in sorted(groups.items()):
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                out = self._run(fn, kind, [images[i] for i in chunk], bucket)
                for i, o in zip(chunk, out, strict=True):
                    results[i] = o
        return results  # type: ignore[return-value]

    def predict_per_scale(self, images: Any) -> dict[int, np.ndarray]:
        """{Q: (N, classes)} soft-max averaged over flips, one entry per scale."""
        images = as_image_set(images)
        out = {}
        for q in self.scales:
            ims = images.at_scale(q)
            batch = ims + ([im[:, ::-1] for im in ims] if self.flip else [])
            probs = np.stack(self._per_image(self._predict_fn, "probs", batch))
            if self.flip:
                probs = (probs[: len(ims)] + probs[len(ims) :]) / 2
            out[q] = probs
        return out

    def predict(self, images: Any) -> np.ndarray:
        """(N, classes) class probabilities averaged over flips and scales."""
        return np.mean(list(self.predict_per_scale(images).values()), axis=0)

    def score_maps(self, images: Any) -> list[dict[int, np.ndarray]]:
        """Per image, {Q: (H', W', classes)} class score maps (pre-soft-max, unflipped)."""
        images = as_image_set(images)
        maps: list[dict[int, np.ndarray]] = [{} for _ in range(len(images))]
        for q in self.scales:
            ims = images.at_scale(q)
            for i, (im, m) in enumerate(
                zip(ims, self._per_image(self._maps_fn, "maps", ims), strict=True)
            ):
                h, w = (s // NETWORK_STRIDE - self._window + 1 for s in im.shape[:2])
                maps[i][q] = m[:h, :w]
        return maps


# ---------------------------------------------------------------------------
# Multi-crop evaluation.


def crop_offsets(length: int, crop: int, grid: int) -> list[int]:
    """Start offsets of `grid` crops evenly spread over `length`; grid 1 is the centre.

    Mirror-symmetric (offset o and length - crop - o both present, the centre
    aside), so the flipped crops of a grid are the crops of the flipped image.
    """
    if length < crop:
        raise ValueError(f"Cannot take {crop}-pixel crops from a side of {length} pixels.")
    slack = length - crop
    offsets = [slack // 2] * grid
    for i in range(grid // 2):
        offsets[i] = int(math.floor(i * slack / (grid - 1) + 0.5))
        offsets[grid - 1 - i] = slack - offsets[i]
    return offsets


class MultiCropEvaluator:
    """Per scale a grid x grid set of image_size crops (and flips); averaged soft-max."""

    def __init__(
        self,
        model: models.VGG,
        variables: Mapping[str, Any],
        scales: Iterable[int] = DEFAULT_SCALES,
        grid: int = 5,
        flip: bool = True,
        preprocess: Preprocess | None = None,
        *,
        batch_size: int = 64,
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.model = model
        self.scales = _check_scales(scales, model.image_size)
        self.grid = grid
        self.flip = flip
        self.preprocess = preprocess or _identity
        self._devices = _Devices(devices)
        self.batch_size = self._devices.round_up(batch_size)
        self.variables = self._devices.put_replicated(dict(variables))
        self.num_classes = model.num_classes
        self._forward = _crop_fn(model, self.preprocess)

    @property
    def crops_per_image(self) -> int:
        return len(self.scales) * self.grid**2 * (2 if self.flip else 1)

    def _crops(self, image: np.ndarray) -> Iterator[np.ndarray]:
        size = self.model.image_size
        for y in crop_offsets(image.shape[0], size, self.grid):
            for x in crop_offsets(image.shape[1], size, self.grid):
                crop = image[y : y + size, x : x + size]
                yield crop
                if self.flip:
                    yield crop[:, ::-1]

    def predict_per_scale(self, images: Any) -> dict[int, np.ndarray]:
        """{Q: (N, classes)} soft-max averaged over the crops (and flips) of each scale."""
        images = as_image_set(images)
        per_scale = {q: images.at_scale(q) for q in self.scales}
        sums = np.zeros((len(self.scales), len(images), self.num_classes), np.float64)
        crops: list[np.ndarray] = []
        owner: list[tuple[int, int]] = []

        def flush() -> None:
            x = np.zeros((self.batch_size, *crops[0].shape), np.float32)
            x[: len(crops)] = np.stack(crops)
            probs = np.asarray(self._forward(self.variables, *self._devices.put_batch(x)))
            s, i = np.asarray(owner).T
            np.add.at(sums, (s, i), probs[: len(crops)])
            crops.clear()
            owner.clear()

        for i in range(len(images)):
            for s, ims in enumerate(per_scale.values()):
                for crop in self._crops(ims[i]):
                    crops.append(crop)
                    owner.append((s, i))
                    if len(crops) == self.batch_size:
                        flush()
        if crops:
            flush()
        per_crop = self.grid**2 * (2 if self.flip else 1)
        return {q: (sums[s] / per_crop).astype(np.float32) for s, q in enumerate(self.scales)}

    def predict(self, images: Any) -> np.ndarray:
        """(N, classes) soft-max averaged over every crop of every scale."""
        return np.mean(list(self.predict_per_scale(images).values()), axis=0)


# ---------------------------------------------------------------------------
# Fusion and ensembles.


def fuse(*probabilities: np.ndarray) -> np.ndarray:
    """Soft-max average of several protocols' (or models') outputs."""
    if not probabilities:
        raise ValueError("fuse needs at least one array of probabilities.")
    shapes = {np.shape(p) for p in probabilities}
    if len(shapes) != 1:
        raise ValueError(f"Cannot fuse outputs of different shapes {sorted(shapes)}.")
    return np.mean(np.stack(probabilities), axis=0)


class FusedEvaluator:
    """Dense and multi-crop evaluation averaged (the paper's Table 5, last rows)."""

    def __init__(self, *evaluators: Evaluator) -> None:
        if not evaluators:
            raise ValueError("FusedEvaluator needs at least one evaluator.")
        _same_classes(evaluators)
        self.evaluators = evaluators
        self.num_classes = evaluators[0].num_classes

    def predict(self, images: Any) -> np.ndarray:
        images = as_image_set(images)
        return fuse(*(e.predict(images) for e in self.evaluators))


def _same_classes(evaluators: Sequence[Evaluator]) -> None:
    classes = {e.num_classes for e in evaluators}
    if len(classes) != 1:
        raise ValueError(f"Cannot average models with different numbers of classes {classes}.")


@dataclasses.dataclass
class Member:
    """One network of an ensemble: the model, its variables, its input preprocessing."""

    model: models.VGG
    variables: Mapping[str, Any]
    preprocess: Preprocess | None = None
    name: str = ""

    @classmethod
    def from_bundle(cls, bundle: checkpoints.ModelBundle, name: str = "") -> Member:
        return cls(bundle.model, bundle.variables, bundle.preprocessing, name or bundle.name)


MODES = ("dense", "multicrop", "both")


def build_evaluator(
    member: Member,
    mode: str = "dense",
    scales: Iterable[int] = DEFAULT_SCALES,
    flip: bool = True,
    *,
    grid: int = 5,
    batch_size: int = 8,
    devices: Sequence[jax.Device] | None = None,
) -> Evaluator:
    """The evaluator of one protocol ('dense', 'multicrop' or 'both' fused) for one network."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    common = dict(flip=flip, preprocess=member.preprocess, devices=devices)
    dense = multicrop = None
    if mode in ("dense", "both"):
        dense = DenseEvaluator(
            member.model, member.variables, scales, batch_size=batch_size, **common
        )
    if mode in ("multicrop", "both"):
        multicrop = MultiCropEvaluator(
            member.model,
            member.variables,
            scales,
            grid,
            batch_size=batch_size * grid * grid,
            **common,
        )
    if dense and multicrop:
        return FusedEvaluator(dense, multicrop)
    return dense or multicrop  # type: ignore[return-value]


class Ensemble:
    """Soft-max average of several evaluators (one per network), in any mode."""

    def __init__(self, evaluators: Sequence[Evaluator]) -> None:
        if not evaluators:
            raise ValueError("An ensemble needs at least one member.")
        _same_classes(evaluators)
        self.evaluators = list(evaluators)
        self.num_classes = self.evaluators[0].num_classes

    @classmethod
    def from_members(cls, members: Sequence[Member], mode: str = "dense", **kwargs) -> Ensemble:
        return cls([build_evaluator(m, mode, **kwargs) for m in members])

    def predict(self, images: Any) -> np.ndarray:
        images = as_image_set(images)
        return fuse(*(e.predict(images) for e in self.evaluators))


# ---------------------------------------------------------------------------
# Metrics.


@dataclasses.dataclass
class ErrorCounts:
    """Exact top-1/top-5 error counts over the examples whose mask is True."""

    count: int = 0
    top1_wrong: int = 0
    top5_wrong: int = 0

    def update(self, probs: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> None:
        probs, labels = np.asarray(probs), np.asarray(labels).astype(np.int64)
        mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
        if not len(probs) == len(labels) == len(mask):
            raise ValueError(
                f"probs, labels and mask disagree on the batch size: "
                f"{len(probs)}, {len(labels)}, {len(mask)}."
            )
        k = min(5, probs.shape[-1])
        # Ties broken towards the lower class index, as argmax does.
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        top1 = top[:, 0] == labels
        top5 = np.any(top == labels[:, None], axis=-1)
        self.count += int(mask.sum())
        self.top1_wrong += int((mask & ~top1).sum())
        self.top5_wrong += int((mask & ~top5).sum())

    def merge(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(
            self.count + other.count,
            self.top1_wrong + other.top1_wrong,
            self.top5_wrong + other.top5_wrong,
        )

    def all_processes(self) -> ErrorCounts:
        """The counts summed over every process (a no-op with one process)."""
        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils

        local = np.asarray([self.count, self.top1_wrong, self.top5_wrong], np.int64)
        total = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
        return ErrorCounts(*(int(v) for v in total))

    @property
    def top1_error(self) -> float:
        return self.top1_wrong / self.count if self.count else float("nan")

    @property
    def top5_error(self) -> float:
        return self.top5_wrong / self.count if self.count else float("nan")


# ---------------------------------------------------------------------------
# Evaluating a dataset: every protocol of the paper's Tables 3-5 in one pass.


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table: a protocol at a set of scales."""

    mode: str  # "dense", "multi-crop" or "multi-crop & dense"
    scales: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.mode} Q={','.join(map(str, self.scales))}"


@dataclasses.dataclass
class ProtocolSet:
    """The dense and/or multi-crop evaluators of each network of an ensemble."""

    dense: list[DenseEvaluator]
    multicrop: list[MultiCropEvaluator]

    @classmethod
    def build(
        cls,
        members: Sequence[Member],
        mode: str,
        scales: Iterable[int],
        flip: bool = True,
        *,
        grid: int = 5,
        batch_size: int = 8,
        devices: Sequence[jax.Device] | None = None,
    ) -> ProtocolSet:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not members:
            raise ValueError("Give at least one network to evaluate.")
        scales = tuple(scales)
        common = dict(flip=flip, devices=devices)
        dense = [
            DenseEvaluator(
                m.model,
                m.variables,
                scales,
                preprocess=m.preprocess,
                batch_size=batch_size,
                **common,
            )
            for m in members
            if mode in ("dense", "both")
        ]
        multicrop = [
            MultiCropEvaluator(
                m.model,
                m.variables,
                scales,
                grid,
                preprocess=m.preprocess,
                batch_size=batch_size * grid * grid,
                **common,
            )
            for m in members
            if mode in ("multicrop", "both")
        ]
        _same_classes([*dense, *multicrop])
        return cls(dense, multicrop)

    def rows(self) -> list[Row]:
        """The rows `predict_rows` returns, in order (known before any data is seen)."""
        rows = []
        for name, evaluators in (("dense", self.dense), ("multi-crop", self.multicrop)):
            if evaluators:
                scales = evaluators[0].scales
                rows += [Row(name, (q,)) for q in scales] if len(scales) > 1 else []
                rows.append(Row(name, scales))
        if self.dense and self.multicrop:
            rows.append(Row("multi-crop & dense", self.dense[0].scales))
        return rows

    def predict_rows(self, images: Any) -> dict[Row, np.ndarray]:
        """Soft-max outputs (ensemble-averaged) of every row: each scale alone, all, fused."""
        images = as_image_set(images)
        rows: dict[Row, np.ndarray] = {}
        for name, evaluators in (("dense", self.dense), ("multi-crop", self.multicrop)):
            if not evaluators:
                continue
            per_scale = [e.predict_per_scale(images) for e in evaluators]
            scales = evaluators[0].scales
            if len(scales) > 1:
                for q in scales:
                    rows[Row(name, (q,))] = fuse(*(p[q] for p in per_scale))
            rows[Row(name, scales)] = fuse(*(np.mean(list(p.values()), 0) for p in per_scale))
        if self.dense and self.multicrop:
            scales = self.dense[0].scales
            rows[Row("multi-crop & dense", scales)] = fuse(
                rows[Row("dense", scales)], rows[Row("multi-crop", scales)]
            )
        return rows

    @property
    def compiled_shapes(self) -> int:
        return sum(e.compiled_shapes for e in self.dense)


def evaluate_batches(
    protocols: ProtocolSet,
    batches: Iterable[tuple[ImageSet, np.ndarray, np.ndarray]],
    *,
    limit: int = 0,
    total: int | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 10.0,
) -> dict[Row, ErrorCounts]:
    """Counts errors of every row over (images, labels, mask) batches; masked-out entries skipped.

    `limit` > 0 stops after that many real examples (of this process).
    """
    # Every row exists from the start: processes with no examples still take part in the sum.
    counts = {row: ErrorCounts() for row in protocols.rows()}
    seen, start, last_report = 0, time.time(), time.time()
    for images, labels, mask in batches:
        mask = np.asarray(mask, bool)
        keep = np.flatnonzero(mask)
        if limit:
            keep = keep[: max(0, limit - seen)]
        if len(keep):
            subset = images.subset(keep.tolist())
            for row, probs in protocols.predict_rows(subset).items():
                counts[row].update(probs, np.asarray(labels)[keep])
            seen += len(keep)
        if progress and time.time() - last_report >= progress_every_s:
            last_report = time.time()
            progress(_progress_line(seen, total, time.time() - start))
        if limit and seen >= limit:
            break
    if progress:
        progress(_progress_line(seen, total, time.time() - start))
    return {row: c.all_processes() for row, c in counts.items()}


def _progress_line(seen: int, total: int | None, seconds: float) -> str:
    rate = seen / seconds if seconds > 0 else 0.0
    line = f"[evaluate] {seen}" + (f"/{total}" if total else "") + f" images, {rate:.1f} images/s"
    if total and rate > 0:
        line += f", ETA {(total - seen) / rate / 60:.1f} min"
    return line


def format_table(results: Mapping[Row, ErrorCounts], title: str = "") -> str:
    """A Markdown table shaped like the paper's Tables 3-5 (errors in %)."""
    lines = [title] if title else []
    lines += [
        "| evaluation method | test scale Q | top-1 error (%) | top-5 error (%) | images |",
        "|---|---|---|---|---|",
    ]
    for row, c in results.items():
        lines.append(
            f"| {row.mode} | {','.join(map(str, row.scales))} | {100 * c.top1_error:.2f} | "
            f"{100 * c.top5_error:.2f} | {c.count} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line.


def paper_scales(config: Any) -> tuple[int, ...]:
    """The paper's multi-scale test set for a training config (PAPER.md, section 3).

    Jittered S in [S_min, S_max]: {S_min, (S_min + S_max) / 2, S_max}; fixed S:
    {S - 32, S, S + 32}. Scales below the training crop are dropped.
    """
    lo, hi = int(config.train_scale_min), int(config.train_scale_max)
    scales = (lo, (lo + hi) // 2, hi) if lo < hi else (lo - 32, lo, lo + 32)
    return tuple(q for q in scales if q >= int(config.image_size))


def _base_config(args: argparse.Namespace) -> Any:
    """The data config: workdir/config.json, --config FILE[:variant], or the defaults."""
    import ml_collections

    if args.workdir and fileio.isfile(fileio.join(args.workdir, checkpoints.CONFIG_FILE)):
        return ml_collections.ConfigDict(checkpoints.read_run_config(args.workdir))
    from vgg_jax import configuration

    path = args.config or os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    return configuration.load_config_file(
        path,
        "; pass --config configs/<experiment>.py (the data settings of the run) or --workdir "
        "of a training run",
    )


def load_network(path: str, which: str = "best") -> tuple[Member, checkpoints.ModelBundle]:
    """A weights name, a bundle directory or a training workdir (`pretrained.resolve`)."""
    bundle = _resolve_network(path, which)
    name = fileio.basename(path)
    return Member.from_bundle(bundle, name=name), bundle


def _resolve_network(path: str, which: str) -> checkpoints.ModelBundle:
    from vgg_jax import pretrained  # imports convert; only evaluations that name a network

    try:
        return pretrained.resolve(path, which)
    except (FileNotFoundError, pretrained.PretrainedError) as e:
        raise SystemExit(str(e)) from None


def load_members(args: argparse.Namespace) -> list[Member]:
    """The networks named by --workdir / --checkpoint (bundles or training workdirs)."""
    paths = ([args.workdir] if args.workdir else []) + list(args.checkpoint or [])
    if not paths:
        raise SystemExit("Name a network: --workdir RUN_DIR or --checkpoint BUNDLE_DIR.")
    return [load_network(path, args.which)[0] for path in paths]


def _data_config(args: argparse.Namespace, members: Sequence[Member]) -> Any:
    config = _base_config(args)
    with config.unlocked():
        if args.dataset:
            config.dataset = args.dataset
        if args.data_dir is not None:
            config.data_dir = args.data_dir
        config.num_classes = members[0].model.num_classes
        config.image_size = min(m.model.image_size for m in members)
        # The pipeline hands over raw pixels in [0, 1]; each network normalises its own.
        config.value_range = 1.0
        config.mean_rgb = type(config.mean_rgb)([0.0])
        config.std_rgb = type(config.std_rgb)([1.0])
    return config


def dataset_batches(
    config: Any,
    split: str,
    scales: Sequence[int],
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[ImageSet, np.ndarray, np.ndarray]]:
    """Groups of `batch_size` examples of this process's share, rescaled to every Q.

    The pipeline pads the shares of all processes to the same length; the
    padding entries carry mask False.
    """
    from vgg_jax import input_pipeline

    streams = [
        input_pipeline.eval_dataset(
            config,
            split=split,
            mode="full",
            scale=q,
            process_index=process_index,
            process_count=process_count,
        )
        for q in scales
    ]
    group: list[list[dict[str, np.ndarray]]] = []
    for examples in zip(*streams, strict=True):
        labels = {int(e["label"][0]) for e in examples}
        if len(labels) != 1:
            raise RuntimeError("The per-scale evaluation streams went out of step.")
        group.append(list(examples))
        if len(group) == batch_size:
            yield _group_to_batch(group, scales)
            group = []
    if group:
        yield _group_to_batch(group, scales)


def _group_to_batch(group, scales):
    rescaled = {q: [g[s]["image"][0] for g in group] for s, q in enumerate(scales)}
    labels = np.asarray([g[0]["label"][0] for g in group])
    mask = np.asarray([g[0]["mask"][0] for g in group], bool)
    return ImageSet(rescaled=rescaled), labels, mask


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vgg_jax.evaluate",
        description="The paper's test protocols (dense, multi-crop, both; ensembles) on a split.",
    )
    p.add_argument("--workdir", help="training run directory (its best or latest checkpoint)")
    p.add_argument("--which", default="best", choices=("best", "latest"))
    p.add_argument(
        "--checkpoint",
        "--weights",
        dest="checkpoint",
        action="append",
        help="weights name (e.g. vgg16), model bundle or run directory (repeat: an ensemble)",
    )
    p.add_argument("--config", help="config FILE[:variant] with the data settings")
    p.add_argument("--dataset", help="override config.dataset")
    p.add_argument("--data-dir", help="override config.data_dir")
    p.add_argument("--split", help="split to evaluate (default config.eval_split)")
    p.add_argument("--mode", default="dense", choices=MODES)
    p.add_argument("--scales", help="test scales Q, e.g. 256,384,512 (default: the paper's)")
    p.add_argument("--no-flip", action="store_true", help="do not add flipped images")
    p.add_argument("--grid", type=int, default=5, help="multi-crop grid side (5: 5x5)")
    p.add_argument("--limit", type=int, default=0, help="only the first N examples (per process)")
    p.add_argument("--batch-size", type=int, default=8, help="images per network call")
    p.add_argument("--output", help="write the results as JSON here")
    return p.parse_args(argv)


def _parse_scales(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(q) for q in text.split(",") if q.strip())
    except ValueError:
        raise SystemExit(f"--scales must be comma-separated integers, got {text!r}.") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    members = load_members(args)
    config = _data_config(args, members)
    scales = _parse_scales(args.scales) if args.scales else paper_scales(config)
    split = args.split or config.eval_split
    try:
        protocols = ProtocolSet.build(
            members,
            args.mode,
            scales,
            not args.no_flip,
            grid=args.grid,
            batch_size=args.batch_size,
        )
    except ValueError as e:
        raise SystemExit(str(e)) from None
    from vgg_jax import input_pipeline

    # This process's share (the progress line and --limit are per process).
    total = -(-input_pipeline.num_examples(config, split) // jax.process_count())
    total = min(total, args.limit) if args.limit else total
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    start = time.time()
    results = evaluate_batches(
        protocols,
        # Groups of several network batches, so that images of one bucket batch together.
        dataset_batches(config, split, scales, GROUP_BATCHES * args.batch_size),
        limit=args.limit,
        total=total,
        progress=log if jax.process_index() == 0 else None,
    )
    names = " + ".join(m.name for m in members)
    summary = {
        "networks": [m.name for m in members],
        "dataset": config.dataset,
        "split": split,
        "flip": not args.no_flip,
        "grid": args.grid,
        "compiled_shapes": protocols.compiled_shapes,
        "seconds": round(time.time() - start, 2),
        "rows": [
            {
                "mode": row.mode,
                "scales": list(row.scales),
                "top1_error": c.top1_error,
                "top5_error": c.top5_error,
                "count": c.count,
            }
            for row, c in results.items()
        ],
    }
    if jax.process_index() == 0:
        print(format_table(results, f"{names} on {config.dataset}/{split}"))
        print(f"compiled shapes (dense): {protocols.compiled_shapes}")
        if args.output:
            fileio.write_text_atomic(args.output, json.dumps(summary, indent=2))  # gs:// too
    return summary


if __name__ == "__main__":
    from vgg_jax import cli

    cli.run(main)
