"""Classify images: the top classes of a network, with names and probabilities.

    python -m vgg_jax.predict cat.jpg dog.png --weights vgg16          # torchvision's, by name
    python -m vgg_jax.predict cat.jpg --weights keras_vgg16 --dense
    python -m vgg_jax.predict shoe.png --weights runs/fashion_mnist_quick   # a training run

`--weights` is anything `vgg_jax.pretrained.resolve` takes: a weights name,
a bundle directory or a training workdir (its best variables).
Single crop (default): the source's own preprocessing
(`vgg_jax.reference_preprocessing`): for a training run its validation view
(smallest side rescaled to its eval_scale, central image_size crop, the
trainer's own TensorFlow ops), for torchvision weights and other bundles
`Resize(256)` + `CenterCrop(224)` with torchvision's integer arithmetic
(scaled to the network's image_size), for Keras weights Keras's
`load_img(target_size=(224, 224))` squash (nearest neighbour).
`--dense`: the paper's dense multi-scale evaluation (`vgg_jax.evaluate.
DenseEvaluator`): the whole image at smallest sides Q = 256, 384, 512 (scaled
by image_size / 224) and its mirror image, soft-max averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from vgg_jax import checkpoints, cli, pretrained, reference_preprocessing
from vgg_jax import class_names as names_lib
from vgg_jax.checkpoints import ModelBundle
from vgg_jax.image_io import open_image, pixels

DENSE_SCALES = (256, 384, 512)


def central_crop(image: Image.Image | np.ndarray, image_size: int = 224) -> np.ndarray:
    """torchvision's Resize(image_size * 256 / 224) + CenterCrop(image_size), pixels in [0, 1]."""
    image = reference_preprocessing.as_pil(image)
    return pixels(reference_preprocessing.torchvision_crop(image, image_size))


def class_names(bundle: ModelBundle) -> list[str]:
    """Names for the bundle's classes (`vgg_jax.class_names.class_names`)."""
    return names_lib.class_names(bundle)


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
    checkpoints.check_classifier(bundle, "predict")
    grey = checkpoints.input_channels(bundle.variables) == 1
    images = [open_image(p, 1 if grey else 3) for p in paths]
    if dense:
        probs = dense_probabilities(bundle, [pixels(im) for im in images], scales)
    else:
        crops = np.stack([reference_preprocessing.reference_crop(im, bundle) for im in images])
        probs = single_crop_probabilities(bundle, crops)
    names = class_names(bundle)
    return [top_k(p, names, top) for p in probs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m vgg_jax.predict",
        description="Top classes of images, with pretrained weights, a bundle or a training run.",
    )
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    parser.add_argument(
        "--weights",
        required=True,
        help=f"weights name ({', '.join(pretrained.names())}), model bundle directory or "
        "training workdir",
    )
    parser.add_argument(
        "--which", default="best", choices=("best", "latest"), help="for a workdir: which state"
    )
    parser.add_argument("--dense", action="store_true", help="dense multi-scale evaluation")
    parser.add_argument(
        "--scales",
        type=cli.integers(1),
        help="comma-separated Q for --dense (default 256,384,512)",
    )
    parser.add_argument("--top", type=cli.integer(1), default=5, help="how many classes to print")
    args = parser.parse_args(argv)
    # Errors reach cli.run: one line, or the traceback with --debug.
    bundle = pretrained.resolve(args.weights, args.which)
    results = predict(bundle, args.images, args.dense, args.top, args.scales)
    view = reference_preprocessing.describe_view(bundle)
    how = "dense, multi-scale + flip" if args.dense else view
    for path, top in zip(args.images, results, strict=True):
        print(f"{path} ({bundle.name}, {how}):")
        for rank, (index, name, p) in enumerate(top, 1):
            print(f"  {rank}. {name:<30s} {p:7.4f}  (class {index})")
    return 0


if __name__ == "__main__":
    cli.run(main)
