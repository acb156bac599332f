"""VGG as a feature extractor: named activations, perceptual loss, the paper's descriptor.

Every function takes a `ModelBundle` (from `vgg_jax.pretrained.resolve`:
a weights name such as "vgg16", a bundle directory or a training run; a
string is resolved on each call, so resolve once for loops) or a bare `VGG`
model with its variables:

* with a bundle, images are RGB pixels in [0, 1] (NHWC) and the bundle's own
  preprocessing (channel order, value range, mean, std) is applied, so
  converted torchvision and Keras weights see what they were trained on
  (a greyscale network, such as a Fashion-MNIST run, gets their luma);
* with a model, images are network input, already preprocessed.

    bundle = pretrained.resolve("vgg16")   # or a bundle directory, or a training run
    acts = features(bundle, None, images, layers=("relu1_2", "pool5", "fc7"))
    loss = perceptual_loss(bundle, None, x, y)            # differentiable in x and y
    desc = image_descriptor(bundle, None, [img1, img2])   # (2, 4096), unit L2 norm
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models
from vgg_jax.checkpoints import ModelBundle, Preprocessing, input_channels

Array = jax.Array
DESCRIPTOR_SCALES = (256, 384, 512)  # the paper's Q for Appendix B
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights of PIL's "L" (image_io.luma)


def _as_network(network: ModelBundle | models.VGG | str) -> ModelBundle | models.VGG:
    """A string is a weights name, bundle directory or run (`pretrained.resolve`)."""
    if isinstance(network, str):
        from vgg_jax import pretrained  # only callers that pass a name pay for its imports

        return pretrained.resolve(network)
    return network


def _resolve(
    network: ModelBundle | models.VGG | str, variables: Mapping[str, Any] | None
) -> tuple[models.VGG, Mapping[str, Any], Preprocessing | None]:
    """(model, variables, preprocessing or None) from a bundle, a model, or a name/path."""
    network = _as_network(network)
    if isinstance(network, ModelBundle):
        return network.model, variables or network.variables, network.preprocessing
    if not isinstance(network, models.VGG):
        raise TypeError(
            f"Expected a ModelBundle or a vgg_jax VGG model, got {type(network).__name__}."
        )
    if variables is None:
        raise ValueError("A bare VGG model needs its variables; pass them, or pass a bundle.")
    return network, variables, None


@functools.lru_cache(maxsize=64)
def _extractor(model: models.VGG, names: tuple[str, ...]) -> Any:
    """One compiled function per (model, layer set); jit then caches per input shape."""
    return jax.jit(lambda v, x: model.apply(v, x, names, method="extract"))


def _check_layers(model: models.VGG, layers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(layers, str):
        layers = (layers,)
    valid = model.layer_names()
    unknown = [n for n in layers if n not in valid]
    if unknown:
        raise ValueError(f"{model.spec.name} has no layers {unknown}; valid names: {valid}.")
    return tuple(layers)


def features(
    network: ModelBundle | models.VGG | str,
    variables: Mapping[str, Any] | None,
    images: Array | np.ndarray,
    layers: Sequence[str] = ("fc7",),
) -> dict[str, Array]:
    """Activations of the named layers, {name: (N, H', W', C)}, in one forward pass.

    Names: 'conv{s}_{i}' (before ReLU), 'relu{s}_{i}', 'pool{s}', 'lrn1' and
    'fc6'/'fc7' (ReLU outputs of the head applied convolutionally: maps, which
    need inputs of at least the model's image_size). Any input size works for
    the convolutional layers.
    """
    model, variables, preprocessing = _resolve(network, variables)
    names = _check_layers(model, layers)
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:
        raise ValueError(f"images must be a batch (N, H, W, C); got shape {x.shape}. Add x[None].")
    if preprocessing is not None:
        if x.shape[-1] == 3 and input_channels(variables) == 1:
            x = x @ jnp.asarray(LUMA)[:, None]  # RGB for a greyscale net: what predict feeds it
        x = preprocessing(x)
    return _extractor(model, names)(variables, x)


def default_perceptual_layers(model: models.VGG) -> tuple[str, ...]:
    """The last ReLU of stages 1-4 (relu1_2, relu2_2, relu3_3, relu4_3 for VGG16).

    As in Johnson et al. (2016)'s perceptual losses, for whatever depth the
    configuration has.
    """
    return tuple(f"relu{s + 1}_{len(k)}" for s, k in enumerate(model.spec.stages[:4]))


def perceptual_loss(
    network: ModelBundle | models.VGG | str,
    variables: Mapping[str, Any] | None,
    x: Array,
    y: Array,
    layers: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
) -> Array:
    """Weighted sum over layers of the mean squared difference of x's and y's activations.

    Differentiable in x and y (a scalar); x and y are batches of the same shape.
    `layers` defaults to `default_perceptual_layers`, `weights` to all ones.
    Identical x and y give exactly 0: each batch runs through the same compiled
    forward pass on its own (y is not run at all when it is x), whereas rows
    of one concatenated batch may differ in the last bit on XLA:CPU.
    """
    model, _, _ = _resolve(network, variables)
    names = _check_layers(model, layers or default_perceptual_layers(model))
    weights = tuple(weights) if weights is not None else (1.0,) * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} layers {names}.")
    if jnp.shape(x) != jnp.shape(y):
        raise ValueError(f"x and y must have the same shape; got {jnp.shape(x)}, {jnp.shape(y)}.")
    fx = features(network, variables, x, names)
    fy = fx if y is x else features(network, variables, y, names)
    total = jnp.zeros((), jnp.float32)
    for name, w in zip(names, weights, strict=True):
        diff = fx[name].astype(jnp.float32) - fy[name].astype(jnp.float32)
        total = total + w * jnp.mean(jnp.square(diff))
    return total


def resize_smallest_side(image: Array | np.ndarray, size: int) -> Array:
    """Isotropic bilinear (antialiased) rescale of one HxWxC image to smallest side `size`."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    shape = (max(size, round(h * scale)), max(size, round(w * scale)), image.shape[2])
    return jax.image.resize(jnp.asarray(image, jnp.float32), shape, "bilinear", antialias=True)


def image_descriptor(
    network: ModelBundle | models.VGG | str,
    variables: Mapping[str, Any] | None,
    images: Array | np.ndarray | Sequence[Array | np.ndarray],
    scales: Sequence[int] = DESCRIPTOR_SCALES,
    flip: bool = True,
    combine: str = "mean",
    layer: str = "fc7",
    batch_size: int = 256,
) -> Array:
    """The paper's Appendix B descriptor: (N, D), unit L2 norm per row.

    Each image (HxWxC, any size; a list may mix sizes) is rescaled to smallest
    side Q for every Q in `scales`; the penultimate layer (`fc7`, 4096-D at
    full width) is computed densely over the whole image and averaged over
    positions and over the image and its horizontal flip; the scales are then
    averaged (`combine='mean'`, D = 4096) or concatenated ('stack', D = 4096 *
    len(scales)); finally L2-normalised.

    A 4-D array (N, H, W, C) of same-sized images runs `batch_size` images per
    network call (the same numbers as one at a time, much faster); a list runs
    image by image.
    """
    if combine not in ("mean", "stack"):
        raise ValueError(f"combine must be 'mean' or 'stack', got {combine!r}.")
    network = _as_network(network)  # resolved once, not once per batch
    model, variables, _ = _resolve(network, variables)
    too_small = [q for q in scales if q < model.image_size]
    if too_small:
        raise ValueError(
            f"scales {too_small} are below the model's image_size {model.image_size}: dense "
            "evaluation needs inputs at least that large."
        )
    if isinstance(images, (np.ndarray, jax.Array)) and jnp.ndim(images) == 3:
        images = [images]
    if isinstance(images, (np.ndarray, jax.Array)) and jnp.ndim(images) == 4:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        groups = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    else:
        groups = [jnp.asarray(image)[None] for image in images]
    rows = [_descriptor_rows(network, variables, g, scales, flip, combine, layer) for g in groups]
    desc = jnp.concatenate(rows)
    norm = jnp.linalg.norm(desc, axis=-1, keepdims=True)
    return desc / jnp.maximum(norm, 1e-12)


def _descriptor_rows(
    network: ModelBundle | models.VGG | str,
    variables: Mapping[str, Any] | None,
    batch: Array | np.ndarray,
    scales: Sequence[int],
    flip: bool,
    combine: str,
    layer: str,
) -> Array:
    """Unnormalised descriptors (n, D) of n same-sized images (n, H, W, C)."""
    n = batch.shape[0]
    per_scale = []
    for q in scales:
        x = jax.vmap(lambda image, q=q: resize_smallest_side(image, q))(jnp.asarray(batch))
        x = jnp.concatenate([x, x[:, :, ::-1]]) if flip else x
        maps = features(network, variables, x, (layer,))[layer]
        pooled = jnp.mean(maps, axis=(1, 2))  # over positions
        pooled = (pooled[:n] + pooled[n:]) / 2 if flip else pooled  # over the flip pair
        per_scale.append(pooled)
    if combine == "mean":
        return jnp.mean(jnp.stack(per_scale), 0)
    return jnp.concatenate(per_scale, -1)


# ---------------------------------------------------------------------------
# The command: python -m vgg_jax.features IMAGE... --weights W --output F.npz


def main(argv: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Writes the activations (or the paper's descriptor) of image files to an .npz file."""
    from vgg_jax import cli, image_io, pretrained, reference_preprocessing, transfer

    p = cli.ArgumentParser(
        prog="python -m vgg_jax.features",
        description="Activations of named layers, or the paper's Appendix B descriptor, of "
        "image files, saved as arrays in an .npz file (np.load reads it).",
    )
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--weights", required=True, help="weights name, bundle or training workdir")
    p.add_argument("--which", default="best", choices=("best", "latest"))
    p.add_argument(
        "--layers",
        default="",
        help="comma-separated layer names, e.g. relu3_3,pool5,fc7 (default: fc7, or pool5 for "
        "a features-only bundle), on the single central crop predict uses",
    )
    p.add_argument(
        "--descriptor",
        action="store_true",
        help="the paper's descriptor instead: fc7 averaged over positions, flips and the "
        "scales Q = 256, 384, 512 (scaled to the network), unit L2 norm",
    )
    p.add_argument(
        "--output", type=cli.output_file("features.npz"), default="features.npz",
        help="the .npz file to write (default: features.npz here)",
    )  # fmt: skip
    args = p.parse_args(argv)
    bundle = pretrained.resolve(args.weights, args.which)
    channels = input_channels(bundle.variables)  # 1 for a greyscale network
    images = [image_io.open_image(path, channels) for path in args.images]
    if args.descriptor:
        pixels = [image_io.pixels(im) for im in images]
        scales = transfer.default_scales(bundle.image_size)
        arrays = {"descriptor": image_descriptor(bundle, None, pixels, scales)}
    else:
        top = (bundle.metadata or {}).get("features_only")
        layers = [n for n in args.layers.split(",") if n.strip()] or ["pool5" if top else "fc7"]
        crops = np.stack([reference_preprocessing.reference_crop(im, bundle) for im in images])
        arrays = dict(features(bundle, None, crops, layers))
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    _write_npz(args.output, images=np.array(args.images), **arrays)
    shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in arrays.items())
    count = f"{len(images)} image" + ("s" if len(images) > 1 else "")
    print(f"wrote {args.output}: {shapes} for {count} (rows in the order given)")
    return arrays


def _write_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez to a local path or a URL, atomically (readers never see half a file)."""
    import io

    from vgg_jax import fileio

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fileio.write_bytes_atomic(path, buffer.getvalue())


if __name__ == "__main__":
    from vgg_jax import cli

    cli.run(main)
