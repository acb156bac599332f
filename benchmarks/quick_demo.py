"""Wall time and test accuracy of the quick Fashion-MNIST variant (issue 6's goal).

    python -m benchmarks.quick_demo [--variant quick] [--workdir DIR] [--override key=value ...]

Set-up (preparing the dataset once, importing) is excluded; the first
compilation is included, as a new user would see it. Prints one Markdown table row
for benchmarks/RESULTS.md. Starts from an empty workdir every time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str):
    from vgg_jax import configuration

    return configuration.load_config_file(f"{ROOT}/configs/fashion_mnist.py:{variant}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="quick")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--override", action="append", default=[], help="config key=value")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from vgg_jax import backend, input_pipeline, train

    backend.reuse_host_buffers()  # as `python -m vgg_jax.train` does

    config = load_config(args.variant)
    for item in args.override:
        key, value = item.split("=", 1)
        config[key] = (
            type(config[key])(value)
            if not isinstance(config[key], bool)
            else (value.lower() in ("1", "true", "yes"))
        )
    workdir = args.workdir or tempfile.mkdtemp(prefix="vgg_jax_quick_")
    shutil.rmtree(workdir, ignore_errors=True)
    # Set-up, excluded: the dataset is prepared (once per machine) and opened.
    input_pipeline.steps_per_epoch(config)
    start = time.perf_counter()
    result = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    acc = result.get("eval_top1_accuracy", float("nan"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"| fashion_mnist:{args.variant} test top-1 after {config.num_epochs} epochs | "
        f"{acc:.4f} in {wall:.0f} s wall | {datetime.date.today()} | "
        f"{os.cpu_count()}-core CPU ({platform.machine()}, load avg {load:.1f}) | "
        f"`python -m benchmarks.quick_demo --variant {args.variant}"
        + "".join(f" --override {o}" for o in args.override)
        + "` |"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
