"""Command line of the paper's test protocols: one pass over a split, the paper's table.

One pass over the split gives every row: each scale alone, all scales, and
with `--mode both` the fusion; the table is shaped like the paper's Tables
3-5, one line under it says what each row is and how it relates to the
trainer's own validation figure, and `--output` writes the same numbers as
JSON. The protocols themselves are `vgg_jax.protocols`; the error counts
`metrics.ErrorCounts`.

    python -m vgg_jax.evaluate --workdir runs/vgg16 --mode both
    python -m vgg_jax.evaluate --checkpoint weights/vgg16 --checkpoint weights/vgg19 \
        --config configs/vgg16.py --mode both            # ensemble of D and E
    python -m vgg_jax.evaluate --checkpoint weights/vgg16 --config configs/vgg16.py \
        --mode multicrop --grid 1 --no-flip --scales 256  # the usual single centre crop

Data come from `input_pipeline.eval_dataset(mode="full", normalize=False,
scales=...)`: one stream with every example at every Q (each resampled from
the original image), raw pixels in [0, 1], since each network normalises its
own input. Default scales are the config's `test_scales`, else the paper's
for the run's training scale (`paper_scales`). Mirror images are added
(`--flip`) when the run trained with them (its `random_flip`; `--no-flip` /
`--flip` decide otherwise): the paper's flip averaging assumes a network that
saw mirrored images in training.

Stored results: with `--workdir` (no `--checkpoint`, one process), the result is kept
in `WORKDIR/eval/<key>.json`, the key a hash of the checkpoint's step, the
arguments and `PROTOCOL_VERSION`; the same command again prints it without
evaluating (`--recompute` evaluates anew).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vgg_jax import checkpoints, cli, fileio, image_io, metrics, protocols

# The command line hands evaluators this many batches' worth of images at a time.
GROUP_BATCHES = 4
# Part of every stored result's key: raise it when a change alters what a row computes.
PROTOCOL_VERSION = 2
EVAL_DIR = "eval"


# ---------------------------------------------------------------------------
# Evaluating a dataset: every protocol of the paper's Tables 3-5 in one pass.


def evaluate_batches(
    protocol_set: protocols.ProtocolSet,
    batches: Iterable[tuple[image_io.ImageSet, np.ndarray, np.ndarray]],
    *,
    limit: int = 0,
    total: int | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 10.0,
) -> dict[protocols.Row, metrics.ErrorCounts]:
    """Counts errors of every row over (images, labels, mask) batches; masked-out entries skipped.

    `limit` > 0 stops after that many real examples (of this process).
    """
    # Every row exists from the start: processes with no examples still take part in the sum.
    counts = {row: metrics.ErrorCounts() for row in protocol_set.rows()}
    seen, start, last_report = 0, time.time(), time.time()
    for images, labels, mask in batches:
        mask = np.asarray(mask, bool)
        keep = np.flatnonzero(mask)
        if limit:
            keep = keep[: max(0, limit - seen)]
        if len(keep):
            subset = images.subset(keep.tolist())
            for row, probs in protocol_set.predict_rows(subset).items():
                counts[row].update(probs, np.asarray(labels)[keep])
            seen += len(keep)
        if progress and time.time() - last_report >= progress_every_s:
            last_report = time.time()
            progress(_progress_line(seen, total, time.time() - start))
        if limit and seen >= limit:
            break
    if progress:
        progress(_progress_line(seen, total, time.time() - start))
    return {row: c.all_processes() for row, c in counts.items()}


def _progress_line(seen: int, total: int | None, seconds: float) -> str:
    rate = seen / seconds if seconds > 0 else 0.0
    line = f"[evaluate] {seen}" + (f"/{total}" if total else "") + f" images, {rate:.1f} images/s"
    if total and rate > 0:
        line += f", ETA {(total - seen) / rate / 60:.1f} min"
    return line


def format_table(results: Mapping[protocols.Row, metrics.ErrorCounts], title: str = "") -> str:
    """A Markdown table shaped like the paper's Tables 3-5 (errors in %)."""
    lines = [title] if title else []
    lines += [
        "| evaluation method | test scale Q | top-1 error (%) | top-5 error (%) | images |",
        "|---|---|---|---|---|",
    ]
    for row, c in results.items():
        lines.append(
            f"| {row.mode} | {','.join(map(str, row.scales))} | {100 * c.top1_error:.2f} | "
            f"{100 * c.top5_error:.2f} | {c.count} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# What each row is, next to the trainer's own figure.


def trainer_figure(workdir: str, step: int | None) -> dict[str, Any] | None:
    """The trainer's evaluation at `step` (else its last one) from workdir/metrics.jsonl."""
    evals = [r for r in metrics.read_metrics(workdir) if "eval_top1_accuracy" in r]
    at_step = [r for r in evals if r.get("step") == step]
    return (at_step or evals or [None])[-1]


def explain_rows(
    rows: Iterable[protocols.Row],
    config: Any,
    *,
    flip: bool,
    grid: int,
    image_size: int,
    trainer: Mapping[str, Any] | None = None,
) -> list[str]:
    """One line per row: what it averages, and how it relates to the trainer's figure."""
    rows = list(rows)
    flips = " and its mirror image" if flip else ""
    eval_scale = int(config.get("eval_scale", image_size))
    lines = []
    if trainer is not None:
        if config.get("train_eval") == "dense":
            seen = config.get("train_eval_scales") or (eval_scale,)
            how = f"the dense protocol at Q={','.join(str(q) for q in seen)}, no flip"
        else:
            how = f"one central {image_size}x{image_size} crop at Q={eval_scale}, no flip"
        lines.append(
            f"trainer's figure: {how}: top-1 error "
            f"{100 * (1 - trainer['eval_top1_accuracy']):.2f}% (step {trainer.get('step')})"
        )
    lo, hi = int(config.get("train_scale_min", 0)), int(config.get("train_scale_max", 0))
    trained = f"S={lo}" if lo == hi else f"S in [{lo}, {hi}]"
    for row in rows:
        q = ",".join(map(str, row.scales))
        if row.mode == "multi-crop & dense":
            what = "the soft-max average of the dense and multi-crop rows at these scales"
        elif len(row.scales) > 1:
            inside = lo and all(lo <= s <= hi for s in row.scales)
            what = (
                f"the soft-max average of the single-scale {row.mode} rows (the paper's "
                f"multi-scale test; trained at {trained}, these Q are "
                + ("inside the training range" if inside else "not all inside the training range")
                + ")"
            )
        elif row.mode == "dense":
            what = (
                f"the whole image rescaled to smallest side {q}{flips}, the network applied "
                "fully convolutionally, its class scores averaged over positions"
            )
            if int(row.scales[0]) == eval_scale:
                what += (
                    "; on an image with aspect ratio 1 and no flip it is the trainer's central crop"
                    + (", so the difference from the trainer's figure is the flip" if flip else "")
                )
        else:
            what = f"{grid}x{grid} crops of {image_size} px{flips} at smallest side {q}, averaged"
        lines.append(f"{row.label}: {what}")
    if lo and lo == hi and {tuple(row.scales) for row in rows} == {(lo,)}:
        lines.append(
            f"one test scale Q = S = {lo}: the paper's single-scale test of a net trained at a "
            "fixed S (its Table 3); its multi-scale test (Table 4) did not help this net, "
            "whose items fill their frame (README, 'make demo')"
        )
    return lines


# ---------------------------------------------------------------------------
# Stored results.


def result_key(args: argparse.Namespace, step: int, scales: Sequence[int], split: str) -> str:
    """The stored result's name: a hash of the checkpoint step, the arguments, the protocols."""
    fields = {
        "protocol_version": PROTOCOL_VERSION,
        "step": step,
        "scales": list(scales),
        "split": split,
        **{k: getattr(args, k) for k in ("which", "config", "dataset", "data_dir", "mode")},
        **{k: getattr(args, k) for k in ("flip", "grid", "limit", "batch_size")},
    }
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stored_path(args: argparse.Namespace, members, scales, split) -> str | None:
    """WORKDIR/eval/<key>.json for a single training run; None where nothing is stored.

    One process only: processes that disagreed on finding the file would wait
    for each other's error counts forever.
    """
    if not args.workdir or args.checkpoint or jax.process_count() > 1:
        return None
    step = members[0].step
    if step is None:
        return None
    return fileio.join(args.workdir, EVAL_DIR, result_key(args, step, scales, split) + ".json")


# ---------------------------------------------------------------------------
# Command line.


def paper_scales(config: Any) -> tuple[int, ...]:
    """The paper's multi-scale test set for a training config (PAPER.md, section 3).

    Jittered S in [S_min, S_max]: {S_min, (S_min + S_max) / 2, S_max}; fixed S:
    {S - 32, S, S + 32}. Scales below the training crop are dropped.
    """
    lo, hi = int(config.train_scale_min), int(config.train_scale_max)
    scales = (lo, (lo + hi) // 2, hi) if lo < hi else (lo - 32, lo, lo + 32)
    return tuple(q for q in scales if q >= int(config.image_size))


def default_scales(config: Any) -> tuple[int, ...]:
    """The config's `test_scales` where it names some, else the paper's (`paper_scales`)."""
    return tuple(int(q) for q in config.get("test_scales", ()) or ()) or paper_scales(config)


def default_batch_size(scales: Sequence[int]) -> int:
    """Images per network call: 8 at Q >= 224, more for smaller images, at most 256.

    A call then holds about as many pixels as 8 images at 224: on small
    images (Fashion-MNIST's 32) the per-call host work would otherwise cost
    as much as the network (benchmarks/RESULTS.md, "Demo").
    """
    return max(8, min(256, 8 * 224 * 224 // max(scales) ** 2))


def default_flip(config: Any) -> bool:
    """Mirror images by default only for a network that trained with them (config.random_flip)."""
    return bool(config.get("random_flip", True))


def _base_config(args: argparse.Namespace) -> Any:
    """The data config: the --workdir's config.json, --config FILE[:variant], the first
    --checkpoint that is a training run (its config.json), or the defaults (ImageNet)."""
    import ml_collections

    runs = [p for p in [args.workdir, *(args.checkpoint or [])] if p and checkpoints.is_run(p)]
    if runs and (runs[0] == args.workdir or not args.config):
        return ml_collections.ConfigDict(checkpoints.read_run_config(runs[0]))
    from vgg_jax import configuration

    path = args.config or os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    return configuration.load_config_file(
        path,
        "; pass --config configs/<experiment>.py (the data settings of the run) or --workdir "
        "of a training run",
    )


def load_network(
    path: str, which: str = "best"
) -> tuple[protocols.Member, checkpoints.ModelBundle]:
    """A weights name, a bundle directory or a training workdir (`pretrained.resolve`)."""
    bundle = _resolve_network(path, which)
    name = fileio.basename(path)
    return protocols.Member.from_bundle(bundle, name=name), bundle


def _resolve_network(path: str, which: str) -> checkpoints.ModelBundle:
    from vgg_jax import pretrained  # imports convert; only evaluations that name a network

    try:
        return pretrained.resolve(path, which)
    except (FileNotFoundError, pretrained.PretrainedError) as e:
        raise SystemExit(str(e)) from None


def load_members(args: argparse.Namespace) -> list[protocols.Member]:
    """The networks named by --workdir / --checkpoint (bundles or training workdirs)."""
    paths = ([args.workdir] if args.workdir else []) + list(args.checkpoint or [])
    if not paths:
        raise SystemExit("Name a network: --workdir RUN_DIR or --checkpoint BUNDLE_DIR.")
    members = []
    for path in paths:
        member, bundle = load_network(path, args.which)
        checkpoints.check_classifier(bundle, "evaluate")
        members.append(member)
    return members


def data_config(args: argparse.Namespace, members: Sequence[protocols.Member]) -> Any:
    """The data settings: the run's or --config's, with --dataset / --data-dir applied.

    num_classes and image_size are the networks' (the pipeline's label check, the
    smallest test scale). Normalisation is left alone: the pipeline hands over
    raw pixels (`normalize=False`) and each network normalises its own.
    """
    config = _base_config(args)
    with config.unlocked():
        if args.dataset:
            config.dataset = args.dataset
        if args.data_dir is not None:
            config.data_dir = args.data_dir
        config.num_classes = members[0].model.num_classes
        config.image_size = min(m.model.image_size for m in members)
    _check_networks_fit(members, config)
    return config


def _check_networks_fit(members: Sequence[protocols.Member], config: Any) -> None:
    """Every network's class and channel count against the data's (one clear error)."""
    from vgg_jax import input_pipeline

    source = input_pipeline.get_source(config)
    for member in members:
        checkpoints.check_fits_data(
            member.name,
            member.model.num_classes,
            member.variables,
            source.num_classes,
            source.channels,
            f"the dataset {config.dataset!r}",
        )


def dataset_batches(
    config: Any,
    split: str,
    scales: Sequence[int],
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[image_io.ImageSet, np.ndarray, np.ndarray]]:
    """Groups of `batch_size` examples of this process's share, rescaled to every Q.

    One pipeline stream gives each example at every Q (resampled from the
    original image), raw pixels in [0, 1]; it batches them itself when the
    dataset's images all have one size, else yields them one at a time. The
    pipeline pads the shares of all processes to the same length; the padding
    entries carry mask False. With config.cache, a complete pass of such a
    dataset is kept in memory for the next (`_Decoded`).
    """
    from vgg_jax import input_pipeline

    source = input_pipeline.get_source(config)
    share = input_pipeline.process_share(process_index, process_count)
    policy = input_pipeline.bad_image_policy(config)
    key = (split, tuple(scales), config.resize_method, policy, share)
    keep = bool(config.get("cache")) and source.image_size is not None
    kept = _decoded.get(key) if keep else None
    if kept is not None and kept.source is source:
        yield from kept.groups(batch_size)
        return
    pieces = input_pipeline.eval_dataset(
        config,
        split=split,
        mode="full",
        batch_size=batch_size,
        normalize=False,
        scales=tuple(scales),
        process_index=process_index,
        process_count=process_count,
    )
    seen: list[dict[str, Any]] = []  # every piece of the pass, while `keep`
    group: list[dict[str, Any]] = []
    count = 0  # examples in `group`
    for piece in pieces:
        group.append(piece)
        count += len(piece["label"])
        if keep:
            seen.append(piece)
        if count >= batch_size:
            yield _group_to_batch(group, scales)
            group, count = [], 0
    if group:
        yield _group_to_batch(group, scales)
    if keep and seen:  # the pass is complete (a consumer that stops early never gets here)
        decoded = _Decoded.of(source, seen, scales)
        if decoded.nbytes <= DECODED_LIMIT_BYTES:
            _decoded[key] = decoded


# The evaluation split, decoded once per process when the config keeps data in memory
# (config.cache) and the dataset's images all have one size: the trainer's validation
# every epoch and the test protocol after training read the same images, and decoding
# them (tf.data, 10,000 PNG records) cost as much as the demo's network (benchmarks/
# RESULTS.md, "in the trainer's process").
DECODED_LIMIT_BYTES = 1 << 30
_decoded: dict[tuple, _Decoded] = {}


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """One complete pass of `dataset_batches`: {Q: (N, H, W, C)}, labels and mask."""

    source: Any  # the input pipeline's source it was read from (a new source reads anew)
    images: dict[int, np.ndarray]
    labels: np.ndarray
    mask: np.ndarray

    @classmethod
    def of(cls, source: Any, pieces: list[dict[str, Any]], scales: Sequence[int]) -> _Decoded:
        images = {q: np.concatenate([p["images"][q] for p in pieces]) for q in scales}
        labels = np.concatenate([p["label"] for p in pieces])
        mask = np.concatenate([p["mask"] for p in pieces]).astype(bool)
        return cls(source, images, labels, mask)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.images.values())

    def groups(self, batch_size: int) -> Iterator[tuple[image_io.ImageSet, np.ndarray, np.ndarray]]:
        for start in range(0, len(self.labels), batch_size):
            rows = slice(start, start + batch_size)
            rescaled = {q: list(a[rows]) for q, a in self.images.items()}
            yield image_io.ImageSet(rescaled=rescaled), self.labels[rows], self.mask[rows]


def _group_to_batch(group: list[dict[str, Any]], scales: Sequence[int]):
    """Pipeline batches (one image each, or several of one size) as one ImageSet batch."""
    rescaled = {q: [im for g in group for im in g["images"][q]] for q in scales}
    labels = np.concatenate([g["label"] for g in group])
    mask = np.concatenate([g["mask"] for g in group]).astype(bool)
    return image_io.ImageSet(rescaled=rescaled), labels, mask


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m vgg_jax.evaluate",
        description="The paper's test protocols (dense, multi-crop, both; ensembles) on a split.",
    )
    p.add_argument("--workdir", help="training run directory (its best or latest checkpoint)")
    p.add_argument("--which", default="best", choices=("best", "latest"))
    p.add_argument(
        "--checkpoint",
        "--weights",
        dest="checkpoint",
        action="append",
        help="weights name (e.g. vgg16), model bundle or run directory (repeat: an ensemble)",
    )
    p.add_argument("--config", help="config FILE[:variant] with the data settings")
    p.add_argument("--dataset", help="override config.dataset")
    p.add_argument("--data-dir", help="override config.data_dir")
    p.add_argument("--split", help="split to evaluate (default config.eval_split)")
    p.add_argument("--mode", default="dense", choices=protocols.MODES)
    p.add_argument(
        "--scales",
        type=cli.integers(1),
        help="test scales Q, e.g. 256,384,512 (default: config.test_scales, else the paper's)",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add each image's mirror image (default: as the run trained, its random_flip; "
        "the paper trains and tests with flips)",
    )
    p.add_argument("--grid", type=cli.integer(1), default=5, help="multi-crop grid side (5: 5x5)")
    p.add_argument(
        "--limit", type=cli.integer(0), default=0, help="only the first N examples (per process)"
    )
    p.add_argument(
        "--batch-size",
        type=cli.integer(1),
        help="images per network call (default: 8 at the paper's scales, more for small "
        "images, `default_batch_size`)",
    )
    p.add_argument(
        "--output", type=cli.output_file("results.json"), help="write the results as JSON here"
    )
    p.add_argument(
        "--recompute", action="store_true", help="evaluate even if WORKDIR/eval has the result"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    members = load_members(args)
    config = data_config(args, members)
    if args.flip is None:
        args.flip = default_flip(config)
    scales = args.scales or default_scales(config)
    if args.batch_size is None:
        args.batch_size = default_batch_size(scales)
    split = args.split or config.eval_split
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    stored = stored_path(args, members, scales, split)
    if stored and not args.recompute and fileio.isfile(stored):
        summary = json.loads(fileio.read_text(stored))
        log(f"[evaluate] stored result {stored} (same checkpoint and arguments; --recompute "
            "evaluates again)")  # fmt: skip
        return _report(summary, args)
    try:
        protocol_set = protocols.ProtocolSet.build(
            members,
            args.mode,
            scales,
            args.flip,
            grid=args.grid,
            batch_size=args.batch_size,
        )
    except ValueError as e:
        raise SystemExit(str(e)) from None
    from vgg_jax import input_pipeline

    # This process's share (the progress line and --limit are per process).
    total = -(-input_pipeline.num_examples(config, split) // jax.process_count())
    total = min(total, args.limit) if args.limit else total
    start = time.time()
    results = evaluate_batches(
        protocol_set,
        # Groups of several network batches, so that images of one bucket batch together.
        dataset_batches(config, split, scales, GROUP_BATCHES * args.batch_size),
        limit=args.limit,
        total=total,
        progress=log if jax.process_index() == 0 else None,
    )
    names = " + ".join(m.name for m in members)
    image_size = min(m.model.image_size for m in members)
    trainer = trainer_figure(args.workdir, members[0].step) if args.workdir else None
    summary = {
        "networks": [m.name for m in members],
        "dataset": config.dataset,
        "split": split,
        "flip": args.flip,
        "grid": args.grid,
        "compiled_shapes": protocol_set.compiled_shapes,
        "seconds": round(time.time() - start, 2),
        "rows": [
            {
                "mode": row.mode,
                "scales": list(row.scales),
                "top1_error": c.top1_error,
                "top5_error": c.top5_error,
                "count": c.count,
            }
            for row, c in results.items()
        ],
        "table": format_table(results, f"{names} on {config.dataset}/{split}"),
        "explanation": explain_rows(
            results, config, flip=args.flip, grid=args.grid, image_size=image_size,
            trainer=trainer,
        ),  # fmt: skip
    }
    if stored and jax.process_index() == 0:
        fileio.makedirs(fileio.join(args.workdir, EVAL_DIR))
        fileio.write_text_atomic(stored, json.dumps(summary, indent=2))
    return _report(summary, args)


def _report(summary: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Prints the table and its explanation (process 0), writes --output."""
    if jax.process_index() == 0:
        print(summary["table"])
        print(f"compiled shapes (dense): {summary['compiled_shapes']}")
        for line in summary["explanation"]:
            print(line)
        if args.output:
            fileio.write_text_atomic(args.output, json.dumps(summary, indent=2))  # gs:// too
    return summary


if __name__ == "__main__":
    cli.run(main)
