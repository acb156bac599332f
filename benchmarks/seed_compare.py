"""vgg_jax against the seed's PyTorch script: same network, data, recipe and machine.

    python -m benchmarks.seed_compare --resolution 32 --epochs 2
    python -m benchmarks.seed_compare --resolution 224 --epochs 1   # on a GPU machine

Trains `configs/fashion_mnist.py` (the seed's setup, at `--resolution`) with
`vgg_jax.train`, then `benchmarks/seed_pytorch.py` (the seed script without
d2l) in its default layout and, unless `--no-channels-last`, channels-last
(not the seed's, but the faster PyTorch on CPU). Both read Debian's
Fashion-MNIST files and train the same number of epochs (or `--limit-steps`
steps per epoch) at batch 64, lr 0.01; test accuracy is over the whole
test split (or its first `--limit-test` batches of 64, the same images in both).

Training images/s: PyTorch's is the seed's own timer (step and metric update,
data loading excluded, as d2l's `train_ch6` measures). Ours is the median of
the trainer's logged intervals (`images_per_second` in metrics.jsonl) after
the first, which holds the compilation; the input pipeline runs in the
background there, so nothing is excluded but compilation. Prints a Markdown
table and appends one JSON line to `benchmarks/results/seed_compare_<date>.jsonl`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common
from benchmarks.quick_demo import load_config

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEED_BATCH = 64  # the seed script's batch, for training and testing


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit-steps", type=int, default=0, help="train steps per epoch (0: all)")
    p.add_argument(
        "--limit-test", type=int, default=0, help="test batches of 64, the seed's (0: all)"
    )
    p.add_argument("--data-dir", default="", help="Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--no-channels-last", action="store_true", help="skip PyTorch channels-last")
    p.add_argument("--output", default="", help="JSON lines file (default: benchmarks/results/)")
    return p.parse_args(argv)


def ours(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    from vgg_jax import input_pipeline, train
    from vgg_jax import metrics as metrics_lib

    config = load_config("seed")
    config.image_size = config.train_scale_min = config.train_scale_max = args.resolution
    config.eval_scale = args.resolution
    config.num_epochs = args.epochs
    config.eval_batch_size = 1000
    if args.limit_test:  # the same first images the seed script's first batches hold
        config.eval_split = f"test[:{args.limit_test * SEED_BATCH}]"
    config.manual_dir = args.data_dir
    config.progress_bar = False
    config.tensorboard = False
    spe = input_pipeline.steps_per_epoch(config)  # also prepares the dataset (not timed)
    if args.limit_steps:
        config.max_steps = args.epochs * min(args.limit_steps, spe)
        # tf.data fills its shuffle buffer before the first batch: the seed's 60,000 would
        # read the whole training set for a few steps (PyTorch's sampler reads nothing ahead).
        config.shuffle_buffer = min(config.shuffle_buffer, config.max_steps * SEED_BATCH)
    steps = train.total_steps(config, spe)
    config.log_every_steps = max(1, min(25, steps // 5))  # >= 5 intervals: one holds compilation
    start = time.perf_counter()
    result = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    records = metrics_lib.read_metrics(workdir)
    rates = [r["images_per_second"] for r in records if r.get("images_per_second")]
    if len(rates) < 2:
        raise SystemExit(
            "Too few logged intervals to time our trainer; raise --epochs or --limit-steps."
        )
    return {
        "impl": "vgg_jax",
        "images_per_s": statistics.median(rates[1:]),
        "wall_seconds": wall,
        "steps": int(result["step"]),
        "test_acc": float(result["eval_top1_accuracy"]),
    }


def pytorch(args: argparse.Namespace, channels_last: bool) -> dict[str, Any]:
    from benchmarks import seed_pytorch

    argv = ["--resolution", str(args.resolution), "--epochs", str(args.epochs)]
    argv += ["--limit-steps", str(args.limit_steps), "--limit-test", str(args.limit_test)]
    argv += ["--data-dir", args.data_dir or seed_pytorch.DEFAULT_DATA]
    argv += ["--channels-last"] if channels_last else []
    result = seed_pytorch.main(argv)
    result["impl"] = "seed_pytorch" + (" channels-last" if channels_last else "")
    return result


def table(rows: Sequence[dict[str, Any]]) -> str:
    seed = rows[1]["images_per_s"]
    lines = [
        "| implementation | train images/s | vs seed script | test top-1 |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["images_per_s"] / seed
        lines.append(
            f"| {r['impl']} | {r['images_per_s']:.0f} | {ratio:.2f}x | {r['test_acc']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from vgg_jax import backend

    # Both implementations run in this process, so both get the same allocator behaviour.
    reused = backend.reuse_host_buffers()
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="vgg_jax_seed_compare_") as workdir:
        rows = [ours(args, workdir)]
    rows.append(pytorch(args, channels_last=False))
    if not args.no_channels_last:
        rows.append(pytorch(args, channels_last=True))
    for r in rows:
        r.pop("history", None)
    print(table(rows))
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": common.machine(),
        "load": [load_before, common.load_average()],
        "reuse_host_buffers": reused,
        "command": "python -m benchmarks.seed_compare "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "resolution": args.resolution,
        "epochs": args.epochs,
        "limit_steps": args.limit_steps,
        "limit_test": args.limit_test,
        "rows": rows,
    }
    path = args.output or os.path.join(
        RESULTS_DIR, f"seed_compare_{datetime.date.today().isoformat()}.jsonl"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return rows


if __name__ == "__main__":
    main()
