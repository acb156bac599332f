"""Where examples come from: tensorflow-datasets datasets and image folders.

Every source hands the input pipeline the same thing: a `tf.data.Dataset` of
still-encoded records `{'image': string, 'label': int64, 'name': string}` for
one process's disjoint share of a split. Decoding happens later, in
`vgg_jax.input_pipeline`, so that skipping records (resume) costs no decoding
and so that JPEG sources can be decoded only where the crop needs them.

Sources:

- any tfds image-classification dataset with `image` and `label` features
  (`imagenet2012`, `cifar10`, ...), prepared under `config.data_dir`;
- `fashion_mnist`, which is also built offline from the four IDX files of
  Debian's `dataset-fashion-mnist` package or of a directory the user names;
- `image_folder`: `<data_dir>/<split>/<class>/<image>` with JPEG/PNG/BMP/GIF
  files; class indices follow the sorted class names of the training split.

`create_source(..., classes=(c0, c1, ...))` keeps only those classes of any
source and relabels them 0..k-1 in the order given (`ClassSubsetSource`), e.g.
to train on five Fashion-MNIST classes and transfer to the other five.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import gzip
import logging
import os
import re
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import cli

log = logging.getLogger(__name__)

FASHION_MNIST_ENV = "VGG_JAX_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# IDX file stem -> (magic number, number of items) of the real Fashion-MNIST.
_FASHION_IDX = {
    "train-images-idx3-ubyte": (2051, 60_000),
    "train-labels-idx1-ubyte": (2049, 60_000),
    "t10k-images-idx3-ubyte": (2051, 10_000),
    "t10k-labels-idx1-ubyte": (2049, 10_000),
}

FASHION_MNIST_HELP = (
    "Fashion-MNIST is not available. Get it in one of three ways:\n"
    "  1. on a machine with internet access, tensorflow-datasets downloads it "
    "automatically (run again online);\n"
    "  2. `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files in "
    f"{DEBIAN_FASHION_MNIST_DIR});\n"
    "  3. put the four IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in a directory and name it "
    f"with config.manual_dir or the environment variable {FASHION_MNIST_ENV}."
)


# ---------------------------------------------------------------------------
# Fashion-MNIST from IDX files.


def read_idx(path: str, magic: int, count: int) -> np.ndarray:
    """Reads one IDX file (gzip or raw), checking its header against the real data set.

    Returns uint8 images (count, 28, 28, 1) or labels (count,).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data[:4], ">u4")
    if header.size != 1 or int(header[0]) != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {magic} expected).")
    ndim = magic & 0xFF
    dims = tuple(int(d) for d in np.frombuffer(data[4 : 4 + 4 * ndim], ">u4"))
    if dims[0] != count:
        raise ValueError(f"{path}: holds {dims[0]} items, Fashion-MNIST has {count}.")
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({body.size} bytes of {int(np.prod(dims))}).")
    if ndim == 3:
        return body.reshape(*dims, 1)
    if body.max() > 9:
        raise ValueError(f"{path}: label {body.max()} outside Fashion-MNIST's 0..9.")
    return body.astype(np.int64)


def find_fashion_mnist_dir(manual_dir: str = "") -> str | None:
    """First directory with all four IDX files: manual_dir, $VGG_JAX_FASHION_MNIST_DIR, Debian."""
    for d in (manual_dir, os.environ.get(FASHION_MNIST_ENV, ""), DEBIAN_FASHION_MNIST_DIR):
        if d and all(_idx_path(d, stem) for stem in _FASHION_IDX):
            return d
    return None


def _idx_path(directory: str, stem: str) -> str | None:
    """The IDX file `stem` in `directory`, plain or gzipped (Debian ships .gz); None if absent."""
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def read_fashion_mnist(directory: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28, 1) uint8 and labels (n,) of one split's IDX files in `directory`.

    `prefix` is the files' own name of the split: "train" or "t10k".
    """

    def read(kind: str) -> np.ndarray:
        stem = f"{prefix}-{kind}-ubyte"
        return read_idx(_idx_path(directory, stem), *_FASHION_IDX[stem])

    return read("images-idx3"), read("labels-idx1")


class _LocalFashionMNIST(tfds.image_classification.FashionMNIST, skip_registration=True):
    """tfds's own `fashion_mnist` builder, fed from local IDX files instead of a download.

    The dataset it writes is the regular `fashion_mnist` (same name, version,
    features), so `tfds.builder('fashion_mnist', data_dir=...)` reads it later.
    """

    name = "fashion_mnist"

    def __init__(self, *, idx_dir: str, **kwargs):
        self._idx_dir = idx_dir
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download

        return [
            tfds.core.SplitGenerator(
                name=name, gen_kwargs={"arrays": read_fashion_mnist(self._idx_dir, prefix)}
            )
            for name, prefix in (("train", "train"), ("test", "t10k"))
        ]

    def _generate_examples(self, arrays):
        images, labels = arrays
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": labels[i]}


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def fashion_mnist_builder(data_dir: str, manual_dir: str = "") -> tfds.core.DatasetBuilder:
    """The prepared tfds `fashion_mnist` builder, preparing it once if needed.

    Order: already prepared in data_dir; local IDX files (no network, so no hang
    offline); tfds's own download. Fails with the three ways to get the data.
    """
    data_dir = data_dir or None
    with _unprepared_notice_silenced():
        builder = tfds.builder("fashion_mnist", data_dir=data_dir)
        if builder.is_prepared():
            return builder
        with _preparing(builder):
            builder = tfds.builder("fashion_mnist", data_dir=data_dir)
            if builder.is_prepared():  # another process prepared it while this one waited
                return builder
            return _prepare_fashion_mnist(builder, data_dir, manual_dir)


class _DropUnpreparedNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder %s has no")


@contextlib.contextmanager
def _unprepared_notice_silenced() -> Iterator[None]:
    """tfds warns that a dataset it has not prepared yet has no dataset_info.json, just
    before this module prepares it: a warning with nothing for the user to do."""
    notice = _DropUnpreparedNotice()
    logging.getLogger("absl").addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(notice)


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
    """Holds an exclusive lock on the data_dir while one process prepares the dataset.

    Runs started together on a fresh machine (two trainings, test workers)
    would otherwise write the same files at once; the others wait, then find it
    prepared. The kernel drops the lock of a killed holder. Local disks only.
    """
    root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
    if "://" in root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".vgg_jax_{builder.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_fashion_mnist(builder, data_dir: str | None, manual_dir: str):
    idx_dir = find_fashion_mnist_dir(manual_dir)
    if idx_dir is not None:
        log.info("Preparing tfds fashion_mnist from the IDX files in %s", idx_dir)
        local = _LocalFashionMNIST(idx_dir=idx_dir, data_dir=data_dir)
        local.download_and_prepare(
            download_dir=os.path.join(tempfile.gettempdir(), "vgg_jax_fashion_mnist_dl")
        )
        return tfds.builder("fashion_mnist", data_dir=data_dir)
    url = tfds.image_classification.FashionMNIST.URL
    if not _reachable(url):  # tfds would retry for minutes before giving up
        raise FileNotFoundError(f"{FASHION_MNIST_HELP}\n(no connection to {url})")
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any download failure means "no source"
        raise FileNotFoundError(f"{FASHION_MNIST_HELP}\n(tfds download failed: {e})") from e
    return builder


# ---------------------------------------------------------------------------
# Sources.


def even_share(n: int, index: int, count: int) -> tuple[int, int]:
    """[start, end) of shard `index` of `count` nearly equal contiguous shards of n items."""
    return index * n // count, (index + 1) * n // count


@dataclasses.dataclass(eq=False)
class Source:
    """A dataset split into per-process record streams. Subclasses implement the three methods."""

    name: str
    channels: int
    num_classes: int | None  # None when the source does not know it
    # (H, W) when every image of the dataset has that size (tfds features with a static
    # shape, e.g. Fashion-MNIST's 28x28): its rescaled images can be batched.
    image_size: tuple[int, int] | None = None

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def shard_sizes(self, split: str, count: int) -> list[int]:
        """Number of examples of each of `count` processes' shares."""
        raise NotImplementedError

    def records(
        self, split: str, index: int, count: int, shuffle_seed: int | None, shuffle_buffer: int
    ) -> tf.data.Dataset:
        """Encoded records of share `index`; shuffled deterministically when shuffle_seed is set."""
        raise NotImplementedError


class TfdsSource(Source):
    """A prepared tfds dataset; shares are tfds even splits (contiguous file ranges)."""

    def __init__(self, builder: tfds.core.DatasetBuilder):
        features = builder.info.features
        for key in ("image", "label"):
            if key not in features:
                raise ValueError(
                    f"tfds dataset {builder.name!r} has no {key!r} feature (features: "
                    f"{list(features.keys())}); only image classification datasets are supported."
                )
        shape = features["image"].shape
        label = features["label"]
        super().__init__(
            name=builder.name,
            channels=int(shape[-1]) if shape[-1] else 3,
            num_classes=getattr(label, "num_classes", None),
            image_size=(int(shape[0]), int(shape[1])) if None not in shape[:2] else None,
        )
        self.builder = builder

    def _check_split(self, split: str) -> None:
        base = split.split("[")[0]
        splits = self.builder.info.splits
        # No split metadata at all happens only for mocked datasets (tfds.testing.mock_data).
        if splits and base not in splits:
            raise ValueError(
                f"Split {split!r} not found in tfds dataset {self.name!r}; available: "
                f"{sorted(splits.keys())}. Set config.train_split / config.eval_split."
            )

    def _size(self, split) -> int:
        if self.builder.info.splits:
            return int(self.builder.info.splits[split].num_examples)
        return int(self.builder.as_dataset(split=split).cardinality())

    def num_examples(self, split: str) -> int:
        self._check_split(split)
        return self._size(split)

    def _shards(self, split: str, count: int) -> list:
        self._check_split(split)
        return tfds.even_splits(split, n=count) if count > 1 else [split]

    def shard_sizes(self, split: str, count: int) -> list[int]:
        return [self._size(s) for s in self._shards(split, count)]

    def records(self, split, index, count, shuffle_seed, shuffle_buffer):
        shard = self._shards(split, count)[index]
        read_config = tfds.ReadConfig(
            try_autocache=False,
            shuffle_seed=shuffle_seed,
            add_tfds_id=True,
            options=_deterministic_options(),
        )
        ds = self.builder.as_dataset(
            split=shard,
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        if shuffle_seed is not None and shuffle_buffer > 1:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.map(
            lambda ex: {
                "image": ex["image"],
                "label": tf.cast(ex["label"], tf.int64),
                "name": ex["tfds_id"],
            }
        )


class ImageFolderSource(Source):
    """`<root>/<split>/<class>/<file>`; every image decodes to 3 channels."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"image_folder root {root!r} does not exist; set config.data_dir to a directory "
                "with train/ and val/ (or test/) sub-directories of class folders."
            )
        self.root = root
        classes = self._classes(self._split_dir("train", must_exist=False))
        super().__init__(name="image_folder", channels=3, num_classes=len(classes) or None)
        self.classes = classes

    def _split_dir(self, split: str, must_exist: bool = True) -> str:
        aliases = {"validation": ("validation", "val"), "val": ("val", "validation")}
        for name in aliases.get(split, (split,)):
            d = os.path.join(self.root, name)
            if os.path.isdir(d):
                return d
        if must_exist:
            present = sorted(
                e for e in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, e))
            )
            raise ValueError(
                f"Split {split!r} not found under {self.root!r} (sub-directories: {present}); "
                "expected e.g. train/, val/ or test/. Set config.train_split / config.eval_split."
            )
        return ""

    @staticmethod
    def _classes(split_dir: str) -> list[str]:
        if not split_dir:
            return []
        return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())

    @functools.cache  # noqa: B019 - one source object per config, lists are immutable
    def _files(self, split: str) -> tuple[tuple[str, ...], np.ndarray]:
        split_dir = self._split_dir(split)
        classes = self.classes or self._classes(split_dir)
        index = {c: i for i, c in enumerate(classes)}
        paths, labels = [], []
        for c in self._classes(split_dir):
            if c not in index:
                raise ValueError(
                    f"Class folder {c!r} in {split_dir} does not exist in the training split; "
                    f"known classes: {classes}."
                )
            folder = os.path.join(split_dir, c)
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(folder, f))
                    labels.append(index[c])
        # A fixed permutation mixes classes, so every process's contiguous share is balanced.
        order = np.random.default_rng(0).permutation(len(paths))
        return tuple(paths[i] for i in order), np.asarray(labels, np.int64)[order]

    def num_examples(self, split: str) -> int:
        return len(self._files(split)[0])

    def shard_sizes(self, split: str, count: int) -> list[int]:
        n = self.num_examples(split)
        return [b - a for a, b in (even_share(n, i, count) for i in range(count))]

    def records(self, split, index, count, shuffle_seed, shuffle_buffer):
        del shuffle_buffer  # file lists are shuffled exactly
        paths, labels = self._files(split)
        start, end = even_share(len(paths), index, count)
        order = np.arange(start, end)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(order)
        ds = tf.data.Dataset.from_tensor_slices(
            {"name": np.asarray(paths, dtype=object)[order].astype(str), "label": labels[order]}
        )
        return ds.map(
            lambda ex: {
                "image": tf.io.read_file(ex["name"]),
                "label": ex["label"],
                "name": ex["name"],
            },
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )


class ClassSubsetSource(Source):
    """Another source's examples of a few classes, relabelled 0..k-1 in the order given."""

    def __init__(self, base: Source, classes: Sequence[int]):
        classes = tuple(int(c) for c in classes)
        if len(set(classes)) != len(classes) or any(c < 0 for c in classes):
            raise ValueError(f"classes must be distinct non-negative labels, got {classes}.")
        if base.num_classes is not None and max(classes) >= base.num_classes:
            raise ValueError(
                f"classes {classes} name labels outside {base.name!r}'s 0..{base.num_classes - 1}."
            )
        super().__init__(
            name=base.name,
            channels=base.channels,
            num_classes=len(classes),
            image_size=base.image_size,
        )
        self.base, self.classes = base, classes
        self._sizes: dict[tuple[str, int], list[int]] = {}

    def _keep(self, records: tf.data.Dataset) -> tf.data.Dataset:
        kept = tf.constant(self.classes, tf.int64)
        # Label c -> its position in `classes`; every other label is filtered out first.
        table = np.zeros(max(self.classes) + 1, np.int64)
        table[list(self.classes)] = np.arange(len(self.classes))
        table = tf.constant(table)
        records = records.filter(lambda ex: tf.reduce_any(tf.equal(ex["label"], kept)))
        return records.map(lambda ex: {**ex, "label": tf.gather(table, ex["label"])})

    def shard_sizes(self, split: str, count: int) -> list[int]:
        # Counting the kept records of each share reads labels only (images stay encoded).
        if (split, count) not in self._sizes:
            self._sizes[split, count] = [
                int(self._keep(self.base.records(split, i, count, None, 0)).reduce(0, _count))
                for i in range(count)
            ]
        return self._sizes[split, count]

    def num_examples(self, split: str) -> int:
        return sum(self.shard_sizes(split, 1))

    def records(self, split, index, count, shuffle_seed, shuffle_buffer):
        return self._keep(self.base.records(split, index, count, shuffle_seed, shuffle_buffer))


def _count(n, _):
    return n + 1


def _deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def create_source(
    dataset: str, data_dir: str = "", manual_dir: str = "", classes: Sequence[int] = ()
) -> Source:
    """The source named by config.dataset; only `classes` (relabelled 0..k-1) when given."""
    source = _create_source(dataset, data_dir, manual_dir)
    return ClassSubsetSource(source, classes) if classes else source


def _create_source(dataset: str, data_dir: str, manual_dir: str) -> Source:
    if dataset == "image_folder":
        return ImageFolderSource(data_dir)
    if dataset == "fashion_mnist":
        return TfdsSource(fashion_mnist_builder(data_dir, manual_dir))
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        builder = tfds.builder(dataset, data_dir=data_dir or None)
    except tfds.core.DatasetNotFoundError as e:
        raise ValueError(_unknown_dataset(dataset, str(e))) from None
    if not builder.is_prepared():
        root = os.fspath(builder.data_dir_root)
        before = _folders(root)
        try:
            builder.download_and_prepare(download_config=download_config)
        except Exception as e:  # noqa: BLE001
            _remove_new_empty_folders(root, before)
            hint = (
                " For imagenet2012, put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                "config.manual_dir (see docs/data.md)."
                if dataset.startswith("imagenet")
                else ""
            )
            raise FileNotFoundError(
                f"tfds dataset {dataset!r} is not prepared in {data_dir or 'the tfds default dir'} "
                f"and preparing it failed: {e}.{hint}"
            ) from e
    return TfdsSource(builder)


def _folders(root: str) -> set[str]:
    """The folders under a local tfds data_dir (a URL: none, nothing is cleaned there)."""
    if "://" in root or not os.path.isdir(root):
        return set()
    return {path for path, _, _ in os.walk(root)}


def _remove_new_empty_folders(root: str, before: set[str]) -> None:
    """Removes the empty folders a failed prepare left (imagenet2012/, downloads/manual/):
    tfds warns about every empty dataset folder on each later run."""
    for path in sorted(_folders(root) - before, key=len, reverse=True):  # deepest first
        with contextlib.suppress(OSError):  # not empty: something worth keeping
            os.rmdir(path)


def _unknown_dataset(dataset: str, tfds_message: str) -> str:
    """One line for a name tfds does not know (its own message lists all 400+ of its names)."""
    listed = tfds_message.split("Available datasets:")[-1].split("Check that:")[0]
    names = [*re.findall(r"^\s*- (\S+)$", listed, re.MULTILINE), "image_folder"]
    close = difflib.get_close_matches(dataset, names, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return (
        f"Unknown dataset {dataset!r}.{hint} Give a tensorflow-datasets name (fashion_mnist, "
        "imagenet2012, cifar10, ...) or 'image_folder' for your own class folders (docs/data.md)."
    )


def split_names(source: Source) -> Sequence[str]:
    """Split names a source knows (for error messages)."""
    if isinstance(source, ClassSubsetSource):
        return split_names(source.base)
    if isinstance(source, TfdsSource):
        return sorted(source.builder.info.splits.keys())
    return sorted(os.listdir(source.root))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m vgg_jax.data_sources DATASET --data_dir D [--manual_dir M]`: prepare once.

    (tfds 4.9.10's own `tfds build` command needs apache_beam to start.)
    """
    parser = cli.ArgumentParser(
        prog="python -m vgg_jax.data_sources", description="Prepare a dataset for vgg_jax (once)."
    )
    parser.add_argument("dataset", help="imagenet2012, fashion_mnist, cifar10, ...")
    parser.add_argument("--data_dir", default="", help="tfds data_dir (local or gs://)")
    parser.add_argument("--manual_dir", default="", help="directory with the manual files")
    args = parser.parse_args(argv)
    source = create_source(args.dataset, args.data_dir, args.manual_dir)
    if isinstance(source, TfdsSource):
        sizes = {k: v.num_examples for k, v in source.builder.info.splits.items()}
        print(f"{source.name} ready in {source.builder.data_dir}: {sizes}")


if __name__ == "__main__":
    cli.run(main)
