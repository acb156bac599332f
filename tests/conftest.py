"""Test-wide settings: several CPU devices for sharding tests, quiet TensorFlow."""

import importlib.util
import os

import pytest

# Must be set before jax is imported anywhere: eight CPU devices let the
# sharding tests build real meshes on a machine without accelerators.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# PyPI's CUDA build of torch (what the `torch` extra gets on Python >= 3.12)
# brings triton, and importing triton after TensorFlow segfaults there, while
# the other order works (DESIGN.md). torch's optimizers import triton lazily,
# in whichever test worker already imported TensorFlow, so import it first.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
    """The commands the tests start compile into a cache of this session's, not the user's
    ~/.cache/vgg_jax/jax: what earlier runs left there changed what the tests saw (on
    jaxlib 0.12.1 a multi-process step read back from it hung)."""
    old = os.environ.get("VGG_JAX_COMPILATION_CACHE")
    os.environ["VGG_JAX_COMPILATION_CACHE"] = str(tmp_path_factory.mktemp("session_jax_cache"))
    yield
    _restore_env("VGG_JAX_COMPILATION_CACHE", old)


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
    """A JAX compilation cache of the test module's own, also for its worker subprocesses
    (VGG_JAX_COMPILATION_CACHE), so runs of the same tiny config compile once."""
    import jax

    cache = str(tmp_path_factory.mktemp("jax_cache"))
    old, old_env = jax.config.jax_compilation_cache_dir, os.environ.get("VGG_JAX_COMPILATION_CACHE")
    os.environ["VGG_JAX_COMPILATION_CACHE"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    yield cache
    jax.config.update("jax_compilation_cache_dir", old)
    _restore_env("VGG_JAX_COMPILATION_CACHE", old_env)


def _restore_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# Shared by the input-pipeline tests (test_input_pipeline, test_train_input, test_eval_input):
# session-wide so that Fashion-MNIST is prepared and the photos are written once.
@pytest.fixture(scope="session")
def tfds_dir():
    """A tfds data_dir holding Fashion-MNIST (built from the IDX files on first use per machine)."""
    from input_util import fashion_tfds_dir

    return fashion_tfds_dir()


@pytest.fixture(scope="session")
def photo_root(tmp_path_factory):
    """train/ and val/ class folders of real photos in awkward encodings, plus corrupt files."""
    from input_util import write_photo_folder

    return write_photo_folder(tmp_path_factory.mktemp("folder"))


# The slowest files, slowest first (suite of 2 December: 60-160 s each on two workers).
# `make test` hands whole files to its two workers in collection order, so starting
# these first keeps one worker from running a long file alone at the end.
SLOWEST_FIRST = (
    "test_train.py", "test_loop.py", "test_adversarial.py", "test_notebooks.py",
    "test_launch.py", "test_seed_e2e.py", "test_protocols.py", "test_evaluate.py",
    "test_transfer.py", "test_convert.py", "test_benchmarks.py", "test_convert_keras.py",
    "test_localize.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
