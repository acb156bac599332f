"""Classify images with a model bundle: top-5 ImageNet classes with names and probabilities.

    python -m vgg_jax.predict cat.jpg dog.png --weights weights/vgg16_torchvision
    python -m vgg_jax.predict cat.jpg --weights weights/vgg16_keras --dense

Single crop (default): the image is rescaled isotropically so its smallest
side is image_size * 256 / 224 (256 for 224 models), with PIL's bilinear
(antialiased) filter, and the central image_size square is classified: the
same as torchvision's reference `Resize(256) + CenterCrop(224)`.
`--dense`: the paper's dense multi-scale evaluation (`vgg_jax.evaluate.
DenseEvaluator`): the whole image at smallest sides Q = 256, 384, 512 (scaled
by image_size / 224) and its mirror image, soft-max averaged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from vgg_jax import checkpoints, imagenet_classes
from vgg_jax.checkpoints import ModelBundle
from vgg_jax.image_io import open_image, pixels, to_uint8

DENSE_SCALES = (256, 384, 512)


def central_crop(image: Image.Image | np.ndarray, image_size: int = 224) -> np.ndarray:
    """Smallest side to image_size * 256 / 224 (bilinear), then the central square; [0, 1]."""
    if isinstance(image, np.ndarray):
        quantised = to_uint8(image)
        image = Image.fromarray(quantised[..., 0] if quantised.shape[-1] == 1 else quantised)
    side = round(image_size * 256 / 224)
    w, h = image.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return pixels(image)


def class_names(bundle: ModelBundle) -> list[str]:
    """Names for the bundle's classes: its own list, ImageNet's, or 'class i'."""
    names = bundle.metadata.get("class_names")
    if names and len(names) == bundle.num_classes:
        return list(names)
    if bundle.num_classes == len(imagenet_classes.CLASSES):
        return [imagenet_classes.class_name(i) for i in range(bundle.num_classes)]
    return [f"class {i}" for i in range(bundle.num_classes)]


def single_crop_probabilities(bundle: ModelBundle, crops: np.ndarray) -> np.ndarray:
    """(N, classes) soft-max of the network on (N, S, S, 3) crops in [0, 1]."""
    model, preprocessing = bundle.model, bundle.preprocessing

    @jax.jit
    def probs(variables, pixels):
        return jax.nn.softmax(model.apply(variables, preprocessing(pixels)), axis=-1)

    return np.asarray(probs(bundle.variables, crops))


def dense_probabilities(
    bundle: ModelBundle, images: Sequence[np.ndarray], scales: Sequence[int] | None = None
) -> np.ndarray:
    """(N, classes) by the evaluation module's dense multi-scale evaluator, with flips."""
    try:
        from vgg_jax.protocols import DenseEvaluator
    except ImportError as e:
        raise RuntimeError(
            f"--dense needs vgg_jax.protocols.DenseEvaluator, which did not import ({e})."
        ) from e
    if scales is None:
        scales = [round(q * bundle.image_size / 224) for q in DENSE_SCALES]
    evaluator = DenseEvaluator(
        bundle.model, bundle.variables, scales=scales, flip=True, preprocess=bundle.preprocessing
    )
    return np.asarray(evaluator.predict(list(images)))


def top_k(probs: np.ndarray, names: Sequence[str], k: int = 5) -> list[tuple[int, str, float]]:
    """[(class index, name, probability)] of the k most probable classes."""
    order = np.argsort(-probs)[:k]
    return [(int(i), names[i], float(probs[i])) for i in order]


def predict(
    bundle: ModelBundle,
    paths: Sequence[str],
    dense: bool = False,
    top: int = 5,
    scales: Sequence[int] | None = None,
) -> list[list[tuple[int, str, float]]]:
    """Top classes per image file: single central crop, or dense multi-scale.

    Bundles adapted to greyscale (`convert --in-channels 1`) get the images in grey.
    """
    grey = np.shape(bundle.variables["params"]["features"]["conv1_1"]["kernel"])[2] == 1
    images = [open_image(p, 1 if grey else 3) for p in paths]
    if dense:
        probs = dense_probabilities(bundle, [pixels(im) for im in images], scales)
    else:
        crops = np.stack([central_crop(im, bundle.image_size) for im in images])
        probs = single_crop_probabilities(bundle, crops)
    names = class_names(bundle)
    return [top_k(p, names, top) for p in probs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vgg_jax.predict",
        description="Top ImageNet classes of images, with a converted or trained model bundle.",
    )
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    parser.add_argument("--weights", required=True, help="model bundle directory")
    parser.add_argument("--dense", action="store_true", help="dense multi-scale evaluation")
    parser.add_argument("--scales", help="comma-separated Q for --dense (default 256,384,512)")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print")
    args = parser.parse_args(argv)
    scales = [int(q) for q in args.scales.split(",")] if args.scales else None
    try:
        bundle = checkpoints.load_bundle(args.weights)
        results = predict(bundle, args.images, args.dense, args.top, scales)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = "dense, multi-scale + flip" if args.dense else f"central {bundle.image_size} crop"
    for path, top in zip(args.images, results, strict=True):
        print(f"{path} ({bundle.name}, {how}):")
        for rank, (index, name, p) in enumerate(top, 1):
            print(f"  {rank}. {name:<30s} {p:7.4f}  (class {index})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
