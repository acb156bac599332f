"""Cost of using converted weights: conversion, single-crop prediction, the Appendix B descriptor.

    python benchmarks/pretrained.py [--model vgg16] [--width-divisor 1]

Random weights in torchvision's exact layout stand in for the real files
(which cannot be downloaded here): the arithmetic is the same. Prints wall
seconds and process CPU seconds (the latter is steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np
import skimage.data

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_convert import torchvision_state  # noqa: E402

from vgg_jax import checkpoints, convert, predict  # noqa: E402
from vgg_jax.features import image_descriptor  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--width-divisor", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fc = 4096 // args.width_divisor
    state = torchvision_state(args.model, args.width_divisor, fc_width=fc)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "w.safetensors")
        convert.write_torchvision_file(state, src)
        del state
        bundle, wall, cpu = timed(lambda: convert.convert_file(src))
        print(f"convert {args.model} safetensors -> arrays: {wall:.2f} s wall, {cpu:.2f} s CPU")
        _, wall, cpu = timed(lambda: checkpoints.save_bundle(os.path.join(d, "b"), bundle))
        print(f"save_bundle: {wall:.2f} s wall, {cpu:.2f} s CPU")
        bundle, wall, cpu = timed(lambda: checkpoints.load_bundle(os.path.join(d, "b")))
        print(f"load_bundle: {wall:.2f} s wall, {cpu:.2f} s CPU")

    image = skimage.data.chelsea().astype(np.float32) / 255.0  # 300 x 451
    crop = predict.central_crop(image, 224)[None]
    predict.single_crop_probabilities(bundle, crop)  # compile
    _, wall, cpu = timed(
        lambda: [predict.single_crop_probabilities(bundle, crop) for _ in range(args.repeats)]
    )
    print(
        f"single-crop predict, batch 1 (compile excluded): {args.repeats / wall:.2f} images/s "
        f"wall, {args.repeats / cpu:.2f} images per CPU-second"
    )
    image_descriptor(bundle, None, image)  # compile the three scales
    _, wall, cpu = timed(lambda: image_descriptor(bundle, None, image))
    print(
        f"descriptor, Q = 256/384/512 with flips, one 300x451 image (compile excluded): "
        f"{wall:.2f} s wall, {cpu:.2f} s CPU"
    )


if __name__ == "__main__":
    main()
