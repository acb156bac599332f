"""Keras VGG16/VGG19 weights (keras.applications) as vgg_jax bundles.

    python -m vgg_jax.convert vgg16_weights_tf_dim_ordering_tf_kernels.h5 --to weights/vgg16_keras

`read_keras_file(path)` reads the conv then dense layers of any of Keras's
three files: the legacy HDF5 layout that keras.applications downloads
(layers `block{b}_conv{i}`, `fc1`, `fc2`, `predictions`, Keras 2's
'kernel:0' names, also under 'model_weights' of a whole-model .h5), Keras 3's
`.weights.h5` (groups named by layer type and creation order) and the
`.keras` zip that holds one. `from_keras_layers` makes the bundle: kernels are
already (h, w, in, out) and FC1 is flattened channels-last (h, w, c), so it
reshapes straight to the 7x7 window kernel; the preprocessing is Caffe's
(`KERAS_PREPROCESSING`: BGR, 0-255, mean subtracted). A file saved with
include_top=False converts with features_only=True (a placeholder head, for
`vgg_jax.features`). `vgg_jax.convert` is the command line.
"""

from __future__ import annotations

import math
import re
import zipfile
from typing import Any

import numpy as np

from vgg_jax import file_formats, models
from vgg_jax.checkpoints import ModelBundle, Preprocessing
from vgg_jax.convert_common import ConversionError, check_shapes, make_bundle

# Caffe convention: BGR, 0-255, minus the mean given here in the network's (BGR) order.
KERAS_PREPROCESSING = Preprocessing(
    channel_order="BGR",
    value_range=255.0,
    mean=(103.939, 116.779, 123.68),
    std=(1.0, 1.0, 1.0),
)


def _keras_layers_legacy(group: Any) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {'kernel', 'bias'}} from the legacy (Keras 2 / keras.applications) layout."""
    layers = {}
    for name in _attr_names(group, "layer_names") or list(group):
        layer = group[name]
        weight_names = _attr_names(layer, "weight_names")
        if not weight_names:
            continue
        arrays = {}
        for w in weight_names:
            short = w.split("/")[-1].split(":")[0]  # 'block1_conv1/kernel:0' -> 'kernel'
            arrays[short] = np.asarray(layer[w])
        layers[name] = arrays
    return layers


def _keras_layers_v3(group: Any) -> list[tuple[str, dict[str, np.ndarray]]]:
    """[(kind, {'kernel', 'bias'})] in network order from a Keras 3 `.weights.h5`.

    Keras 3 names layer groups by type and creation order ('conv2d', 'conv2d_1',
    ..., 'dense'), not by the layer's name; the numeric suffix gives the order.
    """

    def order(name: str) -> int:
        m = re.search(r"_(\d+)$", name)
        return int(m.group(1)) if m else 0

    found = []
    for name in group:
        node = group[name]
        if "vars" not in node or len(node["vars"]) == 0:
            continue
        arrays = [np.asarray(node["vars"][str(i)]) for i in range(len(node["vars"]))]
        kind = "conv" if arrays[0].ndim == 4 else "dense" if arrays[0].ndim == 2 else None
        if kind is None or len(arrays) != 2:
            continue
        found.append((kind, order(name), {"kernel": arrays[0], "bias": arrays[1]}))
    found.sort(key=lambda t: (t[0] != "conv", t[1]))
    return [(kind, arrays) for kind, _, arrays in found]


def _attr_names(node: Any, attr: str) -> list[str]:
    values = node.attrs.get(attr)
    if values is None:
        return []
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_keras_file(
    path: str, features_only: bool = False
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """[(layer name or kind, {'kernel', 'bias'})] of the conv then dense layers, in order.

    features_only: a file without the classifier (include_top=False) gives its convs.
    """
    import h5py

    try:
        is_zip = file_formats.describe(path) == "keras_zip"
        f = h5py.File(file_formats.keras_weights_bytes(path) if is_zip else path, "r")
    except (OSError, zipfile.BadZipFile) as e:
        raise ConversionError(
            f"{path} could not be opened as an HDF5 Keras weights file ({e}). It is truncated "
            "or not a Keras file; download or save it again."
        ) from e
    try:
        with f:
            root = f["model_weights"] if "model_weights" in f else f  # a full-model .h5
            if "layers" in root and "layer_names" not in root.attrs:
                return _keras_layers_v3(root["layers"])
            legacy = _keras_layers_legacy(root)
    except (OSError, KeyError, ValueError) as e:
        raise ConversionError(f"{path}: damaged or truncated HDF5 data ({e}).") from e
    convs = sorted(
        (n for n in legacy if re.fullmatch(r"block\d+_conv\d+", n)),
        key=lambda n: tuple(int(v) for v in re.findall(r"\d+", n)),
    )
    missing = [n for n in ("fc1", "fc2", "predictions") if n not in legacy]
    if features_only and convs and len(missing) == 3:
        return [(n, legacy[n]) for n in convs]
    if missing:
        hint = (
            " It was saved with include_top=False: convert it with --features-only (its conv "
            "layers, for vgg_jax.features), or get the file with the classifier."
            if convs and len(missing) == 3
            else ""
        )
        raise ConversionError(f"{path} has no layers {missing}.{hint}")
    return [(n, legacy[n]) for n in convs] + [(n, legacy[n]) for n in ("fc1", "fc2", "predictions")]


def from_keras_layers(
    layers: list[tuple[str, dict[str, np.ndarray]]],
    model: str | None = None,
    source: str = "the Keras file",
    features_only: bool = False,
) -> ModelBundle:
    """A bundle from Keras VGG16/VGG19 layers (conv layers in order, then fc1, fc2, predictions).

    features_only with no dense layers (include_top=False): a one-unit placeholder
    head, marked `metadata["features_only"]`, for `vgg_jax.features`.
    """
    convs = [arrays for name, arrays in layers if arrays["kernel"].ndim == 4]
    dense = [arrays for name, arrays in layers if arrays["kernel"].ndim == 2]
    if features_only and not dense:
        channels = convs[-1]["kernel"].shape[-1]
        dense = [_zero_dense(models.feature_map_size(224) ** 2 * channels, 1), _zero_dense(1, 1)]
        dense.append(_zero_dense(1, 1))
        names = ("fc1", "fc2", "predictions")
        layers = list(layers) + list(zip(names, dense, strict=True))
    if len(dense) != 3:
        raise ConversionError(
            f"{source} has {len(dense)} dense layers; a Keras VGG with its classifier has 3 "
            "(fc1, fc2, predictions). Was it saved with include_top=False?"
        )
    matches = [
        n
        for n in ("vgg11", "vgg13", "vgg16", "vgg19")
        if len(models.conv_layer_names(models.get_spec(n))) == len(convs)
    ]
    if not matches:
        raise ConversionError(f"{source} has {len(convs)} conv layers: no VGG has that many.")
    detected = matches[0]
    if model is not None and models.get_spec(model).name != detected:
        want = models.get_spec(model)
        raise ConversionError(
            f"{source} holds a {detected} ({len(convs)} conv layers), not a {want.name} "
            f"({len(models.conv_layer_names(want))} conv layers). Pass --model {detected}."
        )
    check_shapes(*_keras_shapes(layers, models.get_spec(detected)), f"{source} ({detected})")
    params: dict[str, Any] = {"features": {}}
    for name, arrays in zip(models.conv_layer_names(models.get_spec(detected)), convs, strict=True):
        params["features"][name] = {"kernel": arrays["kernel"], "bias": arrays["bias"]}
    fc1 = dense[0]["kernel"]
    channels = convs[-1]["kernel"].shape[-1]
    window = math.isqrt(fc1.shape[0] // channels)
    # Channels-last flatten (h, w, c): reshapes straight to the window kernel.
    params["fc6"] = {
        "kernel": fc1.reshape(window, window, channels, -1),
        "bias": dense[0]["bias"],
    }
    params["fc7"] = dict(dense[1])
    params["fc8"] = dict(dense[2])
    metadata = {"source_format": "keras", "source": source}
    if features_only and dense[2]["kernel"].shape[-1] == 1:
        metadata["features_only"] = True
    return make_bundle(
        detected, {"params": params}, window * 32, KERAS_PREPROCESSING, metadata, source
    )


def _zero_dense(n_in: int, n_out: int) -> dict[str, np.ndarray]:
    return {"kernel": np.zeros((n_in, n_out), np.float32), "bias": np.zeros(n_out, np.float32)}


def _keras_shapes(
    layers: list[tuple[str, dict[str, np.ndarray]]], spec: models.VGGSpec
) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
    """({'layer/kernel': needed shape}, {'layer/kernel': array}) under the file's layer names."""
    convs = [(n, a) for n, a in layers if a["kernel"].ndim == 4]
    dense = [(n, a) for n, a in layers if a["kernel"].ndim == 2]
    divisor = max(1, models.STAGE_WIDTHS[0] // convs[0][1]["kernel"].shape[-1])
    kernels = [
        (k, models.STAGE_WIDTHS[stage] // divisor)
        for stage, ks in enumerate(spec.stages)
        for k in ks
    ]
    shapes, arrays, cin = {}, {}, 3
    for (name, a), (k, width) in zip(convs, kernels, strict=True):
        shapes[f"{name}/kernel"], shapes[f"{name}/bias"] = (k, k, cin, width), (width,)
        arrays[f"{name}/kernel"], arrays[f"{name}/bias"] = a["kernel"], a["bias"]
        cin = width
    fc_in = dense[0][1]["kernel"].shape[0]
    window = math.isqrt(fc_in // cin)
    window = window if window * window * cin == fc_in else 7
    fc, classes = dense[1][1]["kernel"].shape[1], dense[2][1]["kernel"].shape[1]
    for (name, a), (n_in, n_out) in zip(
        dense, ((cin * window * window, fc), (fc, fc), (fc, classes)), strict=True
    ):
        shapes[f"{name}/kernel"], shapes[f"{name}/bias"] = (n_in, n_out), (n_out,)
        arrays[f"{name}/kernel"], arrays[f"{name}/bias"] = a["kernel"], a["bias"]
    return shapes, arrays
