"""Test-wide settings: several CPU devices for sharding tests, quiet TensorFlow."""

import os

# Must be set before jax is imported anywhere: eight CPU devices let the
# sharding tests build real meshes on a machine without accelerators.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
