"""Inference throughput of vgg_jax vs the PyTorch peer: single crop and dense evaluation.

    python -m benchmarks.eval_throughput --models D --image-size 224 --scales 256,384,512 \
        --batch 32 --dtype bfloat16

Modes, each timed interleaved with the PyTorch peer (eval mode, no grad):
* `crop`: logits for a batch of image_size crops (the single-crop evaluation).
* `dense Q`: the paper's dense evaluation of a QxQ image: the fully-convolutional
  class score map, spatially averaged, softmax.
From these, the cost per image of the paper's two multi-scale protocols:
dense over the three scales with horizontal flips (2 x sum over Q of 1/rate)
and 150-crop multi-crop (5x5 grid x 2 flips x 3 scales: 150 / crop rate),
and their ratio, for each implementation.

End to end (`--end-to-end WORKDIR`): the wall time of the evaluation command
itself (`python -m vgg_jax.evaluate --workdir WORKDIR --recompute`, start-up,
loading and compilation included) against the bare dense forward passes it
has to make: at each test scale Q, batches of the evaluator's rows (images
plus flips) at Q x Q (the demo's square images), timed on their own and
multiplied by the number of batches the split needs. Their ratio is the
evaluator's efficiency (1.0: it costs exactly its forward passes):

    python -m benchmarks.eval_throughput --end-to-end runs/fashion_mnist_quick

`--in-process` times the evaluation the way `make demo` makes it: inside the
process that trained (config `test_when_complete`), where the trainer's modules
are imported and its validation stream has read the split once; what is
timed is `vgg_jax.evaluate.main` itself: loading the best checkpoint, building
the protocols and their data stream, compiling and evaluating. The persistent
compilation cache is off, as in a first demo, so compilation counts in full.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from vgg_jax import backend, layers, models

MULTI_CROP_VIEWS = 150


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="A", help="comma-separated configs, e.g. A,D")
    p.add_argument("--width-divisor", type=int, default=1)
    p.add_argument("--fc-width", type=int, default=4096)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224, help="training resolution (crop size)")
    p.add_argument("--scales", default="256,384,512", help="dense-evaluation Q values; '' = none")
    p.add_argument("--batch", type=int, default=32, help="single-crop batch")
    p.add_argument("--dense-batch", type=int, default=0, help="dense batch (0: --batch)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--formulation", default="auto", help="comma-separated: auto, lax, fast")
    p.add_argument("--torch", default="auto", help="default, channels_last, auto or none")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json-out", default=None)
    p.add_argument("--end-to-end", default="", metavar="WORKDIR", help="time the command")
    p.add_argument("--limit", type=int, default=0, help="--end-to-end: first N test images")
    p.add_argument("--in-process", action="store_true", help="--end-to-end: as the trainer runs it")
    p.add_argument(
        "--eval-batch", type=int, help="--end-to-end: --batch-size (default: the evaluator's)"
    )
    return p.parse_args(argv)


def jax_runner(model, variables, mode: str, size: int, batch: int, formulation: str):
    """A runner for one mode ('crop' or 'dense') at one input size."""
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 1)), jnp.float32)
    x = jnp.broadcast_to(x, (batch, size, size, variables_channels(variables)))

    def crop(v, x):
        return jax.nn.softmax(model.apply(v, x))

    def dense(v, x):
        return jax.nn.softmax(model.apply(v, x, method="score_map").mean(axis=(1, 2)))

    with layers.use_formulation(formulation):
        start = time.perf_counter()
        compiled = jax.jit(crop if mode == "crop" else dense).lower(variables, x).compile()
        compile_s = time.perf_counter() - start

    def run(steps: int) -> None:
        out = None
        for _ in range(steps):
            out = compiled(variables, x)
        if out is not None:
            out.block_until_ready()

    return common.Runner(
        f"vgg_jax[{formulation}]", batch, run, {"compile_s": compile_s, "formulation": formulation}
    )


def variables_channels(variables) -> int:
    return int(variables["params"]["features"]["conv1_1"]["kernel"].shape[2])


def torch_runner(net, device, variant: str, mode: str, size: int, batch: int, amp):
    import torch

    from benchmarks import torch_peer

    cl = variant == "channels_last"
    net = torch_peer.to_layout(copy.deepcopy(net), cl)  # .to() is in place: one copy each
    channels = net.features[0].in_channels
    x = torch_peer.to_layout(torch.rand((batch, channels, size, size), device=device), cl)
    forward: Callable = net if mode == "crop" else (lambda t: net.score_map(t).mean(dim=(2, 3)))

    def run(steps: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, amp, enabled=amp is not None):
            for _ in range(steps):
                torch.softmax(forward(x), dim=-1)
        torch_peer.synchronize(device)

    return common.Runner(f"torch[{variant}]", batch, run, {"torch": torch.__version__})


def torch_net(name: str, args: argparse.Namespace):
    import torch

    from benchmarks import torch_peer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_peer.configure(device)
    torch.manual_seed(0)
    net = torch_peer.TorchVGG(
        name, args.num_classes, args.width_divisor, args.fc_width, args.image_size, args.channels
    )
    amp = torch.bfloat16 if (device.type == "cuda" or args.dtype == "bfloat16") else None
    return net.to(device).eval(), device, amp


def torch_variants(spec: str, on_gpu: bool) -> list[str]:
    if spec == "none":
        return []
    if spec == "auto":
        return ["channels_last"] if on_gpu else ["default", "channels_last"]
    return common.split_list(spec)


def bare_dense_seconds(member, scales, rows: int, calls: int, repeats: int) -> dict[int, float]:
    """{Q: seconds per call} of the jitted dense forward on `rows` Q x Q images (median)."""
    model, variables = member.model, jax.device_put(dict(member.variables))
    channels = variables_channels(variables)

    @jax.jit
    def dense(v, x):
        scores = model.apply(v, member.preprocess(x), method="score_map")
        return jax.nn.softmax(scores.mean(axis=(1, 2)))

    out = {}
    for q in scales:
        x = jnp.asarray(np.random.default_rng(0).random((rows, q, q, channels), np.float32))
        dense(variables, x).block_until_ready()  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                y = dense(variables, x)
            y.block_until_ready()
            times.append((time.perf_counter() - start) / calls)
        out[q] = float(np.median(times))
    return out


def like_the_trainer(workdir: str, member) -> None:
    """This process as the trainer leaves it: its modules imported, its last validation run.

    The validation is the trainer's own (`train.central_figures` or `dense_figures`, as the
    run's config says) on the best variables. No persistent compilation cache (a first
    demo compiles the test shapes anew).
    """
    import types

    import ml_collections

    from vgg_jax import checkpoints, train

    jax.config.update("jax_compilation_cache_dir", None)
    config = ml_collections.ConfigDict(checkpoints.read_run_config(workdir))
    data = train.pipeline_data()
    variables = member.variables
    state = types.SimpleNamespace(
        params=variables["params"], batch_stats=variables.get("batch_stats", {})
    )
    if config.train_eval == "dense":
        train.dense_figures(config, data, train.create_model(config), state)
    else:
        for _ in data.eval_dataset(config):
            pass


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation command's wall time against the bare forward passes it makes."""
    import math
    import os
    import subprocess
    import sys

    from vgg_jax import evaluate, input_pipeline

    workdir = args.end_to_end
    member, _ = evaluate.load_network(workdir)
    config = evaluate.data_config(evaluate.parse_args(["--workdir", workdir]), [member])
    scales = evaluate.default_scales(config)
    n = input_pipeline.num_examples(config, config.eval_split)
    n = min(n, args.limit) if args.limit else n
    views = 2 if evaluate.default_flip(config) else 1  # every image, and its flip if trained so
    batch = args.eval_batch or evaluate.default_batch_size(scales)
    rows = views * batch
    per_call = bare_dense_seconds(member, scales, rows, max(args.steps, 10), args.repeats)
    bare = sum(t * math.ceil(views * n / rows) for t in per_call.values())
    flags = ["--workdir", workdir, "--recompute", "--batch-size", str(batch)]
    flags += ["--limit", str(args.limit)] if args.limit else []
    if args.in_process:
        like_the_trainer(workdir, member)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    if args.in_process:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluate.main(flags)
    else:
        command = [sys.executable, "-m", "vgg_jax.evaluate", *flags]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    record = {
        "bench": "eval_end_to_end",
        "in_process": args.in_process,
        "workdir": workdir,
        "images": n,
        "scales": list(scales),
        "rows": rows,
        "bare_forward_s": bare,
        "bare_ms_per_call": {q: 1e3 * t for q, t in per_call.items()},
        "command_s": wall,
        "images_per_s": n / wall,
        "efficiency": bare / wall,
        "load_avg": (load_before + os.getloadavg()[0]) / 2,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    common.emit_json(record, args.json_out)
    where = "in the trainer's process" if args.in_process else "end to end"
    print(
        f"{where}: {wall:.1f} s for {n} images ({n / wall:.0f} images/s), bare dense forward "
        f"at the same shapes {bare:.1f} s: {bare / wall:.2f}x (load {record['load_avg']:.1f})"
    )
    return record


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.end_to_end:
        return [end_to_end(args)]
    # Both peers share this process, so both get the same allocator behaviour.
    reused = backend.reuse_host_buffers()
    device = jax.devices()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    variants = torch_variants(args.torch, device.platform == "gpu")
    modes = [("crop", args.image_size, args.batch)] + [
        ("dense", int(q), args.dense_batch or args.batch) for q in common.split_list(args.scales)
    ]
    records: list[dict[str, Any]] = []
    for name in common.split_list(args.models):
        model = models.create_model(
            name,
            args.num_classes,
            width_divisor=args.width_divisor,
            fc_width=args.fc_width,
            image_size=args.image_size,
            dtype=jnp.dtype(args.dtype),
            dropout_rate=0.0,
        )
        shape = (1, args.image_size, args.image_size, args.channels)
        variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))
        net, tdev, amp = torch_net(name, args) if variants else (None, None, None)
        for mode, size, batch in modes:
            runners = [
                jax_runner(model, variables, mode, size, batch, f)
                for f in common.split_list(args.formulation)
            ]
            runners += [torch_runner(net, tdev, v, mode, size, batch, amp) for v in variants]
            loads = common.measure(runners, args.steps, args.repeats, args.warmup)
            best = max((r.images_per_second() for r in runners if "torch" in r.name), default=None)
            for r in runners:
                ips = r.images_per_second()
                record = {
                    "bench": "eval",
                    "mode": mode,
                    "impl": r.name,
                    "model": models.get_spec(name).letter,
                    "width_divisor": args.width_divisor,
                    "fc_width": args.fc_width,
                    "channels": args.channels,
                    "image_size": args.image_size,
                    "input_size": size,
                    "batch": batch,
                    "dtype": args.dtype,
                    "images_per_s": ips,
                    "images_per_s_best": r.best_images_per_second(),
                    "step_s_all": r.seconds,
                    "vs_torch_best": ips / best if best else None,
                    "device": device.device_kind,
                    "jax_cpu_flag": backend.cpu_flag_active(),
                    "reuse_host_buffers": reused,
                    "load_avg": float(np.median(loads)),
                    "date": date,
                    **r.info,
                }
                records.append(record)
                common.emit_json(record, args.json_out)
    print()
    print(eval_table(records))
    protocols = protocol_costs(records)
    if protocols:
        print()
        print(protocols)
    return records


def eval_table(records: list[dict[str, Any]]) -> str:
    header = ["model", "mode", "impl", "input", "batch", "dtype", "images/s", "best"]
    header.append("vs faster torch")
    rows = [
        [
            f"{r['model']} /{r['width_divisor']} fc{r['fc_width']}",
            r["mode"],
            r["impl"],
            r["input_size"],
            r["batch"],
            r["dtype"],
            r["images_per_s"],
            r["images_per_s_best"],
            r["vs_torch_best"],
        ]
        for r in records
    ]
    return common.markdown_table(header, rows)


def protocol_costs(records: list[dict[str, Any]]) -> str:
    """Seconds per image of dense 3-scale + flips vs 150-crop, per model and impl."""
    rows = []
    keys = sorted({(r["model"], r["impl"]) for r in records})
    for model, impl in keys:
        mine = [r for r in records if (r["model"], r["impl"]) == (model, impl)]
        crop = [r["images_per_s"] for r in mine if r["mode"] == "crop"]
        dense = [r["images_per_s"] for r in mine if r["mode"] == "dense"]
        if not crop or not dense:
            continue
        dense_s = 2 * sum(1 / d for d in dense)  # every scale, plus its flip
        crops_s = MULTI_CROP_VIEWS / crop[0]
        rows.append([model, impl, len(dense), dense_s, crops_s, crops_s / dense_s])
    if not rows:
        return ""
    header = ["model", "impl", "scales", "dense+flip s/img", "150-crop s/img", "crop/dense"]
    return common.markdown_table(header, rows)


if __name__ == "__main__":
    main()
