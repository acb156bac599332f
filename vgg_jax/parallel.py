"""Devices, meshes and shardings: one code path for a CPU, a GPU, eight GPUs or a pod.

The trainer runs `jax.jit` over a two-axis mesh ('data', 'model'). Batches are
split along 'data'; parameters are replicated, except the two big FC kernels
(fc6, fc7), which are split along 'model' when `config.mesh_model_axis > 1`
(data-parallel convolutions, model-parallel FC layers: Krizhevsky's "one weird
trick"). GSPMD inserts the collectives, so the numbers are those of pure data
parallelism.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` when the
config or the environment (VGG_JAX_COORDINATOR, VGG_JAX_NUM_PROCESSES,
VGG_JAX_PROCESS_ID) names a coordinator, or with no arguments when
`config.distributed == "auto"` (TPU pods and SLURM detect themselves).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"


def distributed_settings(config: Any) -> tuple[str, int, int]:
    """(coordinator, num_processes, process_id) from the config, else the environment."""
    coordinator = config.get("coordinator_address", "") or os.environ.get("VGG_JAX_COORDINATOR", "")
    num = int(config.get("num_processes", 0) or os.environ.get("VGG_JAX_NUM_PROCESSES", 0))
    pid = config.get("process_id", -1)
    if pid is None or pid < 0:
        pid = int(os.environ.get("VGG_JAX_PROCESS_ID", -1))
    return coordinator, num, int(pid)


def initialize_distributed(config: Any) -> None:
    """Joins the other processes of a multi-host run; a no-op for one process."""
    coordinator, num, pid = distributed_settings(config)
    auto = config.get("distributed", "") == "auto"
    if not coordinator and not auto:
        return
    if jax.distributed.is_initialized():
        return
    if coordinator and (num < 1 or not 0 <= pid < num):
        raise ValueError(
            f"Multi-host run with coordinator {coordinator!r} needs num_processes >= 1 and "
            f"0 <= process_id < num_processes; got {num} and {pid}. Set config.num_processes "
            "and config.process_id (or VGG_JAX_NUM_PROCESSES / VGG_JAX_PROCESS_ID)."
        )
    if _platform() == "cpu":
        # CPU processes exchange data through gloo (the default has no cross-process collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # A step read back from the persistent compilation cache waited forever in its first
        # gloo collective on jaxlib 0.12.1 (every process; 7 December, benchmarks/RESULTS.md):
        # a second run of `launch/local.sh` hung. Multi-process CPU runs compile anew.
        jax.config.update("jax_enable_compilation_cache", False)
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
    else:
        jax.distributed.initialize()
    log.info("Process %d of %d joined.", jax.process_index(), jax.process_count())


def _platform() -> str:
    platforms = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
    return platforms.split(",")[0] if platforms else "cpu"


def create_mesh(config: Any) -> Mesh:
    """A ('data', 'model') mesh over the devices the config asks for (num_devices 0 = all)."""
    devices = jax.devices()
    num = int(config.get("num_devices", 0) or 0)
    if num:
        if jax.process_count() > 1:
            raise ValueError("config.num_devices is for single-process runs; leave it at 0.")
        if num > len(devices):
            raise ValueError(
                f"config.num_devices={num}, but this process sees {len(devices)} device(s) "
                f"({devices[0].platform}); set num_devices to at most {len(devices)}, or 0 for all."
            )
        devices = devices[:num]
    model = int(config.get("mesh_model_axis", 1) or 1)
    if len(devices) % model:
        raise ValueError(
            f"config.mesh_model_axis={model} does not divide the {len(devices)} devices; "
            "choose a divisor of the device count."
        )
    return make_mesh(devices, model)


def make_mesh(devices: Sequence[jax.Device], model: int = 1) -> Mesh:
    """A ('data', 'model') mesh over `devices`, `model` of them along 'model'."""
    shape = (len(devices) // model, model)
    # Auto axes: the layers reshape batch-sharded arrays, which explicit axes refuse.
    return jax.make_mesh(shape, (DATA, MODEL), (AxisType.Auto,) * 2, devices=devices)


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises a clear error when a global batch does not split across the data axis."""
    data = mesh.shape[DATA]
    if batch_size % data or batch_size % jax.process_count():
        raise ValueError(
            f"config.{what}={batch_size} does not divide evenly across the {data} devices of the "
            f"'data' mesh axis ({jax.process_count()} process(es)). Use a multiple of {data}, "
            "or fewer devices (config.num_devices)."
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """Partition spec of one parameter: fc6/fc7 kernels split along 'model', the rest replicated.

    fc6's output units are split (column parallel) and fc7's input units (row
    parallel), so the activation between them never has to be gathered.
    """
    if mesh.shape[MODEL] == 1 or not path or path[-1] != "kernel":
        return P()
    if "fc6" in path and shape[-1] % mesh.shape[MODEL] == 0:
        return P(*([None] * (len(shape) - 1)), MODEL)
    if "fc7" in path and shape[0] % mesh.shape[MODEL] == 0:
        return P(MODEL, None)
    return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays (params, optimizer state) using `param_spec`.

    Optimizer states mirror the parameter tree, so matching on the path's tail
    ('fc6', 'kernel') shards momentum buffers like their parameters.
    """

    def one(path, leaf):
        names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        return NamedSharding(mesh, param_spec(names, tuple(np.shape(leaf)), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a global batch -> arrays sharded along 'data' over all processes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def is_main_process() -> bool:
    return jax.process_index() == 0


def per_process(values: Sequence[int]) -> np.ndarray:
    """Every process's `values` (integers), one row per process in process order.

    A collective: every process calls it at the same point. With one process it is that
    process's row alone.
    """
    local = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(local))
    return gathered.reshape(jax.process_count(), local.size)
