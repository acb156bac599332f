"""What XLA:CPU spends compiling random numbers and a tiny model's `init`, per threefry lowering.

The test suite runs tiny networks, so compiling is most of its time, and random-number
programs are the slowest to compile. jax lowers threefry in one of two ways
(`jax_threefry_partitionable`: the default, and the classic lowering); both are
deterministic and give the same numbers on any sharding, but not the same numbers as
each other. Each setting runs in a fresh process (each compiles from nothing); every
figure is CPU seconds of the first call, compile included, of:

    python -m benchmarks.compile_cost            # both settings, a table and JSON lines
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

PROBE_NAMES = (
    "random.normal (3,3,16,16)",
    "random.truncated_normal (3,3,16,40)",
    "random.bernoulli (128,4096) (dropout)",
    "A/16 init, eager",
    "A/16 init, jit",
)


def probes() -> dict[str, Callable[[], Any]]:
    """name -> a first call to time (fresh shapes, so each one compiles)."""
    import jax
    import jax.numpy as jnp

    from vgg_jax import models

    model = models.create_model("A", 10, width_divisor=16, fc_width=32, image_size=32)
    x = jnp.zeros((1, 32, 32, 1))
    key = jax.random.key(0)
    calls = (
        lambda: jax.random.normal(key, (3, 3, 16, 16)),
        lambda: jax.random.truncated_normal(key, -2.0, 2.0, (3, 3, 16, 40)),
        lambda: jax.random.bernoulli(key, 0.5, (128, 4096)),
        lambda: model.init(key, x),
        lambda: jax.jit(model.init)(jax.random.key(1), x),
    )
    return dict(zip(PROBE_NAMES, calls, strict=True))


def worker(names: Sequence[str] = PROBE_NAMES) -> None:
    """Times the probes `names` in this process and prints one JSON object."""
    import jax

    out = {}
    for name, call in probes().items():
        if name not in names:
            continue
        start = time.process_time()
        jax.block_until_ready(call())
        out[name] = time.process_time() - start
    partitionable = bool(jax.config.jax_threefry_partitionable)
    print(json.dumps({"partitionable": partitionable, "cpu_s": out}))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker()
        return []
    records = []
    for setting in ("1", "0"):
        env = dict(os.environ, JAX_THREEFRY_PARTITIONABLE=setting, JAX_PLATFORMS="cpu")
        load = common.load_average()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.compile_cost", "--worker"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        record.update(bench="compile_cost", load_avg=load, machine=common.machine())
        record["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        common.emit_json(record, args.json_out)
        records.append(record)
    rows = [[n, *(f"{r['cpu_s'][n]:.2f}" for r in records)] for n in records[0]["cpu_s"]]
    print(common.markdown_table(["CPU s, first call", "partitionable", "classic"], rows))
    return records


if __name__ == "__main__":
    main()
