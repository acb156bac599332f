"""Images per second of the paper's test protocols, and the cost of 150-crop vs dense.

    python -m benchmarks.eval_protocols --model vgg16 --width-divisor 8 --fc-width 512

Protocols: single central crop (Q=256), dense at each of Q=256/384/512 (no flip),
dense over three scales with flips, 150-crop multi-crop (5x5 grid, flips, three
scales). Images are ImageNet-shaped (375x500 random pixels), rescaled to each Q
beforehand: the figures are network cost, compilation excluded (one warm-up
call per protocol). On a CPU the widths are reduced (stated in the output);
the ratio of 150-crop to dense cost depends little on the width.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import image_io, models
from vgg_jax import protocols as pr


def timed(evaluator, images: image_io.ImageSet, repeats: int) -> float:
    """Best wall time of `repeats` predictions (after a warm-up call that compiles)."""
    evaluator.predict(images)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluator.predict(images)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--width-divisor", type=int, default=8)
    p.add_argument("--fc-width", type=int, default=512)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shape", default="375x500", help="HxW of the test images")
    args = p.parse_args()

    model = models.create_model(
        args.model, width_divisor=args.width_divisor, fc_width=args.fc_width
    )
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    h, w = (int(v) for v in args.shape.split("x"))
    rng = np.random.default_rng(0)
    pixels = [rng.random((h, w, 3), dtype=np.float32) for _ in range(args.num_images)]
    images = image_io.ImageSet(pixels)
    for q in (256, 384, 512):
        images.at_scale(q)  # rescaling is not what is measured
    n = args.num_images
    protocols = {
        "single crop (Q=256, 224 centre)": pr.MultiCropEvaluator(
            model, variables, (256,), grid=1, flip=False, batch_size=n
        ),
        "dense Q=256": pr.DenseEvaluator(model, variables, (256,), flip=False, batch_size=n),
        "dense Q=384": pr.DenseEvaluator(model, variables, (384,), flip=False, batch_size=n),
        "dense Q=512": pr.DenseEvaluator(model, variables, (512,), flip=False, batch_size=n),
        "dense Q=256,384,512 + flips": pr.DenseEvaluator(
            model, variables, (256, 384, 512), flip=True, batch_size=n
        ),
        "150-crop (5x5, flips, Q=256,384,512)": pr.MultiCropEvaluator(
            model, variables, (256, 384, 512), grid=5, flip=True, batch_size=50
        ),
    }
    width = f"{args.model}, conv widths / {args.width_divisor}, FC width {args.fc_width}"
    print(f"{width}; {n} images of {h}x{w}; {jax.devices()[0].platform}, "
          f"{len(jax.devices())} device(s); best of {args.repeats}")  # fmt: skip
    seconds = {}
    for name, evaluator in protocols.items():
        seconds[name] = timed(evaluator, images, args.repeats)
        print(f"| {name} | {n / seconds[name]:.2f} images/s |", flush=True)
    ratio = seconds["150-crop (5x5, flips, Q=256,384,512)"] / seconds["dense Q=256,384,512 + flips"]
    print(f"| 150-crop / dense (3 scales + flips) time ratio | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
