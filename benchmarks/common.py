"""Shared pieces of the benchmark scripts: timing, peaks, machine facts, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Dense peak FLOP/s per device by device_kind substring, for model-FLOP
# utilisation. bf16 tensor-core peaks without sparsity from the vendors' data
# sheets; "float32" on NVIDIA is TF32 tensor-core, which XLA and cuDNN use for
# float32 convolutions by default. CPUs have no entry: pass --peak-flops.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float32": 60e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6": {"bfloat16": 918e12},
}


def peak_flops(device_kind: str, dtype: str, given: float | None) -> float | None:
    """The peak to divide by: the flag's value, else the table's, else None (no MFU)."""
    if given:
        return given
    for key, peaks in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def load_average() -> float:
    """1-minute load average: other processes share the machine, so note it."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine() -> str:
    return f"{platform.node()} {os.cpu_count()} CPUs"


@dataclass
class Runner:
    """Something to time: `run(steps)` does `steps` iterations and waits for them."""

    name: str
    images_per_step: int
    run: Callable[[int], None]
    info: dict[str, Any] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)

    def images_per_second(self) -> float:
        """From the median step time: the typical rate under the machine's load."""
        return self.images_per_step / statistics.median(self.seconds)

    def best_images_per_second(self) -> float:
        """From the fastest repeat: closest to the rate on an idle machine."""
        return self.images_per_step / min(self.seconds)


def measure(runners: Sequence[Runner], steps: int, repeats: int, warmup: int) -> list[float]:
    """Times the runners interleaved (A B C A B C ...) so load changes hit all alike.

    Each runner first does `warmup` untimed steps. Per repeat each does `steps`
    steps; the per-step seconds go into `runner.seconds`. Returns the load
    average seen before each repeat.
    """
    for r in runners:
        r.run(warmup)
    loads = []
    for _ in range(repeats):
        loads.append(load_average())
        for r in runners:
            start = time.perf_counter()
            r.run(steps)
            r.seconds.append((time.perf_counter() - start) / steps)
    return loads


def emit_json(record: dict[str, Any], path: str | None) -> None:
    """Prints one JSON line and appends it to `path` when given."""
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
