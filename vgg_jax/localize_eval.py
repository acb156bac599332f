"""Localisation's test protocols and command line (the paper's Appendix A; `vgg_jax.localize`).

Protocol (2), fully-fledged: every localisation net applied densely (FC layers
as convolutions) to the whole image at several scales, one box per position
and class; the classifier's score for that class at that position rates it;
boxes of all nets and scales are merged greedily per class (`boxes.merge`);
the top-5 classes of the classifier each get their best merged box; top-5
localisation error by the ILSVRC criterion. Protocol (1), the central crop,
is `localize.evaluate_crops` (training evaluates with it after each epoch).

The commands (`python -m vgg_jax.localize ...` runs `main` here):

    python -m vgg_jax.localize train --config CONFIG --workdir RUN
    python -m vgg_jax.localize evaluate --config CONFIG --workdir RUN [--workdir RUN2]
    python -m vgg_jax.localize IMAGE.png --workdir RUN --output boxes.png
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax import (
    boxes,
    checkpoints,
    cli,
    configuration,
    evaluate,
    fileio,
    image_io,
    localize,
    protocols,
    train,
)
from vgg_jax import localization_data as ldata

# ---------------------------------------------------------------------------
# Protocol (2): dense application, merging, top-5 localisation error.


@dataclasses.dataclass
class Localizer:
    """A trained localisation net and how to read its outputs."""

    member: protocols.Member
    head: str
    num_object_classes: int
    class_names: tuple[str, ...]
    classifier: str = ""

    @classmethod
    def load(cls, path: str) -> Localizer:
        member, bundle = evaluate.load_network(path)
        info = bundle.metadata.get("localization")
        if not info:
            raise ValueError(
                f"{path} is not a localisation net (its bundle has no 'localization' metadata); "
                "train one with `python -m vgg_jax.localize train`."
            )
        return cls(
            member,
            info["head"],
            int(info["num_object_classes"]),
            tuple(info["class_names"]),
            info.get("classifier", ""),
        )

    def boxes_for(self, outputs: np.ndarray, cls: int) -> np.ndarray:
        """(..., 4) (cx, cy, w, h) of class `cls` from (..., outputs) maps."""
        return outputs[..., :4] if self.head == "scr" else outputs[..., 4 * cls : 4 * cls + 4]


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: int
    box: np.ndarray  # corner box normalised to the image
    rating: float  # the merged group's summed class scores
    probability: float  # the classifier's image-level probability of the class


def position_boxes(params: np.ndarray, image_size: int, rescaled_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, 4) (cx, cy, w, h) per score-map position -> corner boxes in the image's frame.

    Position (i, j) saw the image_size window at 32 * (i, j) of the image rescaled to rescaled_hw.
    """
    h, w = params.shape[:2]
    corners = boxes.decode(params)
    stride = protocols.NETWORK_STRIDE
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rh, rw = rescaled_hw
    top, left = rows * stride / rh, cols * stride / rw
    scale = np.array([image_size / rh, image_size / rw] * 2, np.float32)
    offset = np.stack([top, left, top, left], axis=-1)
    return boxes.clip(corners * scale + offset)


def dense_localize(
    localizers: Sequence[Localizer],
    classifier: protocols.Member,
    images: Sequence[np.ndarray],
    scales: Sequence[int],
    top: int = 5,
    merge_iou: float = 0.5,
    batch_size: int = 8,
) -> list[list[Prediction]]:
    """Protocol (2) for each image: its top classes, each with its best merged box.

    `images`: HxWxC, uint8 or floats in [0, 1] (`image_io.unit_float`).
    """
    size = classifier.model.image_size
    for loc in localizers:
        if loc.member.model.image_size != size:
            raise ValueError(
                f"The localisation net {loc.member.name} has image_size "
                f"{loc.member.model.image_size}, the classifier {size}: their score-map "
                "positions must coincide; use nets trained at the same image_size."
            )
    image_set = image_io.as_image_set([image_io.unit_float(im) for im in images])

    def maps_of(member: protocols.Member) -> list[dict[int, np.ndarray]]:
        dense = protocols.DenseEvaluator(
            member.model,
            member.variables,
            scales,
            flip=False,
            preprocess=member.preprocess,
            batch_size=batch_size,
        )
        return dense.score_maps(image_set)

    cls_maps = maps_of(classifier)
    loc_maps = [maps_of(loc.member) for loc in localizers]
    results = []
    for i, image in enumerate(image_set.images):
        probs = {q: protocols.softmax(m) for q, m in cls_maps[i].items()}
        image_probs = np.mean(
            [protocols.softmax(m.mean(axis=(0, 1))) for m in cls_maps[i].values()],
            axis=0,
        )
        classes = np.argsort(-image_probs, kind="stable")[:top]
        preds = []
        for c in classes:
            cand, scores = [], []
            for loc, maps in zip(localizers, loc_maps, strict=True):
                for q, m in maps[i].items():
                    hw = image_io.rescaled_size(image.shape[0], image.shape[1], q)
                    cand.append(position_boxes(loc.boxes_for(m, int(c)), size, hw).reshape(-1, 4))
                    scores.append(probs[q][..., c].reshape(-1))
            merged, ratings = boxes.merge(np.concatenate(cand), np.concatenate(scores), merge_iou)
            preds.append(Prediction(int(c), merged[0], float(ratings[0]), float(image_probs[c])))
        results.append(preds)
    return results


def dense_errors(
    predictions: Sequence[Sequence[Prediction]], data: ldata.LocalizationSet
) -> dict[str, float]:
    """Top-1 and top-5 localisation error and the classifier's top-5 classification error."""
    as_pairs = [[(p.label, p.box) for p in preds] for preds in predictions]
    cls_wrong = [
        not set(int(p.label) for p in preds[:5]) & set(map(int, labels))
        for preds, labels in zip(predictions, data.labels, strict=True)
    ]
    return {
        "top1_loc_error": boxes.localization_error(as_pairs, data.labels, data.boxes, top=1),
        "top5_loc_error": boxes.localization_error(as_pairs, data.labels, data.boxes, top=5),
        "top5_cls_error": float(np.mean(cls_wrong)),
    }


# ---------------------------------------------------------------------------
# Command line: train, evaluate, and one image.


def evaluate_localizers(
    config: ml_collections.ConfigDict,
    workdirs: Sequence[str],
    classifier: str = "",
    num_images: int = 0,
    scales: Sequence[int] = (),
) -> dict[str, Any]:
    """Protocol (1) per net and protocol (2) for the union of the nets on the evaluation split."""
    loc_cfg = config.localization
    localizers = [Localizer.load(w) for w in workdirs]
    classifier = classifier or localizers[0].classifier
    if not classifier:
        raise ValueError("No classifier to rate boxes: pass --classifier RUN_OR_BUNDLE.")
    cls_member, _ = evaluate.load_network(classifier)
    crops, targets, labels = localize.eval_crops(config)
    report: dict[str, Any] = {"central_crop": {}, "classifier": classifier}
    for w, loc in zip(workdirs, localizers, strict=True):
        outputs = localize.predict_outputs(
            loc.member.model, loc.member.variables, loc.member.preprocess, crops
        )
        pred = np.asarray(localize.class_boxes(jnp.asarray(outputs), jnp.asarray(labels), loc.head))
        error, mean_iou = localize.central_crop_error(pred, targets)
        report["central_crop"][w] = {"loc_error": error, "mean_iou": mean_iou, "head": loc.head}
    bundle_results = checkpoints.load_bundle(workdirs[0]).metadata.get("results", {})
    mean_size = bundle_results.get("mean_box_size") or localize.mean_target_size(config)
    fixed_boxes = np.tile(localize.centred_box(mean_size), (len(targets), 1))
    baseline, _ = localize.central_crop_error(fixed_boxes, targets)
    report["central_crop"]["fixed centred box"] = {"loc_error": baseline}
    n = int(num_images or loc_cfg.num_dense_eval)
    data = localize.load_set(
        config, config.eval_split, n, loc_cfg.test_canvas_size, loc_cfg.test_scale_range,
        localize.DENSE_SALT,
    )  # fmt: skip
    scales = tuple(scales or loc_cfg.dense_scales)
    t0 = time.perf_counter()
    preds = dense_localize(
        localizers, cls_member, data.images, scales, merge_iou=float(loc_cfg.merge_iou)
    )
    report["dense"] = {**dense_errors(preds, data), "images": len(data), "scales": list(scales)}
    report["dense"]["seconds"] = time.perf_counter() - t0
    # The same classes with a fixed box (the image's centre, the training set's mean size).
    fixed = boxes.clip(boxes.decode(localize.centred_box(mean_size)))
    fixed_preds = [[dataclasses.replace(p, box=fixed) for p in ps] for ps in preds]
    report["dense"]["fixed_box_top5_loc_error"] = dense_errors(fixed_preds, data)["top5_loc_error"]
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "Protocol (1): central crop, ground-truth class given",
        "| net | head | error | mean IoU |",
        "|---|---|---|---|",
    ]
    for name, r in report["central_crop"].items():
        iou = f"{r['mean_iou']:.3f}" if "mean_iou" in r else "-"
        lines.append(f"| {name} | {r.get('head', '-')} | {r['loc_error']:.3f} | {iou} |")
    d = report["dense"]
    lines += [
        "",
        f"Protocol (2): dense at Q={d['scales']}, nets merged, {d['images']} images",
        f"top-5 localisation error {d['top5_loc_error']:.3f} (top-1 {d['top1_loc_error']:.3f}); "
        f"same classes with a fixed centred box {d['fixed_box_top5_loc_error']:.3f}; "
        f"classification top-5 error {d['top5_cls_error']:.3f}",
    ]
    return "\n".join(lines)


def draw(
    image: np.ndarray, predictions: Sequence[Prediction], names: Sequence[str], output: str
) -> str:
    """The image with the predicted boxes, class names and probabilities, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig = Figure(figsize=(6, 6 * h / w))
    ax = fig.add_axes((0, 0, 1, 1))
    shown = image[..., 0] if image.shape[-1] == 1 else image
    ax.imshow(np.clip(shown, 0, 1), cmap="gray" if shown.ndim == 2 else None)
    colours = ("#ff3b30", "#ffcc00", "#34c759", "#0a84ff", "#bf5af2")
    for k, p in reversed(list(enumerate(predictions))):
        ymin, xmin, ymax, xmax = p.box * np.array([h, w, h, w])
        colour = colours[k % len(colours)]
        ax.add_patch(
            Rectangle((xmin - 0.5, ymin - 0.5), xmax - xmin, ymax - ymin, fill=False,
                      edgecolor=colour, linewidth=3 if k == 0 else 1.5)
        )  # fmt: skip
        ax.text(xmin, ymin - 0.5, f"{names[p.label]} {100 * p.probability:.0f}%", color="black",
                fontsize=11 if k == 0 else 8, va="bottom", backgroundcolor=colour)  # fmt: skip
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    fileio.make_parent_dirs(output)
    fig.savefig(output, dpi=100)
    return output


def image_main(argv: Sequence[str]) -> str:
    """`python -m vgg_jax.localize IMAGE --workdir RUN [--workdir RUN2]`: draws the merged boxes."""
    p = cli.ArgumentParser(
        prog="python -m vgg_jax.localize",
        description="Localise objects in an image (dense, merged boxes) and draw them (PNG).",
        epilog=COMMANDS,
    )
    p.add_argument("image", help="JPEG/PNG file")
    p.add_argument("--workdir", action="append", required=True,
                   help="localisation run (repeat for a union of nets)")  # fmt: skip
    p.add_argument("--classifier", help="net that rates the boxes (default: the run's)")
    p.add_argument(
        "--scales",
        type=cli.integers(1),
        help="test scales Q, comma-separated (default: the run's)",
    )
    p.add_argument(
        "--top", type=cli.integer(1), default=5, help="number of classes (boxes) to draw"
    )
    p.add_argument(
        "--output",
        type=cli.output_file("boxes.png"),
        help="PNG to write (default: IMAGE_boxes.png here)",
    )
    args = p.parse_args(argv)
    try:
        localizers = [Localizer.load(w) for w in args.workdir]
        classifier = args.classifier or localizers[0].classifier
        if not classifier:
            raise ValueError("No classifier recorded in the run: pass --classifier.")
        member, _ = evaluate.load_network(classifier)
        channels = checkpoints.input_channels(member.variables)
        image = image_io.load_image(args.image, channels)
        info = checkpoints.load_bundle(args.workdir[0]).metadata["localization"]
        scales = args.scales or info["dense_scales"]
        scales = [q for q in scales if q >= member.model.image_size] or [member.model.image_size]
        (preds,) = dense_localize(
            localizers, member, [image], scales, top=max(1, args.top), merge_iou=info["merge_iou"]
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"Error: {e}") from None
    names = localizers[0].class_names
    output = args.output or os.path.splitext(os.path.basename(args.image))[0] + "_boxes.png"
    for pred in preds:
        box = ", ".join(f"{v:.3f}" for v in pred.box)
        print(f"{names[pred.label]}: {100 * pred.probability:.1f}%  box (ymin, xmin, ymax, xmax) "
              f"= ({box}), rating {pred.rating:.2f}")  # fmt: skip
    draw(image, preds, names, output)
    print(f"wrote {output}")
    return output


def _absl_main(argv: list[str]) -> None:
    from absl import flags
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO

    command = argv[1] if len(argv) > 1 else ""
    f = flags.FLAGS
    config = f.config
    try:
        if command == "train":
            if len(f.workdir) != 1:
                raise ValueError("train takes one --workdir.")
            train.use_compilation_cache()
            localize.train_and_evaluate(config, f.workdir[0])
        else:
            report = evaluate_localizers(
                config, f.workdir, f.classifier, f.num_images,
                [int(q) for q in f.scales.split(",")] if f.scales else (),
            )  # fmt: skip
            print(format_report(report))
            if f.output:
                fileio.write_text_atomic(f.output, json.dumps(report, indent=2))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"Error: {e}")


COMMANDS = """The other commands (each with --help):
  python -m vgg_jax.localize train --config CONFIG --workdir RUN
  python -m vgg_jax.localize evaluate --config CONFIG --workdir RUN [--workdir RUN2]
"""

USAGE = """
usage: python -m vgg_jax.localize train --config FILE.py[:variant] --workdir RUN
       python -m vgg_jax.localize evaluate --config FILE.py[:variant] --workdir RUN [...]

train     trains a localisation net (configs/localize_fashion_mnist.py: the default SCR head,
          :pcr, :classifier for the net that rates the boxes) into RUN; rerunning resumes
evaluate  the paper's localisation protocols on the config's evaluation split

--config        the localisation config; --config.FIELD=VALUE overrides one field
--workdir       the run (evaluate: repeat it for the union of several nets' boxes)
--classifier    evaluate: the classification run that rates the boxes (default: the run's)
--num_images    evaluate: images for the dense protocol (0: the config's num_dense_eval)
--scales        evaluate: test scales Q, comma-separated (default: the run's)
--output        evaluate: also write the report as JSON here
"""


def _refuse_a_misspelt_command(argv: Sequence[str]) -> None:
    """'localize trian --config ...' ends naming the command, not argparse's complaint
    about the flags of the image mode it fell into."""
    import difflib

    word = argv[1] if len(argv) > 1 else ""
    if word in ("train", "evaluate") or word.startswith("-") or os.path.exists(word):
        return
    near = difflib.get_close_matches(word, ("train", "evaluate"), n=1, cutoff=0.6)
    if near:
        print(
            f"Bad command line: unknown command {word!r}; did you mean {near[0]!r}? "
            "(python -m vgg_jax.localize --help lists the commands).",
            file=sys.stderr,
        )
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    _refuse_a_misspelt_command(argv)
    if len(argv) > 1 and argv[1] in ("train", "evaluate"):
        from absl import app, flags
        from ml_collections import config_flags

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        config_flags.DEFINE_config_file("config", None, "Localisation config file[:variant].")
        flags.DEFINE_multi_string("workdir", None, "Run directory (evaluate: repeat for a union).")
        flags.DEFINE_string("classifier", "", "evaluate: the net that rates boxes.")
        flags.DEFINE_integer("num_images", 0, "evaluate: images for protocol (2).")
        flags.DEFINE_string("scales", "", "evaluate: test scales Q, comma-separated.")
        flags.DEFINE_string("output", "", "evaluate: write the report as JSON here.")
        flags.mark_flags_as_required(["config", "workdir"])
        app.run(_absl_main, argv=argv, flags_parser=configuration.flags_parser(USAGE))
    else:
        image_main(argv[1:])
