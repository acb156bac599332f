"""XLA:CPU flags that the library sets before JAX starts its backend.

DESIGN.md's per-layer probe found `--xla_cpu_experimental_ynn_fusion_type=
individual_dot` roughly doubled VGG training speed on CPU with jaxlib 0.10.2.
An interleaved A/B on the same 2-core machine later found it neutral (0.91x
to 1.08x, `benchmarks/flag_ab.py`, benchmarks/RESULTS.md), so treat the flag as
version- and machine-specific and re-measure. XLA reads XLA_FLAGS once, when the
backend is created (at the first computation, not at `import jax`), so
`import vgg_jax` appends the flag then, unless:

* XLA_FLAGS already names `xla_cpu_experimental_ynn_fusion_type` (the user's
  choice wins; nothing is ever overwritten, only appended);
* VGG_JAX_CPU_FLAGS=0 is set (opt out);
* JAX_PLATFORMS names platforms without "cpu", or is unset while a GPU/TPU
  plugin is installed (JAX will then default to the accelerator, and the
  flag would be useless);
* the installed jaxlib is not a version the flag was measured with: an
  unknown flag in XLA_FLAGS aborts the process, so it is never guessed.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
YNN_FLAG = f"--{YNN_FLAG_NAME}=individual_dot"
# jaxlib (major, minor) versions known to have the flag and to gain from it.
KNOWN_JAXLIB = ((0, 10),)


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


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
    if environ.get("VGG_JAX_CPU_FLAGS", "1") == "0":
        return False
    if YNN_FLAG_NAME in environ.get("XLA_FLAGS", ""):
        return False
    if not cpu_is_default_backend(environ):
        return False
    return _jaxlib_version() in KNOWN_JAXLIB


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
