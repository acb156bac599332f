"""Localisation data: images with labelled boxes, and the paper's fixed-S central-crop targets.

A `LocalizationSet` holds images (pixels in [0, 1]) with, per image, corner
boxes `(ymin, xmin, ymax, xmax)` normalised to the image and their labels.
Two sources:

* `fashion_mnist_canvases`: real Fashion-MNIST items (Debian's IDX files or a
  directory of them, offline) pasted at random positions and scales onto a
  larger black canvas, one item per canvas, with the item's true (tight) box;
* `tfds_localization_set`: any tfds dataset with `image` and `objects/bbox` +
  `objects/label` features (`voc`, ImageNet localisation data prepared by the
  user), read into memory (`limit` examples at most).

`central_crops` turns a set into the paper's training view (Appendix A:
fixed S, central crops): each image rescaled to smallest side S, the central
image_size crop, and one target object per image (the largest box left in
the crop), its box encoded as (cx, cy, w, h) in the crop's frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vgg_jax import boxes, data_sources
from vgg_jax.class_names import FASHION_MNIST_CLASSES
from vgg_jax.image_io import to_uint8, unit_float

# An item pixel counts towards its box above this grey level (of 255): the items have
# faint fringes, and the box is the object's, not the 28x28 frame's.
ITEM_THRESHOLD = 25


@dataclasses.dataclass
class LocalizationSet:
    """Images (H, W, C), with per-image (K, 4) corner boxes and (K,) labels.

    Images are uint8 (tfds sets: a quarter of float32's memory, 3 GB rather
    than 11 for VOC 2007 trainval) or floats in [0, 1] (canvases); `unit_float`
    (`image_io`) gives either as float32 in [0, 1].
    """

    images: list[np.ndarray]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.boxes) == len(self.labels):
            raise ValueError(
                f"LocalizationSet: {len(self.images)} images, {len(self.boxes)} box lists and "
                f"{len(self.labels)} label lists; they must match."
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images[0].shape[-1])


# ---------------------------------------------------------------------------
# Fashion-MNIST canvases.


def fashion_mnist_items(split: str, manual_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST: uint8 items (n, 28, 28, 1) and labels (n,) of 'train' or 'test'."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
    directory = data_sources.find_fashion_mnist_dir(manual_dir)
    if directory is None:
        raise FileNotFoundError(data_sources.FASHION_MNIST_HELP)
    images, labels = data_sources.read_fashion_mnist(directory, prefix)
    return images, labels.astype(np.int32)


def item_box(item: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (top, left, bottom, right) pixel bounds (end-exclusive) of an item's visible pixels."""
    mask = np.asarray(item).reshape(item.shape[0], item.shape[1]) > ITEM_THRESHOLD
    if not mask.any():
        return 0, 0, item.shape[0], item.shape[1]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def paste(
    item: np.ndarray, canvas_size: int, side: int, top: int, left: int
) -> tuple[np.ndarray, np.ndarray]:
    """A black canvas with `item` resized to side x side at (top, left); its normalised box."""
    resized = Image.fromarray(np.asarray(item, np.uint8)[..., 0]).resize(
        (side, side), Image.BILINEAR
    )
    canvas = np.zeros((canvas_size, canvas_size, 1), np.float32)
    canvas[top : top + side, left : left + side, 0] = np.asarray(resized, np.float32) / 255.0
    t, lft, b, r = item_box(item)
    f = side / item.shape[0]
    box = np.array([top + t * f, left + lft * f, top + b * f, left + r * f], np.float32)
    return canvas, box / canvas_size


def paste_all(
    items: np.ndarray,
    canvas_size: int,
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each uint8 item on its own canvas, side uniform in scale_range * size; canvases, boxes.

    The item lies wholly inside its canvas at a uniformly random position.
    """
    lo, hi = scale_range
    if not 0 < lo <= hi <= 1:
        raise ValueError(
            f"scale_range {tuple(scale_range)} must satisfy 0 < min <= max <= 1 (item side as a "
            "fraction of the canvas side)."
        )
    sides = np.maximum(np.round(rng.uniform(lo, hi, len(items)) * canvas_size).astype(int), 4)
    canvases, box_list = [], []
    for item, side in zip(items, sides, strict=True):
        top, left = rng.integers(0, canvas_size - side + 1, 2)
        canvas, box = paste(item, canvas_size, int(side), int(top), int(left))
        canvases.append(canvas)
        box_list.append(box)
    return canvases, box_list


def fashion_mnist_canvases(
    items: np.ndarray,
    labels: np.ndarray,
    count: int,
    canvas_size: int,
    scale_range: tuple[float, float],
    seed: int | Sequence[int],
) -> LocalizationSet:
    """`count` canvases of canvas_size, each with one random item (`paste_all`).

    The set is a pure function of (items, seed): the same seed gives the same canvases.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(items), count)
    canvases, box_list = paste_all(items[picks], canvas_size, scale_range, rng)
    return LocalizationSet(
        canvases,
        [b[None] for b in box_list],
        [np.array([labels[j]], np.int32) for j in picks],
        FASHION_MNIST_CLASSES,
    )


# ---------------------------------------------------------------------------
# tfds datasets with objects/bbox.


def tfds_localization_set(
    name: str, split: str, data_dir: str = "", limit: int = 0
) -> LocalizationSet:
    """An in-memory set from a prepared tfds dataset with `objects/bbox` and `objects/label`."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir or None)
    features = builder.info.features
    objects = features["objects"] if "objects" in features else None
    if "image" not in features or objects is None or not {"bbox", "label"} <= set(objects.keys()):
        raise ValueError(
            f"tfds dataset {name!r} has no 'image' and 'objects' with 'bbox' and 'label' "
            f"(features: {list(features.keys())}); localisation needs boxes with labels, "
            "e.g. 'voc'."
        )
    names = tuple(getattr(objects["label"], "names", None) or [])
    ds = builder.as_dataset(split=split)
    if limit:
        ds = ds.take(limit)
    images, box_list, label_list = [], [], []
    for ex in tfds.as_numpy(ds):
        images.append(np.asarray(ex["image"]))  # uint8, as stored
        box_list.append(np.asarray(ex["objects"]["bbox"], np.float32).reshape(-1, 4))
        label_list.append(np.asarray(ex["objects"]["label"], np.int32).reshape(-1))
    if not images:
        raise ValueError(f"Split {split!r} of tfds dataset {name!r} has no examples.")
    num = objects["label"].num_classes
    return LocalizationSet(images, box_list, label_list, names or tuple(map(str, range(num))))


def tfds_num_examples(name: str, split: str, data_dir: str = "") -> int:
    """Examples in a split of a prepared tfds dataset (from its metadata, nothing read)."""
    import tensorflow_datasets as tfds

    return int(tfds.builder(name, data_dir=data_dir or None).info.splits[split].num_examples)


# ---------------------------------------------------------------------------
# The paper's training view: fixed S, central crops, one target per image.


def central_crop(image: np.ndarray, scale: int, size: int) -> tuple[np.ndarray, tuple]:
    """Image rescaled to smallest side `scale`, its central size x size crop, and the window.

    The window is (top, left, size, size) in the rescaled image, whose (H, W)
    comes last: what `boxes.image_to_crop` needs.
    """
    from vgg_jax.image_io import rescaled_size, resize_image

    image = unit_float(image)
    h, w = image.shape[:2]
    rh, rw = rescaled_size(h, w, scale)
    rescaled = image if (rh, rw) == (h, w) else resize_image(image, rh, rw)
    top, left = (rh - size) // 2, (rw - size) // 2
    return rescaled[top : top + size, left : left + size], (top, left, size, size, rh, rw)


def central_crops(
    data: LocalizationSet, scale: int, size: int, as_uint8: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, size, size, C) crops, (N, 4) (cx, cy, w, h) targets in crop frames, (N,) labels.

    The target is the object whose box keeps the largest area inside the crop
    (the whole box is encoded, also where it extends beyond the crop). Images
    without boxes are left out. Crops are float32 in [0, 1], or with `as_uint8`
    rounded to 0-255 one at a time (a quarter of the memory, never a float32
    copy of the whole set).
    """
    if scale < size:
        raise ValueError(f"Training scale S={scale} is smaller than the crop {size}; need S >= it.")
    crops, targets, labels = [], [], []
    for image, bxs, lbls in zip(data.images, data.boxes, data.labels, strict=True):
        if not len(bxs):
            continue
        crop, (top, left, height, width, rh, rw) = central_crop(image, scale, size)
        in_crop = boxes.image_to_crop(bxs, (top, left, height, width), (rh, rw))
        best = int(np.argmax(boxes.area(boxes.clip(in_crop))))
        crops.append(to_uint8(crop) if as_uint8 else crop)
        targets.append(boxes.encode(in_crop[best]))
        labels.append(lbls[best])
    if not crops:
        raise ValueError("No image of the set has a box; localisation needs labelled boxes.")
    return np.stack(crops), np.stack(targets), np.asarray(labels, np.int32)
