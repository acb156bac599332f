"""Pretrained VGG weights from torchvision and Keras files, and back to torchvision.

    python -m vgg_jax.convert vgg16-397923af.pth --to weights/vgg16_torchvision
    python -m vgg_jax.convert vgg16_weights_tf_dim_ordering_tf_kernels.h5 --to weights/vgg16_keras
    python -m vgg_jax.convert https://download.pytorch.org/models/vgg16-397923af.pth \
        --sha256 397923af --to weights/vgg16     # downloaded once into the cache, verified
    python -m vgg_jax.convert weights/vgg16_torchvision --export-torchvision vgg16.safetensors
    python -m vgg_jax.convert weights/vgg16_torchvision --to weights/vgg16_grey64 \
        --in-channels 1 --image-size 64      # for fine-tuning on greyscale 64x64 images
    python -m vgg_jax.convert runs/my_run --to weights/my_run   # a training run's best model

The result is a model bundle (`vgg_jax.checkpoints`): the variables plus the
source framework's input preprocessing, so that `predict`, `evaluate`,
`score_map`, `features` and fine-tuning (`config.init_from`) reproduce the
source's outputs.

Layouts (DESIGN.md, "Numerical facts for weight conversion"):

* torchvision: `features.{i}.weight` (out, in, kh, kw) at the indices of its
  layer list (conv, [BN,] ReLU per conv, a max-pool per stage); BN
  `weight/bias/running_mean/running_var/num_batches_tracked`;
  `classifier.{0,3,6}` (out, in). FC1's input is flattened channel-major
  (c, h, w) after an adaptive average pool to 7x7.
* Keras applications: layers `block{b}_conv{i}`, `fc1`, `fc2`, `predictions`
  with kernels already (h, w, in, out) and FC1 flattened channels-last (h, w, c);
  read by `vgg_jax.convert_keras`, which `convert_file` calls for Keras files.

This module holds the torchvision half (both directions), the file readers and
writers, `adapt_bundle` and the command line; `vgg_jax.convert_common` the
error type and the checked bundle both halves build.

No pickle is ever run: the globals a `.pth` file's pickle would import are read
from its opcodes first (`vgg_jax.file_formats`) and anything but torch's tensor
rebuilders is refused as code; then `torch.load(weights_only=True)`.
`.safetensors` and HDF5 (also inside `.keras` zips) go through their own array
readers. Weights by name (download, cache) are `vgg_jax.pretrained`.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_jax import checkpoints, cli, download, file_formats, fileio, models
from vgg_jax.checkpoints import ModelBundle, Preprocessing
from vgg_jax.convert_common import (
    FORMATS,
    ConversionError,
    check_shapes,
    make_bundle,
    tree_map,
)
from vgg_jax.convert_keras import from_keras_layers, read_keras_file

TORCHVISION_PREPROCESSING = Preprocessing(
    channel_order="RGB",
    value_range=1.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
# Greyscale networks (`adapt_bundle(in_channels=1)`, the Fashion-MNIST configs) take pixels in
# [0, 1] as they are; a torchvision file of one holds no preprocessing, so it gets this one.
GREYSCALE_PREPROCESSING = Preprocessing("RGB", 1.0, (0.0,), (1.0,))
TORCHVISION_MODELS = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn")
TORCHVISION_MODELS += ("vgg19_bn",)
TORCHVISION_POOL = 7  # torchvision's AdaptiveAvgPool2d((7, 7)) before FC1

_KIND_FORMAT = {
    "hdf5": "keras",
    "keras_zip": "keras",
    "torch_zip": "torchvision",
    "torch_legacy": "torchvision",
    "safetensors": "torchvision",
}


# ---------------------------------------------------------------------------
# torchvision layout


def torchvision_layout(spec: models.VGGSpec) -> list[tuple[str, int, int | None]]:
    """(conv name, index of its conv in `features`, index of its BN or None) in order."""
    layout, index = [], 0
    for name_stage, kernels in enumerate(spec.stages):
        for i in range(len(kernels)):
            bn = index + 1 if spec.batch_norm else None
            layout.append((f"conv{name_stage + 1}_{i + 1}", index, bn))
            index += 3 if spec.batch_norm else 2  # conv, [BN,] ReLU
        index += 1  # max-pool
    return layout


def _torchvision_conv_indices(state: Mapping[str, np.ndarray]) -> tuple[list[int], bool]:
    convs, has_bn = [], False
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(weight|running_mean)", key)
        if m and m.group(2) == "weight" and np.ndim(value) == 4:
            convs.append(int(m.group(1)))
        elif m and m.group(2) == "running_mean":
            has_bn = True
    return sorted(convs), has_bn


def detect_torchvision_model(state: Mapping[str, np.ndarray]) -> str:
    """The torchvision model name whose layer list matches the state dict's keys."""
    convs, has_bn = _torchvision_conv_indices(state)
    for name in TORCHVISION_MODELS:
        spec = models.get_spec(name)
        if spec.batch_norm == has_bn and [c for _, c, _ in torchvision_layout(spec)] == convs:
            return name
    if not convs:
        raise ConversionError(
            "No `features.{i}.weight` convolution kernels found: this is not a torchvision VGG "
            f"state dict (first keys: {list(state)[:5]})."
        )
    raise ConversionError(
        f"The state dict has {len(convs)} convolutions at features indices {convs}"
        f"{' with' if has_bn else ' without'} batch norm, which matches no torchvision VGG "
        f"({', '.join(TORCHVISION_MODELS)})."
    )


def _adaptive_pool_matrix(size: int, out: int = TORCHVISION_POOL) -> np.ndarray:
    """(out, size) matrix of torch's AdaptiveAvgPool1d: row i averages its bin of the input."""
    p = np.zeros((out, size), np.float64)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        p[i, start:end] = 1.0 / (end - start)
    return p


def fold_adaptive_pool(kernel: np.ndarray, window: int) -> np.ndarray:
    """A (7, 7, C, F) FC1 kernel as the (window, window, C, F) kernel of the same function.

    torchvision average-pools any feature map to 7x7 before FC1; FC1 after that
    linear pool is itself one linear map of the window x window map, so a model
    built for another image_size reproduces torchvision exactly at that size.
    """
    p = _adaptive_pool_matrix(window, kernel.shape[0]).astype(np.float32)  # (7, window)
    rows = np.tensordot(p, kernel, axes=([0], [0]))  # (window, 7, C, F)
    folded = np.tensordot(p, rows, axes=([0], [1]))  # (window_w, window_h, C, F)
    return folded.transpose(1, 0, 2, 3).astype(kernel.dtype)


def from_torchvision(
    state: Mapping[str, Any],
    model: str | None = None,
    image_size: int | None = None,
    source: str = "the state dict",
) -> ModelBundle:
    """A bundle from a torchvision VGG state dict (arrays or tensors).

    `model` ('vgg16', 'vgg16_bn', ...) is checked against the keys; None detects
    it. `image_size` defaults to the file's own (224 for torchvision's 7x7 FC1);
    another size folds torchvision's 7x7 adaptive pool into FC1
    (`fold_adaptive_pool`), so the model equals torchvision at that size.
    """
    state = {k: _to_numpy(v) for k, v in state.items()}
    detected = detect_torchvision_model(state)
    if model is not None and models.get_spec(model).name != detected:
        want = models.get_spec(model)
        raise ConversionError(
            f"{source} holds a {detected} ({_describe(models.get_spec(detected))}), not a "
            f"{want.name} ({_describe(want)}). Pass --model {detected} or the file for "
            f"{want.name}."
        )
    spec = models.get_spec(detected)
    missing = [k for k in _torchvision_required_keys(spec) if k not in state]
    if missing:
        raise ConversionError(
            f"{source} is missing {len(missing)} of the {spec.name} keys, for example "
            f"{missing[:4]}. The file is incomplete or not a torchvision {spec.name} state dict."
        )
    check_shapes(_torchvision_shapes(state, spec), state, f"{source} ({spec.name})")
    features, stats = _torchvision_features(state, spec)
    channels = features[torchvision_layout(spec)[-1][0]]["kernel"].shape[-1]
    fc6, image_size = _torchvision_fc6(state["classifier.0.weight"], channels, image_size, source)
    params = {
        "features": features,
        "fc6": {"kernel": fc6, "bias": state["classifier.0.bias"]},
        "fc7": {"kernel": state["classifier.3.weight"].T, "bias": state["classifier.3.bias"]},
        "fc8": {"kernel": state["classifier.6.weight"].T, "bias": state["classifier.6.bias"]},
    }
    variables = {"params": params}
    if spec.batch_norm:
        variables["batch_stats"] = {"features": stats}
    metadata = {"source_format": "torchvision", "source": source}
    preprocessing = _torchvision_preprocessing(state["features.0.weight"].shape[1])
    return make_bundle(spec.name, variables, image_size, preprocessing, metadata, source)


def _torchvision_preprocessing(in_channels: int) -> Preprocessing:
    """torchvision's for RGB input; a network of other input (exported from vgg_jax, e.g.
    trained on Fashion-MNIST) gets the greyscale identity, which its file cannot say."""
    return TORCHVISION_PREPROCESSING if in_channels == 3 else GREYSCALE_PREPROCESSING


def _torchvision_shapes(state: Mapping[str, np.ndarray], spec: models.VGGSpec) -> dict:
    """{file key: the shape a torchvision state dict of this spec needs}, widths read off the file.

    The widths and input channels come from the first conv (width_divisor; 1 for a
    greyscale network exported from vgg_jax) and the classifier (fc width, classes), so
    a width-reduced or greyscale file is checked against its own model.
    """
    first = state["features.0.weight"].shape  # (out, in, kh, kw)
    widths = [w // max(1, models.STAGE_WIDTHS[0] // first[0]) for w in models.STAGE_WIDTHS]
    shapes, cin = {}, first[1]
    layout = iter(torchvision_layout(spec))
    for stage, kernels in enumerate(spec.stages):
        for k in kernels:
            _, conv, bn = next(layout)
            width = widths[stage]
            shapes[f"features.{conv}.weight"] = (width, cin, k, k)
            shapes[f"features.{conv}.bias"] = (width,)
            for leaf in ("weight", "bias", "running_mean", "running_var") if bn is not None else ():
                shapes[f"features.{bn}.{leaf}"] = (width,)
            cin = width
    fc_in = state["classifier.0.weight"].shape[1]
    window = math.isqrt(fc_in // cin)
    window = window if window * window * cin == fc_in else TORCHVISION_POOL
    fc, classes = state["classifier.3.weight"].shape[0], state["classifier.6.weight"].shape[0]
    layers = ((0, (fc, cin * window * window)), (3, (fc, fc)), (6, (classes, fc)))
    for index, (n_out, n_in) in layers:
        shapes[f"classifier.{index}.weight"] = (n_out, n_in)
        shapes[f"classifier.{index}.bias"] = (n_out,)
    return shapes


def _torchvision_features(
    state: Mapping[str, np.ndarray], spec: models.VGGSpec
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(conv and BN params, BN running statistics) of the `features` stages."""
    params, stats = {}, {}
    for name, conv, bn in torchvision_layout(spec):
        params[name] = {
            "kernel": state[f"features.{conv}.weight"].transpose(2, 3, 1, 0),  # -> h, w, in, out
            "bias": state[f"features.{conv}.bias"],
        }
        if bn is not None:
            bn_name = "bn" + name[4:]
            params[bn_name] = {
                "scale": state[f"features.{bn}.weight"],
                "bias": state[f"features.{bn}.bias"],
            }
            stats[bn_name] = {
                "mean": state[f"features.{bn}.running_mean"],
                "var": state[f"features.{bn}.running_var"],
            }
    return params, stats


def _torchvision_fc6(
    weight: np.ndarray, channels: int, image_size: int | None, source: str
) -> tuple[np.ndarray, int]:
    """(FC1 as a (k, k, C, F) window kernel, image_size) from classifier.0.weight (F, C*k*k)."""
    window = math.isqrt(weight.shape[1] // channels)
    if window * window * channels != weight.shape[1]:
        raise ConversionError(
            f"{source}: classifier.0.weight has shape {weight.shape}; its input size "
            f"{weight.shape[1]} is not k*k*{channels} (the last conv layer's channels)."
        )
    # Channel-major flatten (c, h, w) -> the (h, w, c, out) window kernel.
    kernel = weight.reshape(-1, channels, window, window).transpose(2, 3, 1, 0)
    image_size = image_size or window * 2**models.NUM_STAGES
    target = models.feature_map_size(image_size)
    if target != window:
        if window != TORCHVISION_POOL:
            raise ConversionError(
                f"{source} has a {window}x{window} FC1 window (image_size "
                f"{window * 32}); only torchvision's 7x7 can be refitted to image_size "
                f"{image_size}. Convert without --image-size."
            )
        kernel = fold_adaptive_pool(kernel, target)
    return kernel, image_size


def _describe(spec: models.VGGSpec) -> str:
    convs = len(models.conv_layer_names(spec))
    return f"{convs} conv layers, {'with' if spec.batch_norm else 'no'} batch norm"


def _torchvision_required_keys(spec: models.VGGSpec) -> list[str]:
    keys = []
    for _, conv, bn in torchvision_layout(spec):
        keys += [f"features.{conv}.weight", f"features.{conv}.bias"]
        if bn is not None:
            keys += [
                f"features.{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")
            ]
    return keys + [f"classifier.{i}.{s}" for i in (0, 3, 6) for s in ("weight", "bias")]


def to_torchvision(bundle: ModelBundle) -> dict[str, np.ndarray]:
    """The bundle's variables as a torchvision VGG state dict (numpy arrays).

    A model at image_size 224 gives exactly torchvision's keys and shapes; at
    another size FC1 keeps its k x k window (classifier.0 has k*k*512 inputs),
    which `from_torchvision` reads back but torchvision's own VGG class does not.
    """
    spec = models.get_spec(bundle.name)
    if spec.lrn:
        raise ConversionError(
            f"{spec.name} has local response normalisation, which torchvision's VGG lacks."
        )
    params = bundle.variables["params"]
    stats = bundle.variables.get("batch_stats", {})
    state: dict[str, np.ndarray] = {}
    for name, conv, bn in torchvision_layout(spec):
        layer = params["features"][name]
        state[f"features.{conv}.weight"] = _np(layer["kernel"]).transpose(3, 2, 0, 1)
        state[f"features.{conv}.bias"] = _np(layer["bias"])
        if bn is not None:
            bn_name = "bn" + name[4:]
            state[f"features.{bn}.weight"] = _np(params["features"][bn_name]["scale"])
            state[f"features.{bn}.bias"] = _np(params["features"][bn_name]["bias"])
            state[f"features.{bn}.running_mean"] = _np(stats["features"][bn_name]["mean"])
            state[f"features.{bn}.running_var"] = _np(stats["features"][bn_name]["var"])
            state[f"features.{bn}.num_batches_tracked"] = np.array(0, np.int64)
    fc6 = _np(params["fc6"]["kernel"])  # (k, k, C, F) -> (F, C*k*k) channel-major
    state["classifier.0.weight"] = fc6.transpose(3, 2, 0, 1).reshape(fc6.shape[-1], -1)
    state["classifier.0.bias"] = _np(params["fc6"]["bias"])
    for layer, index in (("fc7", 3), ("fc8", 6)):
        state[f"classifier.{index}.weight"] = _np(params[layer]["kernel"]).T
        state[f"classifier.{index}.bias"] = _np(params[layer]["bias"])
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


# ---------------------------------------------------------------------------
# Files


def sniff_format(path: str) -> str:
    """'keras' (HDF5, .keras zip) or 'torchvision' (safetensors, PyTorch); errors otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such weights file: {path}")
    kind = file_formats.describe(path)
    if kind not in _KIND_FORMAT:
        raise ConversionError(
            f"{path} is not a weights file vgg_jax reads (not HDF5, not a .keras archive, not "
            "safetensors and not a PyTorch checkpoint). Formats read: "
            f"{'; '.join(file_formats.READ_FORMATS)}."
        )
    return _KIND_FORMAT[kind]


def read_torchvision_file(path: str) -> dict[str, np.ndarray]:
    """A state dict from `.safetensors` (no torch needed) or a `.pth` (weights_only load)."""
    if file_formats.describe(path) == "safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own error type
            raise ConversionError(f"{path} is a damaged or truncated safetensors file: {e}") from e
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"Reading {path} (a PyTorch checkpoint) needs torch: `pip install vgg-jax[torch]`, "
            "or convert it to .safetensors elsewhere."
        ) from e
    code = file_formats.code_globals(path)
    if code:
        raise ConversionError(
            f"{path} holds code, not only tensors (`{code[0]}`): refused. A weights file needs "
            "no code; get the plain state dict (or a .safetensors file) from its publisher."
        )
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        # torch's own message advises loading unsafely; it is not relayed.
        what = "holds objects other than tensors" if "weights_only" in str(e) else "is truncated"
        raise ConversionError(
            f"{path} could not be read as a PyTorch weights file: it {what} or is damaged "
            f"({type(e).__name__}). Get the plain state dict (or a .safetensors file) again."
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return {str(k): _to_numpy(v) for k, v in obj.items()}


def write_torchvision_file(state: Mapping[str, np.ndarray], path: str) -> str:
    """Writes a state dict as `.safetensors` (always) or `.pth` (needs torch)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(dict(state), path, metadata={"format": "pt"})
    elif path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(
                "Writing .pth needs torch (`pip install vgg-jax[torch]`); write .safetensors, "
                "which torch reads with safetensors.torch.load_file."
            ) from e
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)
    else:
        raise ConversionError(f"Export path {path} must end in .safetensors or .pth.")
    return path


def convert_file(
    path: str,
    fmt: str | None = None,
    model: str | None = None,
    image_size: int | None = None,
    features_only: bool = False,
) -> ModelBundle:
    """A bundle from a torchvision (.pth/.safetensors) or Keras (.h5/.weights.h5/.keras) file.

    features_only: a Keras file without its classifier converts too (`from_keras_layers`).
    """
    detected = sniff_format(path)
    fmt = fmt or detected
    if fmt not in FORMATS:
        raise ConversionError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")
    if fmt != detected:
        looks = file_formats.KINDS[file_formats.describe(path)]
        raise ConversionError(
            f"{path} is {looks}, not a {fmt} file; drop --format or give the right file."
        )
    if fmt == "torchvision":
        return from_torchvision(read_torchvision_file(path), model, image_size, path)
    bundle = from_keras_layers(read_keras_file(path, features_only), model, path, features_only)
    return adapt_bundle(bundle, image_size=image_size) if image_size else bundle


# ---------------------------------------------------------------------------
# Adapting converted weights for fine-tuning on other inputs


def adapt_bundle(
    bundle: ModelBundle, in_channels: int | None = None, image_size: int | None = None
) -> ModelBundle:
    """The bundle for greyscale input and/or another training resolution.

    in_channels=1: grey pixels g in [0, 1] stand for the RGB image (g, g, g);
    the preprocessing (value range, per-channel mean and std) is folded into
    conv1_1, whose kernel becomes sum_c W_c * range / std_c and whose bias
    absorbs the means, so the new bundle's preprocessing is the identity on
    [0, 1] (Fashion-MNIST's config: value_range 1, mean (0,), std (1,)). The
    result equals the RGB network on (g, g, g) except in conv1_1's one-pixel
    border, where the zero padding now means black instead of the mean colour.

    image_size: FC1's 7x7 window is refitted to the new last feature map with
    torchvision's adaptive average pool folded in (`fold_adaptive_pool`):
    exactly torchvision's behaviour at that size.
    """
    variables = tree_map(np.asarray, bundle.variables)
    params = variables["params"]
    preprocessing, options = bundle.preprocessing, dict(bundle.options)
    metadata = dict(bundle.metadata)
    if in_channels is not None:
        if in_channels != 1:
            raise ConversionError(f"in_channels must be 1 (greyscale), got {in_channels}.")
        conv = params["features"]["conv1_1"]
        kernel = conv["kernel"].astype(np.float64)  # (k, k, C, out)
        if kernel.shape[2] != 3:
            raise ConversionError(
                f"conv1_1 has {kernel.shape[2]} input channels, not RGB's 3: --in-channels 1 "
                "adapts RGB weights, and these are greyscale already; leave it out."
            )
        std = np.asarray(preprocessing.std, np.float64)
        mean = np.asarray(preprocessing.mean, np.float64)
        scaled = kernel / std[None, None, :, None]
        conv["kernel"] = (scaled.sum(2, keepdims=True) * preprocessing.value_range).astype(
            np.float32
        )
        conv["bias"] = (conv["bias"] - np.einsum("hwco,c->o", scaled, mean)).astype(np.float32)
        preprocessing = GREYSCALE_PREPROCESSING
        metadata["adapted_in_channels"] = 1
    if image_size is not None and image_size != bundle.image_size:
        window = models.feature_map_size(image_size)
        if window < 1:
            raise ConversionError(f"image_size {image_size} is below VGG's minimum of 32.")
        params["fc6"]["kernel"] = fold_adaptive_pool(params["fc6"]["kernel"], window)
        options["image_size"] = int(image_size)
        metadata["adapted_image_size"] = int(image_size)
        if metadata.get("eval_scale"):  # a run's view (predict): the same field at the new size
            metadata["eval_scale"] = round(metadata["eval_scale"] * image_size / bundle.image_size)
    source = metadata.get("source", bundle.name)
    return make_bundle(
        bundle.name, variables, options["image_size"], preprocessing, metadata, source, options
    )


# ---------------------------------------------------------------------------
# Helpers


def _np(x: Any) -> np.ndarray:
    return np.asarray(x)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_weights_name(src: str) -> bool:
    from vgg_jax import pretrained

    return not os.path.exists(src) and src in pretrained.REGISTRY


def _is_network(src: str) -> bool:
    """A bundle, a training run or a weights name (`pretrained.resolve`), not a weights file.

    Any directory counts: resolve says what a directory that is neither lacks.
    """
    return checkpoints.is_bundle(src) or fileio.isdir(src) or _is_weights_name(src)


def fetch_source(src: str, sha256: str | None) -> str:
    """`src` itself, or for an http(s):// URL its verified copy in the download cache."""
    if not src.startswith(("http://", "https://")):
        return src
    if not sha256:
        raise ConversionError(
            f"Downloading {src} needs its checksum: add --sha256 HEX (the publisher's SHA-256, "
            "or the prefix in a torchvision file name)."
        )
    return download.fetch(src, f"sha256:{sha256.removeprefix('sha256:')}")


def check_output_dir(path: str) -> None:
    """--to may be new, empty or a bundle (replaced); never a directory of other files.

    A bundle written into a training run would hide the run from every command that
    reads the directory (a bundle's file is looked for first).
    """
    if os.path.isdir(path) and os.listdir(path) and not checkpoints.is_bundle(path):
        raise ValueError(
            f"--to {path} holds other files and is not a vgg_jax bundle (a training run?); "
            "give a new or empty directory."
        )


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m vgg_jax.convert",
        description="Convert torchvision/Keras VGG weights to a vgg_jax bundle, or export one.",
    )
    parser.add_argument(
        "src",
        help="weights file (.pth, .safetensors, .h5, .weights.h5, .keras), an http(s):// URL "
        "of one (with --sha256), a bundle or run directory, or a weights name (vgg16, ...)",
    )
    parser.add_argument(
        "--sha256",
        metavar="HEX",
        help="the URL's SHA-256 (all 64 digits, or a published prefix): checked before the "
        "file is read; the verified download is cached (vgg_jax.download.cache_dir())",
    )
    parser.add_argument("--to", help="output bundle directory")
    parser.add_argument(
        "--which",
        default="best",
        choices=("best", "latest"),
        help="for a run directory: which state (default: its best evaluation)",
    )
    parser.add_argument("--format", choices=FORMATS, help="source format (default: detected)")
    parser.add_argument("--model", help="expected model, e.g. vgg16 (default: detected)")
    parser.add_argument(
        "--image-size",
        type=cli.integer(32),
        help="torchvision only: build for this input size, folding the 7x7 adaptive pool "
        "into FC1 (default 224)",
    )
    parser.add_argument(
        "--features-only",
        action="store_true",
        help="Keras only: convert a file saved with include_top=False (its conv layers, with a "
        "placeholder head; for vgg_jax.features, not predict)",
    )
    parser.add_argument(
        "--in-channels",
        type=int,
        choices=(1,),
        help="1: fold the preprocessing into conv1_1 for greyscale input in [0, 1] (fine-tuning "
        "on greyscale data such as Fashion-MNIST)",
    )
    parser.add_argument(
        "--export-torchvision",
        metavar="OUT",
        help="export the bundle or run SRC to a torchvision state dict (.safetensors or .pth)",
    )
    args = parser.parse_args(argv)
    try:
        if args.export_torchvision:
            from vgg_jax import pretrained  # it imports this module

            bundle = pretrained.resolve(args.src, args.which)
            write_torchvision_file(to_torchvision(bundle), args.export_torchvision)
            print(f"Wrote {bundle.name} as a torchvision state dict to {args.export_torchvision}")
            return 0
        if not args.to:
            parser.error("give --to OUT_BUNDLE (or --export-torchvision OUT)")
        check_output_dir(args.to)
        src = fetch_source(args.src, args.sha256)
        if _is_network(src):
            from vgg_jax import pretrained  # it imports this module

            # A run keeps its class names and dataset settings (pretrained.load_run).
            bundle = pretrained.resolve(src, args.which)
            bundle = adapt_bundle(bundle, args.in_channels, args.image_size)
        else:
            bundle = convert_file(src, args.format, args.model, args.image_size, args.features_only)
            if args.in_channels:
                bundle = adapt_bundle(bundle, args.in_channels)
        checkpoints.save_bundle(args.to, bundle)
    except (ValueError, OSError) as e:  # ConversionError is a ValueError, DownloadError an OSError
        print(f"Error: {e}", file=sys.stderr)  # as every command words a failure
        return 1
    p = bundle.preprocessing
    kind = "run" if "workdir" in bundle.metadata else "bundle"
    print(
        f"Converted {bundle.name} ({bundle.metadata.get('source_format', kind)}, image_size "
        f"{bundle.image_size}, {bundle.num_classes} classes) to {args.to}; preprocessing "
        f"{p.channel_order}, x*{p.value_range:g} - {p.mean}, / {p.std}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
