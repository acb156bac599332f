"""Human-readable class names for bundles and training runs ("Bag", not "class 8").

Names come from, in order: the bundle's own `metadata["class_names"]`;
the dataset the run or bundle records (`metadata["dataset"]`): Fashion-MNIST's
ten names, an image folder's sorted class folders, or a tfds dataset's
`ClassLabel` names; ImageNet's for 1000-class networks; else "class i".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vgg_jax import imagenet_classes
from vgg_jax.checkpoints import ModelBundle

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def dataset_class_names(
    dataset: str, data_dir: str = "", classes: Sequence[int] = ()
) -> list[str] | None:
    """The label names of a dataset as the input pipeline numbers them; None if unknown.

    `classes` (config.classes) keeps those labels, relabelled 0..k-1 in that order.
    """
    names = _all_names(dataset, data_dir)
    if names is None:
        return None
    if classes:
        if any(not 0 <= int(c) < len(names) for c in classes):
            return None
        return [names[int(c)] for c in classes]
    return names


def _all_names(dataset: str, data_dir: str) -> list[str] | None:
    if not dataset:
        return None
    if dataset == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if dataset == "image_folder":
        train = os.path.join(data_dir, "train")
        if not os.path.isdir(train):
            return None
        return sorted(e.name for e in os.scandir(train) if e.is_dir())
    return _tfds_names(dataset, data_dir)


def _tfds_names(dataset: str, data_dir: str) -> list[str] | None:
    """tfds's ClassLabel names; None when the builder or its names are not available offline."""
    try:
        import tensorflow_datasets as tfds

        label = tfds.builder(dataset, data_dir=data_dir or None).info.features["label"]
        names = list(label.names)
    except Exception:  # noqa: BLE001 - unknown, unprepared or label-less datasets: no names
        return None
    return names or None


def class_names(bundle: ModelBundle) -> list[str]:
    """One name per output class of the bundle (see the module docstring for the order)."""
    return known_class_names(bundle) or [f"class {i}" for i in range(bundle.num_classes)]


def known_class_names(bundle: ModelBundle) -> list[str] | None:
    """The bundle's class names from its metadata, its dataset or ImageNet; None if unknown."""
    n = bundle.num_classes
    meta: dict[str, Any] = bundle.metadata or {}
    names = meta.get("class_names")
    if names and len(names) == n:
        return list(names)
    names = dataset_class_names(
        meta.get("dataset", ""), meta.get("data_dir", ""), meta.get("classes", ())
    )
    if names and len(names) == n:
        return names
    if n == len(imagenet_classes.CLASSES):
        return [imagenet_classes.class_name(i) for i in range(n)]
    return None


def with_class_names(bundle: ModelBundle) -> ModelBundle:
    """The bundle with `metadata["class_names"]` filled in when they are known."""
    names = known_class_names(bundle)
    if names and (bundle.metadata or {}).get("class_names") != names:
        bundle.metadata = dict(bundle.metadata or {}) | {"class_names": names}
    return bundle
