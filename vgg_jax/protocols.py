"""The paper's test protocols (PAPER.md, section 3): dense, multi-crop, fusion, ensembles.

Evaluators work on arrays of raw pixels in [0, 1] (NHWC, or a list of HxWxC
images of different sizes, or an `image_io.ImageSet`); each applies its own
`preprocess` callable (`checkpoints.Preprocessing`), so weights trained with
other normalisations (converted Keras/torchvision files) are evaluated on the
same pixels.

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
  A batch whose images all fill their bucket exactly (a dataset of one image
  size at Q a multiple of 32, e.g. Fashion-MNIST) has nothing to mask and
  runs the plain forward pass. Tested against unpadded evaluation in
  tests/test_protocols.py.

* `MultiCropEvaluator`: per scale a G x G grid of image_size crops (and their
  flips), soft-max averaged over all crops of all scales. G = 1 at Q equal to
  the training size is the usual central crop.
* `FusedEvaluator` / `fuse`: soft-max average of dense and multi-crop.
* `Ensemble`: soft-max average of several evaluators (models).
* `ProtocolSet`: every row of the paper's Tables 3-5 (each scale alone, all
  scales, the fusion) for an ensemble, from one pass over the images.

`member_evaluators` is the one place evaluators are built from a network
(`build_evaluator`, `Ensemble.from_members` and `ProtocolSet.build` use it).
Batches are sharded over a 'data' mesh axis of the local devices. (One idea,
the paper's section 3, in one module of about 600 lines.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import checkpoints, image_io, layers, models, parallel

Array = jax.Array
Preprocess = Callable[[Array], Array]

# Five 2x2 pools: one score-map step is 32 input pixels.
NETWORK_STRIDE = 2**models.NUM_STAGES
DEFAULT_SCALES = (256, 384, 512)
MODES = ("dense", "multicrop", "both")


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


def softmax(x: Array) -> Array:
    """Soft-max over the class axis (last), computed in float32 whatever the network's dtype."""
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


def _dense_forward(model, preprocess, spatial_average, maps, masked, variables, x, valid_hw):
    """Soft-max of the masked spatial average (or the masked score maps) of a padded batch.

    `masked=False` when no image of the batch is padded: nothing can leak, so
    the layers' inputs need no masks.
    """
    x = preprocess(x)
    if masked:
        with nn.intercept_methods(_masking_interceptor(valid_hw, x.shape[1])):
            scores = model.apply(variables, x, method="score_map")
    else:
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
        return softmax(jnp.sum(scores * weights, axis=(1, 2)))
    return jnp.sum(softmax(scores) * weights, axis=(1, 2))


@functools.lru_cache(maxsize=64)
def _dense_fn(model, preprocess, spatial_average, maps, masked=True):
    """One jitted function per network and preprocessing, shared by all evaluators of it."""
    return jax.jit(
        functools.partial(_dense_forward, model, preprocess, spatial_average, maps, masked)
    )


@functools.lru_cache(maxsize=64)
def _crop_fn(model, preprocess):
    return jax.jit(lambda v, x: softmax(model.apply(v, preprocess(x), train=False)))


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
        # (kind, masked, shape) of every batch run: the shapes this evaluator needs compiled.
        self._compiled: set[tuple[str, bool, tuple[int, ...]]] = set()
        # {(kind, masked): jitted forward}: kind "probs" or "maps"; unmasked for unpadded batches.
        self._fns = {
            (kind, masked): _dense_fn(
                model, self.preprocess, spatial_average, kind == "maps", masked
            )
            for kind in ("probs", "maps")
            for masked in (True, False)
        }

    @property
    def compiled_shapes(self) -> int:
        """How many batch shapes this evaluator ran (one compilation each, per bucket and kind)."""
        return len(self._compiled)

    def bucket_shape(self, height: int, width: int) -> tuple[int, int]:
        m = self.bucket_multiple
        return -(-height // m) * m, -(-width // m) * m

    def _rows(self, n: int, kind: str, masked: bool, image_shape: tuple[int, ...]) -> int:
        """Rows of the batch that runs `n` images of `image_shape` (H, W, C) in one call.

        The smallest batch this evaluator already ran for that call, if one holds them:
        a few padded rows cost less than a compilation (0.6 s for the demo's last 16 test
        images, against 55 ms for the 240 rows that pad them to 256). Else a bucket's
        short last chunk runs at the next power of two rows, not the full batch (a
        bounded set of sizes, log2(batch) + 1 per bucket at most).
        """
        ran = [
            shape[0]
            for k, m, shape in self._compiled
            if (k, m) == (kind, masked) and shape[1:] == image_shape and shape[0] >= n
        ]
        if ran:
            return min(ran)
        full = self._devices.round_up(self.batch_size * (2 if self.flip else 1))
        rows = min(full, self._devices.round_up(1 << (n - 1).bit_length()))
        return max(rows, self._devices.round_up(n))

    def _run(self, kind: str, images: list[np.ndarray], bucket: tuple[int, int]) -> Array:
        """One call on images of one bucket: outputs for them in its first len(images) rows.

        Returns without waiting for the result, so that the host prepares the
        next batch while the network computes this one.
        """
        channels = images[0].shape[-1]
        masked = any(im.shape[:2] != bucket for im in images)
        rows = self._rows(len(images), kind, masked, (*bucket, channels))
        x = np.zeros((rows, *bucket, channels), np.float32)
        valid = np.tile(np.asarray(bucket, np.int32), (rows, 1))
        for i, im in enumerate(images):
            x[i, : im.shape[0], : im.shape[1]] = im
            valid[i] = im.shape[:2]
        self._compiled.add((kind, masked, x.shape))
        return self._fns[kind, masked](self.variables, *self._devices.put_batch(x, valid))

    def _per_image(self, kind: str, images: list[np.ndarray]) -> list[np.ndarray]:
        """Runs the `kind` forward on every image (grouped by bucket, in chunks of batch_size)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.bucket_shape(*im.shape[:2]), []).append(i)
        step = self._devices.round_up(self.batch_size * (2 if self.flip else 1))
        launched = []  # every call dispatched first, then fetched: no wait between calls
        for bucket, idx in sorted(groups.items()):
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                launched.append((chunk, self._run(kind, [images[i] for i in chunk], bucket)))
        results: list[np.ndarray | None] = [None] * len(images)
        for chunk, out in launched:
            for i, o in zip(chunk, np.asarray(out)[: len(chunk)], strict=True):
                results[i] = o
        return results  # type: ignore[return-value]

    def predict_per_scale(self, images: Any) -> dict[int, np.ndarray]:
        """{Q: (N, classes)} soft-max averaged over flips, one entry per scale."""
        images = image_io.as_image_set(images)
        out = {}
        for q in self.scales:
            ims = images.at_scale(q)
            batch = ims + ([im[:, ::-1] for im in ims] if self.flip else [])
            probs = np.stack(self._per_image("probs", batch))
            if self.flip:
                probs = (probs[: len(ims)] + probs[len(ims) :]) / 2
            out[q] = probs
        return out

    def predict(self, images: Any) -> np.ndarray:
        """(N, classes) class probabilities averaged over flips and scales."""
        return np.mean(list(self.predict_per_scale(images).values()), axis=0)

    def score_maps(self, images: Any) -> list[dict[int, np.ndarray]]:
        """Per image, {Q: (H', W', classes)} class score maps (pre-soft-max, unflipped)."""
        images = image_io.as_image_set(images)
        maps: list[dict[int, np.ndarray]] = [{} for _ in range(len(images))]
        for q in self.scales:
            ims = images.at_scale(q)
            for i, (im, m) in enumerate(
                zip(ims, self._per_image("maps", ims), strict=True)
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
        images = image_io.as_image_set(images)
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
        images = image_io.as_image_set(images)
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
    step: int | None = None  # the training step of a run's checkpoint, when known

    @classmethod
    def from_bundle(cls, bundle: checkpoints.ModelBundle, name: str = "") -> Member:
        step = bundle.metadata.get("step")
        return cls(
            bundle.model,
            bundle.variables,
            bundle.preprocessing,
            name or bundle.name,
            None if step is None else int(step),
        )



def member_evaluators(
    member: Member,
    mode: str = "dense",
    scales: Iterable[int] = DEFAULT_SCALES,
    flip: bool = True,
    *,
    grid: int = 5,
    batch_size: int = 8,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[DenseEvaluator | None, MultiCropEvaluator | None]:
    """The one builder: a network's dense and/or multi-crop evaluator for `mode`.

    `batch_size` is in images for both protocols (multi-crop runs its
    grid x grid crops of that many images per network call).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    scales = tuple(scales)
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
    return dense, multicrop


def build_evaluator(member: Member, mode: str = "dense", *args, **kwargs) -> Evaluator:
    """The evaluator of one protocol ('dense', 'multicrop' or 'both' fused) for one network.

    Arguments as `member_evaluators`.
    """
    dense, multicrop = member_evaluators(member, mode, *args, **kwargs)
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
        images = image_io.as_image_set(images)
        return fuse(*(e.predict(images) for e in self.evaluators))


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
        built = [
            member_evaluators(
                m, mode, scales, flip, grid=grid, batch_size=batch_size, devices=devices
            )
            for m in members
        ]
        dense = [d for d, _ in built if d is not None]
        multicrop = [c for _, c in built if c is not None]
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
        images = image_io.as_image_set(images)
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

