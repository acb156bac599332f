"""The XLA:CPU flag's effect, measured interleaved: two worker processes, one per setting.

XLA reads XLA_FLAGS once per process, so flag on and flag off cannot share a
process; timing them in separate runs minutes apart on a shared machine mixes
the flag's effect with the load's. Here two workers (VGG_JAX_CPU_FLAGS=1/0)
each compile the same training step, then take turns: worker A runs `--steps`
steps, then B, then A, ... and the medians are compared.

    python -m benchmarks.flag_ab --formulation lax --image-size 64 --repeats 7

Other options go to both workers' train_throughput (e.g. --batch 16).

`--xla-flag FLAG` compares FLAG against no FLAG instead (both workers keep the CPU flag
as configured), e.g. the test suite's `--xla_backend_optimization_level=1`; each worker
also reports what building its step cost (`build_s`: initialising the parameters under
jit and compiling the step, both compilations) and the step's compile alone:

    python -m benchmarks.flag_ab --xla-flag=--xla_backend_optimization_level=1 \
        --image-size 32 --fc-width 4096 --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from benchmarks import common

PROBE = "--models A --width-divisor 4 --fc-width 1024 --channels 1 --num-classes 10 --batch 64"


def worker(argv: Sequence[str]) -> None:
    """Compiles one step, says 'ready', then times `steps` steps per line read."""
    from benchmarks import train_throughput
    from vgg_jax import backend

    args = train_throughput.parse_args(argv)
    start = time.perf_counter()
    runner = train_throughput.jax_runner("A", args, args.formulation)
    build_s = time.perf_counter() - start
    runner.run(args.warmup)
    ready = {"flag": backend.cpu_flag_active(), "batch": args.batch, "build_s": build_s}
    ready["compile_s"] = runner.info["compile_s"]
    ready["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        steps = int(line)
        start = time.perf_counter()
        runner.run(steps)
        print(json.dumps({"seconds": (time.perf_counter() - start) / steps}), flush=True)


def worker_envs(xla_flag: str, environ: dict[str, str]) -> dict[str, dict[str, str]]:
    """The two workers' environments: "flag" and "no_flag"."""
    if xla_flag:  # FLAG vs none; the CPU flag as the environment configures it
        plain = [f for f in environ.get("XLA_FLAGS", "").split() if f != xla_flag]
        return {
            "flag": dict(environ, XLA_FLAGS=" ".join([*plain, xla_flag])),
            "no_flag": dict(environ, XLA_FLAGS=" ".join(plain)),
        }
    envs = {}
    for name, value in (("flag", "1"), ("no_flag", "0")):
        env = dict(environ, VGG_JAX_CPU_FLAGS=value)
        env["XLA_FLAGS"] = " ".join(
            f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f
        )
        envs[name] = env
    return envs


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--formulation", default="lax", choices=("lax", "fast"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--xla-flag", default="", help="compare this XLA flag against none")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    common_args = PROBE.split() + ["--image-size", str(args.image_size)]
    common_args += ["--formulation", args.formulation, "--warmup", "2"]
    if args.worker:
        worker(common_args + list(rest))
        return {}
    procs = {}
    for name, env in worker_envs(args.xla_flag, dict(os.environ)).items():
        cmd = [sys.executable, "-m", "benchmarks.flag_ab", "--worker"]
        cmd += ["--formulation", args.formulation, "--image-size", str(args.image_size)]
        cmd += list(rest)  # any train_throughput option, e.g. a smaller --batch
        procs[name] = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    ready = {n: json.loads(p.stdout.readline()) for n, p in procs.items()}
    flags = {n: r["flag"] for n, r in ready.items()}
    batch = ready["flag"]["batch"]
    seconds: dict[str, list[float]] = {n: [] for n in procs}
    loads = []
    for _ in range(args.repeats):
        loads.append(common.load_average())
        for name, proc in procs.items():
            proc.stdin.write(f"{args.steps}\n")
            proc.stdin.flush()
            seconds[name].append(json.loads(proc.stdout.readline())["seconds"])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    result = {
        "bench": "flag_ab",
        "formulation": args.formulation,
        "image_size": args.image_size,
        "flag": args.xla_flag or "the CPU flag",
        "flag_active": flags,
        "build_s": {n: r["build_s"] for n, r in ready.items()},
        "compile_s": {n: r["compile_s"] for n, r in ready.items()},
        "images_per_s": {n: batch / statistics.median(s) for n, s in seconds.items()},
        "images_per_s_best": {n: batch / min(s) for n, s in seconds.items()},
        "load_avg": statistics.median(loads),
    }
    result["flag_speedup"] = result["images_per_s"]["flag"] / result["images_per_s"]["no_flag"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
