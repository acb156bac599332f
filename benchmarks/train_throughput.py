"""Training throughput of vgg_jax vs the PyTorch peer, same architecture, same batch, same run.

    python -m benchmarks.train_throughput --models A,D --image-size 224 --batch 64 \
        --dtype bfloat16 --torch auto

Per config: images/s per device after warm-up (median over repeats of
`--steps` device-synchronised steps), model-FLOP utilisation (images/s x
6 x multiply-adds from `vgg_jax.models.model_cost` / peak), compile time,
peak device memory where the backend reports it, and the PyTorch peer eager
(AMP bf16 + channels-last on GPU; float32 default layout and channels-last on
CPU), all measured interleaved. Prints a JSON line per result and a Markdown
table; the ratio is ours / the faster PyTorch variant.

The train step is self-contained on purpose (optax SGD + momentum, softmax
cross-entropy, dropout, jit with donated state): it measures the model and its
layers, not the trainer.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from vgg_jax import backend, layers, models


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="A", help="comma-separated configs, e.g. A,B,C,D,E")
    p.add_argument("--width-divisor", type=int, default=1)
    p.add_argument("--fc-width", type=int, default=4096)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--channels", type=int, default=3, help="input channels (1 for Fashion-MNIST)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64, help="batch per device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--formulation",
        default="auto",
        help="vgg_jax layer formulations to time, comma-separated: auto, lax, fast",
    )
    p.add_argument(
        "--torch",
        default="auto",
        help="PyTorch variants, comma-separated: default, channels_last, or auto "
        "(GPU: channels_last with AMP; CPU: both float32), or none",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    p.add_argument("--json-out", default=None, help="append the JSON lines to this file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- JAX


def jax_runner(name: str, args: argparse.Namespace, formulation: str) -> common.Runner:
    """Builds, compiles (timed) and wraps one jitted training step."""
    dtype = jnp.dtype(args.dtype)
    model = models.create_model(
        name,
        args.num_classes,
        width_divisor=args.width_divisor,
        fc_width=args.fc_width,
        image_size=args.image_size,
        dtype=dtype,
    )
    tx = optax.sgd(0.01, momentum=0.9)
    shape = (args.batch, args.image_size, args.image_size, args.channels)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32)
    dropout_key = jax.random.key(1)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with layers.use_formulation(formulation):
        params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
        opt_state = tx.init(params)
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile()
        compile_s = time.perf_counter() - start
    state = [params, opt_state]

    def run(steps: int) -> None:
        loss = None
        for _ in range(steps):
            state[0], state[1], loss = compiled(state[0], state[1], x, y)
        if loss is not None:
            loss.block_until_ready()

    info: dict[str, Any] = {"compile_s": compile_s, "formulation": formulation}
    info.update(memory_info(compiled))
    return common.Runner(f"vgg_jax[{formulation}]", args.batch, run, info)


def memory_info(compiled: Any) -> dict[str, Any]:
    """Compiled temp size (any backend); the device's peak bytes where reported."""
    out: dict[str, Any] = {}
    try:
        analysis = compiled.memory_analysis()
        out["temp_bytes"] = int(analysis.temp_size_in_bytes)
    except Exception:  # backends without memory analysis
        pass
    if "peak_bytes_in_use" in (jax.devices()[0].memory_stats() or {}):
        # Read after the timed steps; shared by every JAX runner in the process.
        out["peak_bytes_fn"] = lambda: int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    return out


# ----------------------------------------------------------------------- PyTorch


def torch_variants(spec: str, on_gpu: bool) -> list[str]:
    if spec == "none":
        return []
    if spec == "auto":
        return ["channels_last"] if on_gpu else ["default", "channels_last"]
    return common.split_list(spec)


def torch_runner(name: str, args: argparse.Namespace, variant: str) -> common.Runner:
    import torch

    from benchmarks import torch_peer

    if variant not in ("default", "channels_last"):
        raise ValueError(f"Unknown torch variant {variant!r}; use default or channels_last.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_peer.configure(device)
    torch.manual_seed(0)
    net = torch_peer.TorchVGG(
        name,
        args.num_classes,
        args.width_divisor,
        args.fc_width,
        args.image_size,
        args.channels,
    ).to(device)
    cl = variant == "channels_last"
    net = torch_peer.to_layout(net, cl)
    # AMP bf16 on GPU whatever --dtype says is what a PyTorch user would run; on
    # CPU float32 as the seed script runs, or bf16 autocast when asked for.
    amp = torch.bfloat16 if (device.type == "cuda" or args.dtype == "bfloat16") else None
    step = torch_peer.make_train_step(net, amp_dtype=amp)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    x = torch_peer.to_layout(torch.rand(shape, device=device), cl)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def run(steps: int) -> None:
        for _ in range(steps):
            step(x, y)
        torch_peer.synchronize(device)

    info: dict[str, Any] = {"torch": torch.__version__, "amp": str(amp) if amp else None}
    runner = common.Runner(f"torch[{variant}]", args.batch, run, info)
    if device.type == "cuda":
        runner.info["peak_bytes_fn"] = lambda: int(torch.cuda.max_memory_allocated(device))
    return runner


# -------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    # Both peers share this process, so both get the same allocator behaviour.
    reused = backend.reuse_host_buffers()
    device = jax.devices()[0]
    peak = common.peak_flops(device.device_kind, args.dtype, args.peak_flops)
    on_gpu = device.platform == "gpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    records: list[dict[str, Any]] = []
    for name in common.split_list(args.models):
        cost = models.model_cost(
            name,
            args.num_classes,
            args.image_size,
            args.channels,
            args.width_divisor,
            args.fc_width,
        )
        runners = [jax_runner(name, args, f) for f in common.split_list(args.formulation)]
        runners += [torch_runner(name, args, v) for v in torch_variants(args.torch, on_gpu)]
        loads = common.measure(runners, args.steps, args.repeats, args.warmup)
        torch_best = max(
            (r.images_per_second() for r in runners if r.name.startswith("torch")), default=None
        )
        for r in runners:
            ips = r.images_per_second()
            info = dict(r.info)
            peak_fn = info.pop("peak_bytes_fn", None)
            if peak_fn:
                info["peak_bytes"] = peak_fn()
            record = {
                "bench": "train",
                "impl": r.name,
                "model": cost.letter,
                "width_divisor": args.width_divisor,
                "fc_width": args.fc_width,
                "channels": args.channels,
                "image_size": args.image_size,
                "batch": args.batch,
                "dtype": args.dtype,
                "images_per_s": ips,
                "images_per_s_best": r.best_images_per_second(),
                "step_s_all": r.seconds,
                "mfu": ips * 6 * cost.mult_adds / peak if peak else None,
                "vs_torch_best": ips / torch_best if torch_best else None,
                "device": device.device_kind,
                "jax_cpu_flag": backend.cpu_flag_active(),
                "reuse_host_buffers": reused,
                "load_avg": float(np.median(loads)),
                "date": date,
                **info,
            }
            records.append(record)
            common.emit_json(record, args.json_out)
    print()
    print(train_table(records))
    return records


def train_table(records: list[dict[str, Any]]) -> str:
    header = [
        "model",
        "impl",
        "size",
        "batch",
        "dtype",
        "images/s",
        "best",
        "vs faster torch",
        "MFU",
        "compile s",
        "peak/temp MiB",
        "load",
    ]
    rows = []
    for r in records:
        mem = r.get("peak_bytes", r.get("temp_bytes"))
        rows.append(
            [
                f"{r['model']} /{r['width_divisor']} fc{r['fc_width']} c{r['channels']}",
                r["impl"],
                r["image_size"],
                r["batch"],
                r["dtype"],
                r["images_per_s"],
                r["images_per_s_best"],
                r["vs_torch_best"],
                r["mfu"],
                r.get("compile_s"),
                mem / 2**20 if mem else None,
                r["load_avg"],
            ]
        )
    return common.markdown_table(header, rows)


if __name__ == "__main__":
    main()
