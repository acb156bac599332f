"""Pretrained VGG by name, and one resolver for every place that takes a network.

    from vgg_jax import pretrained
    bundle = pretrained.load("vgg16")            # torchvision's IMAGENET1K_V1 weights
    bundle = pretrained.resolve("runs/my_run")   # a name, a bundle directory or a training run

`load(name)` downloads the publisher's file once (`vgg_jax.download`: a
progress line on stderr, the publisher's checksum verified before anything
reads the file), converts it with `vgg_jax.convert` and caches the bundle in
`<cache>/bundles/<name>`; later calls read that bundle and touch no network.
The cache is `$VGG_JAX_CACHE`, else `$XDG_CACHE_HOME/vgg_jax`, else
`~/.cache/vgg_jax`; `$VGG_JAX_MIRROR` replaces the publishers' host.

The table below is written from the publishers' own code:

* torchvision: `torchvision/models/vgg.py`, the `VGG*_Weights` enums
  (`IMAGENET1K_V1`, and `VGG16_Weights.IMAGENET1K_FEATURES`). A file name ends
  in the first hex digits of the file's SHA-256, which `torch.hub`'s
  `check_hash` compares as a prefix; so do we.
* Keras: `keras/src/applications/vgg16.py` and `vgg19.py`, the
  `file_utils.get_file(..., file_hash=...)` calls. Those hashes have 32 digits,
  which `get_file`'s "auto" algorithm takes for MD5.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import sys

from vgg_jax import checkpoints, class_names, convert, download, fileio, workdir_lock
from vgg_jax.checkpoints import ModelBundle, Preprocessing

TORCHVISION_BASE = "https://download.pytorch.org/models/"
KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published weights file: where it is, how to check it, how to read it."""

    name: str
    url: str
    checksum: str  # "sha256:HEX" (a prefix for torchvision) or "md5:HEX"
    source_format: str  # a `convert.FORMATS` entry
    description: str
    # The file's own input normalisation when it is not its framework's usual one.
    preprocessing: Preprocessing | None = None
    features_only: bool = False  # the classifier holds no trained values


def _torchvision(name: str, file: str, what: str, **kwargs) -> Weights:
    prefix = re.search(r"-([0-9a-f]{8,})\.pth$", file).group(1)
    return Weights(name, TORCHVISION_BASE + file, f"sha256:{prefix}", "torchvision", what, **kwargs)


def _keras(name: str, path: str, md5: str, what: str, features_only: bool = False) -> Weights:
    return Weights(name, KERAS_BASE + path, f"md5:{md5}", "keras", what, None, features_only)


_TABLE = (
    # torchvision/models/vgg.py, VGG{11,13,16,19}[_BN]_Weights.IMAGENET1K_V1.url
    _torchvision("vgg11", "vgg11-8a719046.pth", "torchvision VGG11_Weights.IMAGENET1K_V1"),
    _torchvision("vgg11_bn", "vgg11_bn-6002323d.pth", "torchvision VGG11_BN_Weights.IMAGENET1K_V1"),
    _torchvision("vgg13", "vgg13-19584684.pth", "torchvision VGG13_Weights.IMAGENET1K_V1"),
    _torchvision("vgg13_bn", "vgg13_bn-abd245e5.pth", "torchvision VGG13_BN_Weights.IMAGENET1K_V1"),
    _torchvision("vgg16", "vgg16-397923af.pth", "torchvision VGG16_Weights.IMAGENET1K_V1"),
    _torchvision("vgg16_bn", "vgg16_bn-6c64b313.pth", "torchvision VGG16_BN_Weights.IMAGENET1K_V1"),
    _torchvision("vgg19", "vgg19-dcbb9e9d.pth", "torchvision VGG19_Weights.IMAGENET1K_V1"),
    _torchvision("vgg19_bn", "vgg19_bn-c79401a0.pth", "torchvision VGG19_BN_Weights.IMAGENET1K_V1"),
    # torchvision/models/vgg.py, VGG16_Weights.IMAGENET1K_FEATURES: ported from
    # amdegroot/ssd.pytorch; its transforms use mean (0.48235, 0.45882, 0.40784) and
    # std 1/255, and "the classifier module" holds no valid values.
    _torchvision(
        "vgg16_features",
        "vgg16_features-amdegroot-88682ab5.pth",
        "torchvision VGG16_Weights.IMAGENET1K_FEATURES (features only)",
        preprocessing=Preprocessing("RGB", 1.0, (0.48235, 0.45882, 0.40784), (1 / 255,) * 3),
        features_only=True,
    ),
    # keras/src/applications/vgg16.py and vgg19.py: WEIGHTS_PATH and get_file's file_hash.
    _keras(
        "keras_vgg16",
        "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        "64373286793e3c8b2b4e3219cbf3544b",
        "Keras applications VGG16(weights='imagenet')",
    ),
    _keras(
        "keras_vgg19",
        "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        "cbe5617147190e668d6c5d5026f83318",
        "Keras applications VGG19(weights='imagenet')",
    ),
    # The same files' WEIGHTS_PATH_NO_TOP (include_top=False): conv layers only.
    _keras(
        "keras_vgg16_notop",
        "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
        "Keras applications VGG16(weights='imagenet', include_top=False) (features only)",
        features_only=True,
    ),
    _keras(
        "keras_vgg19_notop",
        "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "253f8cb515780f3b799900260a226db6",
        "Keras applications VGG19(weights='imagenet', include_top=False) (features only)",
        features_only=True,
    ),
)
REGISTRY: dict[str, Weights] = {w.name: w for w in _TABLE}


class PretrainedError(ValueError):
    """An unknown name, or weights that could not be fetched; the message says what to do."""


def names() -> list[str]:
    return sorted(REGISTRY)


def register(
    name: str,
    url: str,
    checksum: str,
    source_format: str,
    description: str = "",
    features_only: bool = False,
) -> Weights:
    """Adds (or replaces) a named weights file: for tests, or a private model server."""
    download.parse_checksum(checksum)  # refuse a malformed checksum now, not at download
    if source_format not in convert.FORMATS:
        raise ValueError(f"source_format must be one of {convert.FORMATS}, got {source_format!r}.")
    entry = Weights(name, url, checksum, source_format, description or url, None, features_only)
    REGISTRY[name] = entry
    return entry


def bundle_dir(name: str) -> str:
    """Where the converted bundle of a registered name is cached."""
    entry = _entry(name)
    digits = download.parse_checksum(entry.checksum)[1][:8]
    return os.path.join(download.cache_dir(), "bundles", f"{name}-{digits}")


def load(name: str, progress: bool = True) -> ModelBundle:
    """The bundle of a registered name: from the cache, else downloaded, verified and converted."""
    entry = _entry(name)
    cached = bundle_dir(name)
    if checkpoints.is_bundle(cached):
        return checkpoints.load_bundle(cached)
    try:
        path = download.fetch(entry.url, entry.checksum, progress)
    except download.DownloadError as e:
        raise PretrainedError(f"Pretrained weights {name!r}: {e}") from None
    if progress:
        print(f"converting {os.path.basename(path)} to {cached}", file=sys.stderr)
    bundle = convert.convert_file(path, entry.source_format, features_only=entry.features_only)
    if entry.preprocessing is not None:
        bundle.preprocessing = entry.preprocessing
    bundle.metadata = dict(bundle.metadata) | {
        "pretrained_name": name,
        "url": entry.url,
        "checksum": entry.checksum,
        "source": os.path.basename(path),
    }
    if entry.features_only:
        bundle.metadata["features_only"] = True
    _publish(bundle, cached)
    return bundle


def _publish(bundle: ModelBundle, cached: str) -> None:
    """Saves `bundle` as `cached` by writing it aside and renaming it into place.

    Processes that load one name for the first time at once (two notebooks, the workers of
    a job) each convert it; the first rename wins and the others drop their copy, so no
    process ever writes into, or deletes, a bundle another one may be reading.
    """
    staging = f"{cached}.part-{socket.gethostname()}-{os.getpid()}"
    _remove_abandoned_copies(cached)
    checkpoints.save_bundle(staging, bundle)
    for attempt in range(2):
        try:
            os.rename(staging, cached)
            return
        except OSError:
            if checkpoints.is_bundle(cached):  # another process published it first
                shutil.rmtree(staging, ignore_errors=True)
                return
            if attempt:
                raise
            # Half a bundle that an interrupted earlier version wrote in place.
            shutil.rmtree(cached, ignore_errors=True)


def _remove_abandoned_copies(cached: str) -> None:
    """Deletes the half-written `cached.part-HOST-PID` of processes of this host that died
    mid-conversion (a VGG16 copy is 0.5 GB); another host's copies may still be in use."""
    prefix = f"{cached}.part-{socket.gethostname()}-"
    folder = os.path.dirname(cached) or "."
    for entry in os.listdir(folder) if os.path.isdir(folder) else ():
        path = os.path.join(folder, entry)
        pid = path[len(prefix) :] if path.startswith(prefix) else ""
        if pid.isdigit() and (int(pid) == os.getpid() or not workdir_lock.process_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _entry(name: str) -> Weights:
    if name not in REGISTRY:
        raise PretrainedError(
            f"No pretrained weights named {name!r}; known names: {', '.join(names())}."
        )
    return REGISTRY[name]


def resolve(spec: str, which: str = "best") -> ModelBundle:
    """A network from a registered name, a bundle directory or a training workdir.

    An existing path wins over a name. A workdir gives its best variables
    (`which="latest"`: its last training state), with the class names of the
    dataset it trained on.
    """
    spec = os.fspath(spec)
    if fileio.exists(spec):
        if checkpoints.is_bundle(spec):
            return class_names.with_class_names(checkpoints.load_bundle(spec))
        if checkpoints.is_run(spec):
            return load_run(spec, which)
        raise FileNotFoundError(
            f"{spec} is neither a model bundle ({checkpoints.BUNDLE_FILE}) nor a training run "
            f"({checkpoints.CONFIG_FILE}). Give a bundle from `python -m vgg_jax.convert`, a "
            f"run's --workdir, or a weights name: {', '.join(names())}."
        )
    if spec in REGISTRY:
        return class_names.with_class_names(load(spec))
    raise FileNotFoundError(
        f"{spec!r} is not a weights name ({', '.join(names())}) and no such bundle or run "
        "directory exists."
    )


def load_run(workdir: str, which: str = "best") -> ModelBundle:
    """A training run as a bundle, recording its data settings and class names."""
    bundle = checkpoints.load_workdir(workdir, which)
    config = checkpoints.read_run_config(workdir)
    bundle.metadata = dict(bundle.metadata) | {
        "data_dir": config.get("data_dir", ""),
        "classes": list(config.get("classes") or ()),
        # predict's single view of an image is the run's own validation view
        "eval_scale": int(config.get("eval_scale") or bundle.image_size),
        "resize_method": config.get("resize_method", "bilinear"),
    }
    return class_names.with_class_names(bundle)
