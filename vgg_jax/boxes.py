"""Bounding boxes for the paper's localisation (Appendix A): encoding, IoU, loss, merging, error.

Two representations, both normalised (0..1 spans the frame they refer to):

* corner boxes `(ymin, xmin, ymax, xmax)`, tfds's `BBoxFeature` order, for
  data, IoU and drawing;
* the network's targets `(cx, cy, w, h)`: box centre, width and height in the
  frame of the crop the network saw (the paper's 4-D box parameters). A box
  that extends beyond the crop has values outside [0, 1]; they are kept.

The ILSVRC criterion: a predicted (class, box) is correct when the class is a
ground-truth class of the image and the box overlaps a ground-truth box of that
class with IoU > 0.5. Top-5 localisation error: an image is wrong when none of
its (up to) five predictions is correct.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

ILSVRC_IOU = 0.5


def encode(corners: np.ndarray) -> np.ndarray:
    """(..., 4) corner boxes (ymin, xmin, ymax, xmax) -> (..., 4) (cx, cy, w, h)."""
    c = np.asarray(corners, np.float32)
    ymin, xmin, ymax, xmax = np.moveaxis(c, -1, 0)
    return np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)


def decode(params: np.ndarray) -> np.ndarray:
    """(..., 4) (cx, cy, w, h) -> (..., 4) corner boxes; negative sizes are taken as 0."""
    p = np.asarray(params, np.float32)
    cx, cy, w, h = np.moveaxis(p, -1, 0)
    w, h = np.maximum(w, 0), np.maximum(h, 0)
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


def crop_to_image(corners: np.ndarray, window: Sequence[float], image_hw: Sequence[float]):
    """Corner boxes normalised to a crop -> normalised to the image the crop was taken from.

    `window` = (top, left, height, width) of the crop in image pixels; `image_hw`
    = (height, width) of that image in the same pixels.
    """
    top, left, height, width = (float(v) for v in window)
    ih, iw = (float(v) for v in image_hw)
    c = np.asarray(corners, np.float32)
    scale = np.array([height / ih, width / iw, height / ih, width / iw], np.float32)
    offset = np.array([top / ih, left / iw, top / ih, left / iw], np.float32)
    return c * scale + offset


def image_to_crop(corners: np.ndarray, window: Sequence[float], image_hw: Sequence[float]):
    """The inverse of `crop_to_image`."""
    top, left, height, width = (float(v) for v in window)
    ih, iw = (float(v) for v in image_hw)
    c = np.asarray(corners, np.float32)
    scale = np.array([height / ih, width / iw, height / ih, width / iw], np.float32)
    offset = np.array([top / ih, left / iw, top / ih, left / iw], np.float32)
    return (c - offset) / scale


def clip(corners: np.ndarray) -> np.ndarray:
    """Corner boxes clipped to the frame [0, 1]."""
    return np.clip(np.asarray(corners, np.float32), 0.0, 1.0)


def area(corners: np.ndarray) -> np.ndarray:
    c = np.asarray(corners, np.float32)
    return np.maximum(c[..., 2] - c[..., 0], 0) * np.maximum(c[..., 3] - c[..., 1], 0)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of corner boxes, broadcast over leading axes: (..., 4) -> (...)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    top = np.maximum(a[..., 0], b[..., 0])
    left = np.maximum(a[..., 1], b[..., 1])
    bottom = np.minimum(a[..., 2], b[..., 2])
    right = np.minimum(a[..., 3], b[..., 3])
    inter = np.maximum(bottom - top, 0) * np.maximum(right - left, 0)
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def euclidean_loss(predicted, targets):
    """The paper's Euclidean loss: half the squared distance of the 4-D box vectors, batch mean.

    Works on numpy and jax arrays (it is the localisation train step's loss).
    """
    diff = jnp.asarray(predicted, jnp.float32) - jnp.asarray(targets, jnp.float32)
    return 0.5 * jnp.mean(jnp.sum(diff * diff, axis=-1))


def merge(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy merging of spatially close predictions (the paper's Appendix A, after OverFeat).

    Repeatedly takes the best-scored box not yet merged, gathers every remaining
    box that overlaps it with IoU > iou_threshold, and replaces the group by the
    score-weighted average of its coordinates, rated by the sum of the group's
    scores (many agreeing confident positions beat one). Returns (M, 4) merged
    boxes and (M,) ratings, best first.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"merge: {len(boxes)} boxes but {len(scores)} scores.")
    left = np.argsort(-scores, kind="stable")
    merged, ratings = [], []
    while left.size:
        overlap = iou(boxes[left[0]], boxes[left])
        group = left[overlap > iou_threshold]
        group = group if group.size else left[:1]  # a degenerate box still forms its own group
        w = scores[group]
        total = float(w.sum())
        weights = w / total if total > 0 else np.full(len(group), 1.0 / len(group), np.float32)
        merged.append(weights @ boxes[group])
        ratings.append(total)
        left = np.setdiff1d(left, group, assume_unique=True)
        left = left[np.argsort(-scores[left], kind="stable")]
    if not merged:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    order = np.argsort(-np.asarray(ratings), kind="stable")
    return np.asarray(merged, np.float32)[order], np.asarray(ratings, np.float32)[order]


def is_correct(
    pred_class: int,
    pred_box: np.ndarray,
    gt_labels: np.ndarray,
    gt_boxes: np.ndarray,
    threshold: float = ILSVRC_IOU,
) -> bool:
    """The ILSVRC criterion for one prediction: right class and IoU > threshold with its box."""
    gt_labels = np.asarray(gt_labels).reshape(-1)
    same = np.asarray(gt_boxes, np.float32).reshape(-1, 4)[gt_labels == pred_class]
    return bool(same.size) and bool(np.any(iou(pred_box, same) > threshold))


def localization_error(
    predictions: Sequence[Sequence[tuple[int, np.ndarray]]],
    gt_labels: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    top: int = 5,
    threshold: float = ILSVRC_IOU,
) -> float:
    """Top-k localisation error: the fraction of images none of whose first k predictions is right.

    `predictions[i]` is image i's list of (class, corner box), best first.
    """
    if not len(predictions):
        raise ValueError("localization_error: no images.")
    wrong = 0
    for preds, labels, gts in zip(predictions, gt_labels, gt_boxes, strict=True):
        ok = any(is_correct(c, b, labels, gts, threshold) for c, b in list(preds)[:top])
        wrong += not ok
    return wrong / len(predictions)
