"""Class score maps of one image: `python -m vgg_jax.score_map IMAGE --weights vgg16`.

`--weights` takes a weights name, a bundle directory or a training run
(`vgg_jax.pretrained.resolve`); `--workdir` and `--checkpoint` still work.

Runs the network fully convolutionally (the paper's dense evaluation) on the
image rescaled to smallest side Q, and writes a PNG: the image, then for each
of the top classes (by the spatially averaged scores) the per-position soft-max
probability of that class laid over the whole image, titled with the class
name. Position (i, j) of the map is the network's view of the window of
image_size pixels starting at 32 * (i, j); each pixel is coloured by the
position whose window is centred nearest to it (`full_image_map`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from vgg_jax import checkpoints, cli, evaluate, fileio, image_io, protocols
from vgg_jax import class_names as names_lib


def class_names(bundle, labels_file: str | None, num_classes: int) -> list[str]:
    """From --labels (one name a line), else the bundle's or its dataset's names."""
    if labels_file:
        with open(labels_file) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num_classes:
            raise SystemExit(
                f"{labels_file} has {len(names)} names but the network has {num_classes} classes."
            )
        return names
    return names_lib.class_names(bundle)


def default_scale(image_size: int) -> int:
    """The paper's middle test scale (384 for 224 crops), in proportion to image_size."""
    return int(round(image_size * 384 / 224))


def top_class_maps(
    dense: protocols.DenseEvaluator, image: np.ndarray, top: int
) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """(image at Q, top class indices, their average probabilities, their probability maps)."""
    (q,) = dense.scales
    scores = dense.score_maps([image])[0][q]
    probs = np.asarray(protocols.softmax(scores.mean(axis=(0, 1))))
    classes = [int(c) for c in np.argsort(-probs)[:top]]
    position_probs = np.asarray(protocols.softmax(scores))
    rescaled = image_io.ImageSet([image]).at_scale(q)[0]
    return rescaled, classes, probs[classes], position_probs[..., classes]


def full_image_map(maps: np.ndarray, height: int, width: int, crop: int, stride: int) -> np.ndarray:
    """(height, width, ...) maps: each pixel shows the cell whose window is centred nearest.

    Cell (i, j) sees the crop x crop window starting at stride * (i, j), whose
    centre is stride * (i, j) + crop / 2; pixels beyond the first and last
    centres take the edge cells, so the picture covers the whole image.
    """

    def nearest(n: int, cells: int) -> np.ndarray:
        centre = np.arange(n) + 0.5 - crop / 2
        return np.clip(np.round(centre / stride), 0, cells - 1).astype(int)

    return maps[nearest(height, maps.shape[0])][:, nearest(width, maps.shape[1])]


def draw(
    image: np.ndarray,
    names: Sequence[str],
    probs: Sequence[float],
    maps: np.ndarray,
    window: int,
    output: str,
) -> None:
    """Saves the image and one heat-map panel per class over the whole image to `output` (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch

    stride = protocols.NETWORK_STRIDE
    height, width = image.shape[:2]
    full = full_image_map(maps, height, width, window * stride, stride)
    shown = image[..., 0] if image.shape[-1] == 1 else image
    top = max(float(maps.max()), 1e-6)  # one colour scale for all panels
    fig = Figure(figsize=(4 * (len(names) + 1), 4.4))
    axes = fig.subplots(1, len(names) + 1)
    axes[0].imshow(np.clip(shown, 0, 1), cmap="gray" if shown.ndim == 2 else None)
    axes[0].set_title(f"input, Q={min(height, width)}")
    for ax, name, p, m in zip(axes[1:], names, probs, np.moveaxis(full, -1, 0), strict=True):
        ax.imshow(np.clip(shown, 0, 1), cmap="gray" if shown.ndim == 2 else None)
        heat = ax.imshow(m, cmap="jet", alpha=0.5, extent=(0, width, height, 0), vmin=0, vmax=top)
        ax.set_title(f"{name}: {100 * p:.1f}%")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(heat, ax=axes[1:], shrink=0.8, label="per-position soft-max probability")
    fileio.make_parent_dirs(output)
    fig.savefig(output, dpi=100)


def main(argv: Sequence[str] | None = None) -> str:
    p = cli.ArgumentParser(
        prog="python -m vgg_jax.score_map", description="Heat maps of the top classes of an image."
    )
    p.add_argument("image", help="JPEG/PNG file")
    p.add_argument("--workdir", help="training run directory")
    p.add_argument("--which", default="best", choices=("best", "latest"))
    p.add_argument("--checkpoint", help="model bundle directory (e.g. converted weights)")
    p.add_argument("--weights", help="weights name (e.g. vgg16), bundle or run directory")
    p.add_argument(
        "--scale", type=cli.integer(1), help="test scale Q (default: 384 for 224 networks)"
    )
    p.add_argument("--top", type=cli.integer(1), default=3, help="number of classes to draw")
    p.add_argument("--labels", help="text file with one class name per line")
    p.add_argument(
        "--output",
        type=cli.output_file("score_map.png"),
        help="PNG to write (default: IMAGE_score_map.png here)",
    )
    args = p.parse_args(argv)
    given = [a for a in (args.weights, args.workdir, args.checkpoint) if a]
    if len(given) != 1:
        raise SystemExit("Name one network: --weights NAME_OR_DIR (or --workdir / --checkpoint).")
    member, bundle = evaluate.load_network(given[0], args.which)
    checkpoints.check_classifier(bundle, "score_map")
    channels = checkpoints.input_channels(member.variables)
    image = image_io.load_image(args.image, channels)
    size = member.model.image_size
    q = args.scale or default_scale(size)
    try:
        dense = protocols.DenseEvaluator(
            member.model, member.variables, (q,), flip=False, preprocess=member.preprocess
        )
    except ValueError as e:
        raise SystemExit(str(e)) from None
    top = max(1, min(args.top, member.model.num_classes))
    rescaled, classes, probs, maps = top_class_maps(dense, image, top)
    names = class_names(bundle, args.labels, member.model.num_classes)
    output = args.output or os.path.splitext(os.path.basename(args.image))[0] + "_score_map.png"
    window = size // protocols.NETWORK_STRIDE
    draw(rescaled, [names[c] for c in classes], probs, maps, window, output)
    for c, pr in zip(classes, probs, strict=True):
        print(f"{names[c]}: {100 * pr:.2f}%")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    cli.run(main)
