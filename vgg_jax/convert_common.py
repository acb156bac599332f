"""What both weight converters share: their error, the formats, checked bundles.

`vgg_jax.convert` (torchvision, the command line) and `vgg_jax.convert_keras`
turn a framework's arrays into vgg_jax parameters; `make_bundle` then infers
the model's options from the shapes, checks every variable against that
model and wraps them in a `ModelBundle` (ImageNet class names included for
1000-class weights). A file that is not what it claims to be is a
`ConversionError` whose message says what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_jax import checkpoints, imagenet_classes, models
from vgg_jax.checkpoints import ModelBundle, Preprocessing

FORMATS = ("torchvision", "keras")


class ConversionError(ValueError):
    """A weights file that is not what it claims to be; the message says what is wrong."""


def check_shapes(expected: Mapping[str, tuple], arrays: Mapping[str, Any], source: str) -> None:
    """Names wrong shapes by the file's own keys, with the shapes the model needs."""
    wrong = [
        f"{key} has shape {tuple(np.shape(arrays[key]))}, expected {tuple(want)}"
        for key, want in expected.items()
        if key in arrays and tuple(np.shape(arrays[key])) != tuple(want)
    ]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ConversionError(f"{source}: {'; '.join(wrong[:3])}{more}.")


def make_bundle(
    name: str,
    variables: dict[str, Any],
    image_size: int,
    preprocessing: Preprocessing,
    metadata: dict[str, Any],
    source: str,
    base_options: Mapping[str, Any] | None = None,
) -> ModelBundle:
    """Checks the variables against the model their shapes describe and wraps them."""
    params = variables["params"]
    conv1 = params["features"]["conv1_1"]["kernel"]
    width_divisor = models.STAGE_WIDTHS[0] // conv1.shape[-1]
    options = dict(base_options or {})
    options |= {
        "num_classes": int(params["fc8"]["kernel"].shape[-1]),
        "width_divisor": int(width_divisor),
        "fc_width": int(params["fc7"]["kernel"].shape[-1]),
        "image_size": int(image_size),
    }
    variables = {
        k: tree_map(lambda a: np.ascontiguousarray(a, dtype=np.float32), v)
        for k, v in variables.items()
    }
    if (
        options["num_classes"] == len(imagenet_classes.CLASSES)
        and metadata.get("source_format") in FORMATS
    ):
        # ImageNet weights: name the classes for every tool that reads the bundle.
        metadata = dict(metadata)
        metadata.setdefault("class_names", [imagenet_classes.class_name(i) for i in range(1000)])
    bundle = ModelBundle(name, options, variables, preprocessing, metadata)
    try:
        checkpoints.check_variables(bundle.model, variables, channels=None, source=source)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    return bundle


def tree_map(fn: Any, tree: Any) -> Any:
    """`fn` applied to every leaf of a nested mapping."""
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)
