"""CPU choices per jaxlib version: the XLA:CPU flag and the layer formulation.

DESIGN.md's per-layer probe found `--xla_cpu_experimental_ynn_fusion_type=
individual_dot` roughly doubled VGG training speed on CPU with jaxlib 0.10.2;
an interleaved A/B on the same 2-core machine later found it neutral to
helpful (0.91x to 1.08x, `benchmarks/flag_ab.py`). Such choices are version-
and machine-specific, so `CPU_CHOICES` records, per jaxlib (major, minor),
what was measured there (benchmarks/RESULTS.md): whether to add the flag, and
which formulation `vgg_jax.layers`' "auto" takes on CPU.

XLA reads XLA_FLAGS once, when the backend is created (at the first
computation, not at `import jax`), so `import vgg_jax` appends the flag then,
when the table says so, unless:

* XLA_FLAGS already names `xla_cpu_experimental_ynn_fusion_type` (the user's
  choice wins; nothing is ever overwritten, only appended);
* VGG_JAX_CPU_FLAGS=0 is set (opt out; VGG_JAX_CPU_FLAGS=1 adds it whatever
  the table says, as `benchmarks/flag_ab.py` does to measure it);
* JAX_PLATFORMS names platforms without "cpu", or is unset while a GPU/TPU
  plugin is installed (JAX will then default to the accelerator, and the
  flag would be useless).

On a jaxlib that is not in the table, the flag is not added (an unknown flag
in XLA_FLAGS aborts the process, so it is never guessed) and "auto" takes the
newest measured version's formulation (both compute the same values); a
debug-level log line says so. Re-measure with `benchmarks/cpu_suite.sh` and
`benchmarks/flag_ab.py` and add a row.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import os
import sys
import warnings

YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
YNN_FLAG = f"--{YNN_FLAG_NAME}=individual_dot"


@dataclasses.dataclass(frozen=True)
class CpuChoice:
    """What to do on XLA:CPU for one jaxlib version."""

    ynn_flag: bool  # append YNN_FLAG to XLA_FLAGS
    formulation: str  # what layers' "auto" resolves to on CPU: "fast" or "lax"
    measured: bool = True


# jaxlib (major, minor) -> the choice its measurements support (benchmarks/RESULTS.md).
CPU_CHOICES: dict[tuple[int, int], CpuChoice] = {
    (0, 10): CpuChoice(ynn_flag=True, formulation="fast"),  # 2026-11, DESIGN.md's probe
    (0, 12): CpuChoice(ynn_flag=True, formulation="fast"),  # 2026-12-01: flag 1.06x, fast 1.76x
}


def jaxlib_version() -> tuple[int, ...] | None:
    """The installed jaxlib's (major, minor), or None without jaxlib."""
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


@functools.lru_cache(maxsize=8)
def cpu_choice(version: tuple[int, ...] | None = None) -> CpuChoice:
    """The CPU choice for `version` (default: the installed jaxlib's)."""
    version = jaxlib_version() if version is None else version
    if version in CPU_CHOICES:
        return CPU_CHOICES[version]
    newest = CPU_CHOICES[max(CPU_CHOICES)]
    logging.getLogger(__name__).debug(
        "jaxlib %s has no measured CPU choice in vgg_jax.backend.CPU_CHOICES: the XLA:CPU "
        "flag %s is not added and layer formulation 'auto' takes %r on CPU (jaxlib %s's).",
        version,
        YNN_FLAG,
        newest.formulation,
        max(CPU_CHOICES),
    )
    return CpuChoice(ynn_flag=False, formulation=newest.formulation, measured=False)


ACCELERATOR_DISTRIBUTIONS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def accelerator_plugin_installed() -> bool:
    """Whether a JAX GPU/TPU plugin is installed (then CPU is not the default backend)."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(ACCELERATOR_DISTRIBUTIONS):
            return True
    return False


def backend_started() -> bool:
    """Whether JAX has already created its backends (then XLA_FLAGS is read already)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # private: only used to warn, never required

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - a JAX without this internal
        return False


def cpu_is_default_backend(environ: os._Environ | dict[str, str] = os.environ) -> bool:
    """Whether JAX will compute on the CPU (JAX_PLATFORMS allows it and no accelerator wins)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return "cpu" in platforms.split(",")
    return not accelerator_plugin_installed()


def cpu_flags_wanted(environ: os._Environ | dict[str, str] = os.environ) -> bool:
    """Whether `configure_xla_flags` would add the CPU flag (see the module docstring)."""
    setting = environ.get("VGG_JAX_CPU_FLAGS", "")
    if setting == "0":
        return False
    if YNN_FLAG_NAME in environ.get("XLA_FLAGS", ""):
        return False
    if not cpu_is_default_backend(environ):
        return False
    return setting == "1" or cpu_choice().ynn_flag


def configure_xla_flags(environ: os._Environ | dict[str, str] = os.environ) -> bool:
    """Appends the CPU flag to XLA_FLAGS when wanted; True when it did."""
    if not cpu_flags_wanted(environ):
        return False
    environ["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") + " " + YNN_FLAG).strip()
    if environ is os.environ and backend_started():
        warnings.warn(
            "vgg_jax was imported after JAX created its backend, so the XLA:CPU flag "
            f"{YNN_FLAG} has no effect in this process. "
            "Import vgg_jax before running any JAX computation, or set XLA_FLAGS yourself.",
            stacklevel=3,
        )
    return True


def cpu_flag_active() -> bool:
    """Whether the running backend was (or will be) created with the YNN flag."""
    return YNN_FLAG in os.environ.get("XLA_FLAGS", "")


# ---------------------------------------------------------------------------
# Host memory allocation. XLA:CPU runs a step on worker threads, whose glibc
# arenas serve every large buffer (a 4096x4096 weight gradient is 64 MiB) with
# a fresh mmap and give it back with munmap, so each step faults in and zeroes
# every such page again: a third of the time of the FC weight-gradient matmul
# on the 2-core dev VM (benchmarks/RESULTS.md). One arena that grows with brk
# and never trims keeps freed buffers for the next step. Process-wide and
# irreversible, so only the command-line entry points call it, before JAX starts.

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_host_buffers(environ: os._Environ | dict[str, str] = os.environ) -> bool:
    """Makes glibc keep and reuse freed large buffers; True when it did.

    Skipped when VGG_JAX_MALLOC=0, off Linux/glibc, when an accelerator will do
    the computing (one arena would only add lock contention to the input
    pipeline's threads there), or once JAX's backend is running (its threads
    already have their arenas).
    """
    if environ.get("VGG_JAX_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not cpu_is_default_backend(environ) or backend_started():
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: leave it alone
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, 2**31 - 1),
        )
    )
