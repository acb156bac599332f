"""Transfer with the paper's image descriptor (Appendix B): frozen VGG features + linear SVM.

The paper describes images of other datasets (VOC, Caltech) by the
penultimate-layer activations of its ImageNet nets, computed densely over the
whole image at several scales Q and averaged over positions and horizontal
flips, averaged or stacked across scales and L2-normalised
(`features.image_descriptor`); two networks are fused late by stacking their
descriptors. Linear SVMs on the descriptors then give mean class recall
(Caltech) or mean average precision (VOC) by the protocols of
`vgg_jax.transfer_svm`. This module loads the labelled images, computes the
descriptors (of one or two networks, and of raw pixels for comparison), runs
one transfer or the offline experiment, and is the command line.

Command line (a weights name such as vgg16, a model bundle or a training
workdir per --weights; a second --weights is fused by stacking):

    python -m vgg_jax.transfer --weights weights/vgg16 --dataset caltech101 --train-per-class 30
    python -m vgg_jax.transfer --weights weights/vgg16 --weights weights/vgg19 \\
        --dataset voc/2007 --metric map
    python -m vgg_jax.transfer --weights runs/fm_source --dataset fashion_mnist \\
        --classes 5,6,7,8,9 --scales 32,48,64 --train-per-class 10 --pixels

The offline experiment (configs/transfer_fashion_mnist.py) trains the source
network on five Fashion-MNIST classes, then runs the above on the other five
and compares with the same SVM on raw pixels:

    python -m vgg_jax.transfer --experiment configs/transfer_fashion_mnist.py --workdir runs/tfm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vgg_jax import checkpoints, cli, features, fileio, image_io
from vgg_jax.transfer_svm import (
    DEFAULT_C_GRID,
    caltech_protocol,
    per_class_indices,
    voc_protocol,
)

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Data: labelled images as raw pixels in [0, 1].


@dataclasses.dataclass
class LabelledImages:
    """Images (an (N, H, W, C) array, or a list of HxWxC arrays of any sizes) in [0, 1].

    `labels` is (N,) class indices, or (N, K) 0/1 for multi-label data.
    """

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    def subset(self, indices: np.ndarray) -> LabelledImages:
        if isinstance(self.images, np.ndarray):
            images: np.ndarray | list[np.ndarray] = self.images[indices]
        else:
            images = [self.images[i] for i in indices]
        return LabelledImages(images, self.labels[indices])


def _stack_if_same_size(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    shapes = {im.shape for im in images}
    return np.stack(images) if len(shapes) == 1 else images


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: str = "",
    manual_dir: str = "",
    classes: Sequence[int] = (),
    per_class: int = 0,
    seed: int = 0,
) -> LabelledImages:
    """A single-label split through `data_sources` (tfds name, fashion_mnist, image_folder).

    `classes` keeps those labels only, relabelled 0..k-1; `per_class` > 0 keeps a
    random `per_class` images of each class (all of a class that has fewer).
    """
    import tensorflow as tf

    from vgg_jax import data_sources, input_pipeline

    source = data_sources.create_source(dataset, data_dir, manual_dir, classes)
    records = source.records(split, 0, 1, None, 0)
    labels = np.fromiter(records.map(lambda ex: ex["label"]).as_numpy_iterator(), np.int64)
    if labels.size == 0:
        raise ValueError(f"Split {split!r} of {dataset!r} has no images (classes={classes}).")
    keep = per_class_indices(labels, per_class, seed) if per_class else np.arange(labels.size)
    wanted = np.zeros(labels.size, bool)
    wanted[keep] = True
    wanted_t = tf.constant(wanted)
    channels = source.channels
    # Decoding inside tf.data, in parallel and batched: far faster than image by image.
    images = (
        records.enumerate()
        .filter(lambda i, ex: tf.gather(wanted_t, i))
        .map(
            lambda i, ex: input_pipeline.decode_image(ex["image"], channels),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    )
    decoded = [image_io.unit_float(im) for im in images.as_numpy_iterator()]
    return LabelledImages(_stack_if_same_size(decoded), labels[keep])


def load_multilabel_split(
    dataset: str, split: str, *, data_dir: str = "", limit: int = 0
) -> LabelledImages:
    """A tfds split with a `labels` sequence feature (VOC): (N, K) 0/1 labels."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=data_dir or None)
    features_dict = builder.info.features
    feature = features_dict["labels"] if features_dict and "labels" in features_dict else None
    num_classes = getattr(getattr(feature, "feature", None), "num_classes", None)
    if num_classes is None:
        raise ValueError(
            f"tfds dataset {dataset!r} has no 'labels' sequence of class labels; --metric map "
            "needs multi-label data such as voc/2007. Use --metric recall for single-label data."
        )
    if not builder.is_prepared():
        builder.download_and_prepare()
    ds = builder.as_dataset(split=split)
    if limit:
        ds = ds.take(limit)
    images, labels = [], []
    for ex in tfds.as_numpy(ds):
        images.append(np.asarray(ex["image"], np.float32) / 255.0)
        row = np.zeros(num_classes, np.int64)
        row[np.asarray(ex["labels"], np.int64)] = 1
        labels.append(row)
    if not labels:
        raise ValueError(f"Split {split!r} of {dataset!r} has no images.")
    return LabelledImages(_stack_if_same_size(images), np.stack(labels))


# ---------------------------------------------------------------------------
# Descriptors.


def default_scales(image_size: int) -> tuple[int, ...]:
    """The paper's Q = 256, 384, 512 for 224 networks, scaled to the network's image_size."""
    return tuple(round(q * image_size / 224) for q in features.DESCRIPTOR_SCALES)


def input_channels(bundle: checkpoints.ModelBundle) -> int:
    """Image channels the network's first convolution reads."""
    return checkpoints.input_channels(bundle.variables)


def describe(
    bundle: checkpoints.ModelBundle,
    images: np.ndarray | list[np.ndarray],
    scales: Sequence[int],
    *,
    flip: bool = True,
    combine: str = "mean",
    batch_size: int = 256,
    log: Log | None = None,
) -> np.ndarray:
    """(N, D) unit-norm descriptors; same-sized images run in batches, the progress logged."""
    channels = input_channels(bundle)
    items = [images] if isinstance(images, np.ndarray) else images
    have = {int(im.shape[-1]) for im in items}
    if have != {channels}:
        raise ValueError(
            f"The network reads {channels}-channel images but the data have {sorted(have)} "
            "channel(s); use a network trained on this kind of image."
        )
    total, out = len(images), None
    done, start = 0, time.time()
    for indices, batch in _groups_by_shape(images):
        # Chunks of a few batches, so that progress shows on long runs.
        for lo in range(0, len(indices), 8 * batch_size):
            chunk = batch[lo : lo + 8 * batch_size]
            desc = np.asarray(
                features.image_descriptor(
                    bundle, None, chunk, scales, flip, combine, batch_size=batch_size
                )
            )
            if out is None:
                out = np.zeros((total, desc.shape[1]), np.float32)
            out[indices[lo : lo + len(chunk)]] = desc
            done += len(chunk)
            if log:
                log(f"  descriptors {done}/{total} ({time.time() - start:.0f} s)")
    if out is None:
        raise ValueError("No images to describe.")
    return out


def _groups_by_shape(
    images: np.ndarray | list[np.ndarray],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(indices, stacked images) per distinct image shape."""
    if isinstance(images, np.ndarray):
        return [(np.arange(len(images)), images)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    return [(np.asarray(ix), np.stack([images[i] for i in ix])) for ix in by_shape.values()]


def fuse(*descriptors: np.ndarray) -> np.ndarray:
    """Late fusion of several networks: their unit-norm descriptors stacked, L2-normalised."""
    stacked = np.concatenate(descriptors, axis=1)
    return stacked / np.maximum(np.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)


def pixel_descriptors(images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """The baseline: raw pixels flattened and L2-normalised (same-sized images only)."""
    if not isinstance(images, np.ndarray):
        raise ValueError(
            "The raw-pixel baseline needs images of one size; these differ. Drop --pixels."
        )
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------
# One transfer run: descriptors of one or two networks (and pixels), SVMs, metrics.


@dataclasses.dataclass
class TransferSettings:
    scales: tuple[int, ...]
    flip: bool = True
    combine: str = "mean"
    metric: str = "recall"  # or "map"
    train_per_class: tuple[int, ...] = (10,)
    splits: int = 5
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    pixels: bool = False  # also the raw-pixel baseline
    batch_size: int = 256
    seed: int = 0


def run_transfer(
    bundles: Sequence[checkpoints.ModelBundle],
    train: LabelledImages,
    test: LabelledImages,
    settings: TransferSettings,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Descriptors for `train` and `test`, the SVM protocol, results per feature kind."""
    if not 1 <= len(bundles) <= 2:
        raise ValueError(f"Give one network, or two to fuse; got {len(bundles)}.")
    kinds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    per_net = []
    for i, bundle in enumerate(bundles):
        log(f"network {i + 1}/{len(bundles)}: descriptors at Q={list(settings.scales)}")
        pair = tuple(
            describe(
                bundle,
                part.images,
                settings.scales,
                flip=settings.flip,
                combine=settings.combine,
                batch_size=settings.batch_size,
                log=log,
            )
            for part in (train, test)
        )
        per_net.append(pair)
    kinds["descriptor"] = (
        per_net[0] if len(per_net) == 1 else tuple(fuse(*p) for p in zip(*per_net, strict=True))
    )
    if settings.pixels:
        kinds["pixels"] = (pixel_descriptors(train.images), pixel_descriptors(test.images))
    results: dict[str, Any] = {}
    for kind, (tr, te) in kinds.items():
        log(f"{kind}: {tr.shape[1]}-D, linear SVM")
        results[kind] = _protocol_rows(tr, train.labels, te, test.labels, settings)
    return results


def _protocol_rows(tr, tr_labels, te, te_labels, settings: TransferSettings) -> list[dict]:
    if settings.metric == "map":
        runs = [voc_protocol(tr, tr_labels, te, te_labels, settings.c_grid, settings.seed)]
    else:
        runs = [
            caltech_protocol(
                tr, tr_labels, te, te_labels, n, settings.splits, settings.c_grid, settings.seed
            )
            for n in settings.train_per_class
        ]
    return [
        {
            "metric": "mAP" if settings.metric == "map" else "mean class recall",
            "train_per_class": r.train_per_class,
            "mean": r.mean,
            "std": r.std,
            "splits": r.scores,
            "chosen_c": r.chosen_c,
        }
        for r in runs
    ]


def format_results(results: dict[str, Any]) -> str:
    """A markdown table: one row per feature kind and number of training images per class."""
    lines = [
        "| features | train/class | metric | mean | std | splits |",
        "|---|---|---|---|---|---|",
    ]
    for kind, rows in results.items():
        for r in rows:
            n = r["train_per_class"] or "all"
            lines.append(
                f"| {kind} | {n} | {r['metric']} | {r['mean']:.4f} | {r['std']:.4f} | "
                f"{len(r['splits'])} |"
            )
    return "\n".join(lines)


def on_canvases(
    data: LabelledImages, size: int, scale_range: Sequence[float], seed: int | Sequence[int]
) -> LabelledImages:
    """Each image pasted at a random position and scale onto a black size x size canvas.

    Objects off-centre and of varying size, as in VOC or Caltech photographs,
    where raw pixels no longer line up (`localization_data.paste_all`).
    """
    from vgg_jax import localization_data

    items = image_io.to_uint8(np.asarray(data.images))
    rng = np.random.default_rng(seed)
    canvases, _ = localization_data.paste_all(items, size, tuple(scale_range), rng)
    return LabelledImages(np.stack(canvases), data.labels)


# ---------------------------------------------------------------------------
# The offline Fashion-MNIST experiment: train on some classes, transfer to the others.


def run_experiment(config: Any, workdir: str, log: Log = _stderr) -> dict[str, Any]:
    """Trains config.source in workdir (or resumes; a finished run is reused), then transfers.

    config.transfer: target_classes, scales, flip, combine, train_per_class,
    splits, c_grid, pool_per_class (training images per target class to draw
    splits from), test_per_class (0 = the whole test split), canvas_size and
    canvas_scale_range (`on_canvases`; canvas_size 0 = the images as they are),
    output (the results' JSON file in workdir).
    """
    from vgg_jax import train

    t = config.transfer
    overlap = set(config.source.classes) & set(t.target_classes)
    if overlap:
        raise ValueError(f"Target classes {sorted(overlap)} are also source classes.")
    start = time.time()
    log(f"source network: {config.source.model} on classes {list(config.source.classes)}")
    summary = train.train_and_evaluate(config.source, workdir)
    train_seconds = time.time() - start
    bundle = checkpoints.load_workdir(workdir, "best")
    data = dict(
        dataset=config.source.dataset,
        data_dir=config.source.data_dir,
        manual_dir=config.source.get("manual_dir", ""),
        classes=tuple(t.target_classes),
    )
    log(f"target classes {list(t.target_classes)}: loading images")
    train_set = load_split(
        split=config.source.train_split, per_class=t.pool_per_class, seed=t.seed, **data
    )
    test_set = load_split(
        split=config.source.eval_split, per_class=t.test_per_class, seed=t.seed, **data
    )
    if t.canvas_size:
        log(f"pasting them onto {t.canvas_size}x{t.canvas_size} canvases")
        train_set, test_set = (
            on_canvases(part, int(t.canvas_size), t.canvas_scale_range, [int(t.seed), salt])
            for salt, part in ((1, train_set), (2, test_set))
        )
    settings = TransferSettings(
        scales=tuple(t.scales),
        flip=bool(t.flip),
        combine=t.combine,
        train_per_class=tuple(t.train_per_class),
        splits=int(t.splits),
        c_grid=tuple(t.c_grid),
        pixels=True,
        seed=int(t.seed),
    )
    results = run_transfer([bundle], train_set, test_set, settings, log)
    out = {
        "source_accuracy": float(summary.get("best_accuracy", -1.0)),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - start, 1),
        "pool_images": len(train_set),
        "test_images": len(test_set),
        "results": results,
    }
    fileio.write_text_atomic(fileio.join(workdir, t.output), json.dumps(out, indent=2))
    return out


# ---------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m vgg_jax.transfer",
        description="Linear-SVM transfer with the paper's dense multi-scale image descriptor.",
    )
    p.add_argument(
        "--weights",
        action="append",
        help="weights name (e.g. vgg16), model bundle or training workdir (twice: fuse two)",
    )
    p.add_argument("--which", default="best", choices=("best", "latest"))
    p.add_argument(
        "--dataset",
        help="tfds name (caltech101, voc/2007, ...), fashion_mnist, "
        "or image_folder (with --data-dir ROOT holding train/ and test/)",
    )
    p.add_argument("--data-dir", default="", help="tfds data_dir, or the image folder's root")
    p.add_argument("--manual-dir", default="")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument(
        "--classes",
        type=cli.integers(0),
        default=(),
        help="only these labels, e.g. 5,6,7,8,9 (default: all)",
    )
    p.add_argument(
        "--metric",
        default="recall",
        choices=("recall", "map"),
        help="recall: mean class recall over random splits (Caltech); map: VOC mAP",
    )
    p.add_argument(
        "--train-per-class",
        type=cli.integers(1),
        default="30",
        help="N training images per class, e.g. 10,30",
    )
    p.add_argument("--splits", type=cli.integer(1), default=5, help="random splits (recall)")
    p.add_argument(
        "--pool-per-class",
        type=cli.integer(0),
        default=0,
        help="draw splits from this many training images per class (0: all)",
    )
    p.add_argument(
        "--test-per-class", type=cli.integer(0), default=0, help="test images per class (0: all)"
    )
    p.add_argument("--limit", type=cli.integer(0), default=0, help="first N images per split (map)")
    p.add_argument(
        "--scales",
        type=cli.integers(1),
        help="Q values, e.g. 256,384,512 (default: the paper's, scaled)")
    p.add_argument("--combine", default="mean", choices=("mean", "stack"))
    p.add_argument("--no-flip", action="store_true")
    p.add_argument(
        "--c-grid",
        type=cli.positive_numbers(),
        default=",".join(str(c) for c in DEFAULT_C_GRID),
        help="SVM C values to choose from (the best on a held-out 20%% of the training images)",
    )
    p.add_argument("--pixels", action="store_true", help="also an SVM on raw pixels")
    p.add_argument("--batch-size", type=cli.integer(1), default=256)
    p.add_argument("--seed", type=cli.integer(0), default=0)
    p.add_argument(
        "--output", type=cli.output_file("transfer.json"), help="write the results as JSON here"
    )
    p.add_argument("--experiment", help="config FILE[:variant]: train a source net, then transfer")
    p.add_argument("--workdir", help="the experiment's training run directory")
    return p.parse_args(argv)


def load_experiment_config(path: str) -> Any:
    """get_config(variant) of a config FILE[:variant]; a missing file ends the command."""
    from vgg_jax import configuration

    try:
        return configuration.load_config_file(path, " (e.g. configs/transfer_fashion_mnist.py)")
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.experiment:
        if not args.workdir:
            raise SystemExit("--experiment needs --workdir (where the source network trains).")
        out = run_experiment(load_experiment_config(args.experiment), args.workdir)
        print(format_results(out["results"]))
        return out
    if not args.weights or not args.dataset:
        raise SystemExit("Name the network(s) and the data: --weights DIR --dataset NAME.")
    from vgg_jax.evaluate import load_network

    bundles = [load_network(path, args.which)[1] for path in args.weights]
    sizes = {b.image_size for b in bundles}
    scales = args.scales or default_scales(max(sizes))
    settings = TransferSettings(
        scales=scales,
        flip=not args.no_flip,
        combine=args.combine,
        metric=args.metric,
        train_per_class=args.train_per_class,
        splits=args.splits,
        c_grid=args.c_grid,
        pixels=args.pixels,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    _stderr(f"loading {args.dataset} {args.train_split} and {args.test_split}")
    try:
        if args.metric == "map":
            train_set, test_set = (
                load_multilabel_split(args.dataset, s, data_dir=args.data_dir, limit=args.limit)
                for s in (args.train_split, args.test_split)
            )
        else:
            common = dict(
                data_dir=args.data_dir,
                manual_dir=args.manual_dir,
                classes=args.classes,
                seed=args.seed,
            )
            train_set = load_split(
                args.dataset, args.train_split, per_class=args.pool_per_class, **common
            )
            test_set = load_split(
                args.dataset, args.test_split, per_class=args.test_per_class, **common
            )
        results = run_transfer(bundles, train_set, test_set, settings)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(format_results(results))
    out = {
        "networks": args.weights,
        "dataset": args.dataset,
        "scales": list(scales),
        "results": results,
    }
    if args.output:
        fileio.write_text_atomic(args.output, json.dumps(out, indent=2))  # gs:// too
    return out


if __name__ == "__main__":
    cli.run(main)
