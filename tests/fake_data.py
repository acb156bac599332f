"""A tiny in-memory stand-in for vgg_jax.input_pipeline, honouring its contract.

Batches are a pure function of (config.seed, step): `train_dataset(start_step=k)`
yields exactly what a fresh iterator yields from step k, and each process gets
its rows of the global batch. Used by tests/test_train.py and train_worker.py.
"""

from __future__ import annotations

import os
import time

import numpy as np

CHANNELS = 3
NUM_TRAIN = 256
NUM_EVAL = 20
NAN_AT_STEP = -1  # a test sets it to put a NaN into one batch
# Undecodable images each training batch reports (bad_images counter): BAD_PER_STEP x
# (process index + 1), so that each process of a multi-host run counts its own share.
BAD_PER_STEP = int(os.environ.get("FAKE_DATA_BAD_PER_STEP", "0"))
SLEEP = float(os.environ.get("FAKE_DATA_SLEEP", "0"))  # seconds per batch, for kill tests


def _images(rng: np.random.Generator, n: int, config) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, config.num_classes, n).astype(np.int32)
    size = config.image_size
    images = rng.normal(0.0, 1.0, (n, size, size, CHANNELS)).astype(np.float32)
    images += (labels / config.num_classes)[:, None, None, None].astype(np.float32)  # learnable
    return images, labels


def steps_per_epoch(config) -> int:
    return NUM_TRAIN // config.batch_size


def _processes(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return process_index, process_count


def train_dataset(
    config, *, start_step=0, process_index=None, process_count=None, bad_images=None
):
    pi, pc = _processes(process_index, process_count)
    local = config.batch_size // pc
    step = start_step
    while True:
        rng = np.random.default_rng([config.seed, step])
        images, labels = _images(rng, config.batch_size, config)
        if step == NAN_AT_STEP:
            images[0, 0, 0, 0] = np.nan
        if SLEEP:
            time.sleep(SLEEP)
        rows = slice(pi * local, (pi + 1) * local)
        if bad_images is not None:  # as input_pipeline reports skipped files, per batch
            names = [f"bad-{step}-{pi}-{i}.jpg" for i in range(BAD_PER_STEP * (pi + 1))]
            bad_images.add(step // steps_per_epoch(config), names)
        yield {"image": images[rows], "label": labels[rows]}
        step += 1


def eval_dataset(
    config, *, split=None, batch_size=None, process_index=None, process_count=None, bad_images=None
):
    pi, pc = _processes(process_index, process_count)
    batch = batch_size or config.eval_batch_size
    images, labels = _images(np.random.default_rng([config.seed, 10**6]), NUM_EVAL, config)
    padded = -(-NUM_EVAL // batch) * batch
    mask = np.arange(padded) < NUM_EVAL
    images = np.concatenate([images, np.zeros((padded - NUM_EVAL, *images.shape[1:]), np.float32)])
    labels = np.concatenate([labels, np.zeros(padded - NUM_EVAL, np.int32)])
    local = batch // pc
    for start in range(0, padded, batch):
        rows = slice(start + pi * local, start + (pi + 1) * local)
        yield {"image": images[rows], "label": labels[rows], "mask": mask[rows]}


def tiny_config(**overrides):
    """A VGG-A small enough for a CPU test: 32x32 inputs, widths / 16, FC 32."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    spec = importlib.util.spec_from_file_location("tiny_default", os.path.join(path, "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model = "vgg11"
    c.num_classes = 10
    c.width_divisor = 16
    c.fc_width = 32
    c.image_size = 32
    c.dataset = "fake"
    c.batch_size = 16
    c.eval_batch_size = 8
    c.num_epochs = 1
    c.max_steps = 4
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.learning_rate = 0.01
    c.schedule = "step"
    c.progress_bar = False
    c.tensorboard = False
    for k, v in overrides.items():
        c[k] = v
    return c


def dense_batches(config, scales, batch_size):
    """The evaluation split as the dense protocol reads it: (ImageSet, labels, mask) groups.

    The fake images are already at image_size, so only Q = image_size is served. Like the
    real pipeline's, they are raw pixels: the (normalised) training images with the
    config's normalisation undone, so that the evaluator's preprocessing gives them back.
    """
    from vgg_jax import image_io

    if tuple(scales) != (config.image_size,):
        raise ValueError(f"fake_data serves only Q = image_size ({config.image_size}).")
    mean = np.asarray(config.mean_rgb, np.float32)[:CHANNELS]
    std = np.asarray(config.std_rgb, np.float32)[:CHANNELS]
    for batch in eval_dataset(config, batch_size=batch_size):
        raw = (batch["image"] * std + mean) / np.float32(config.value_range)
        images = image_io.ImageSet(rescaled={config.image_size: list(raw)})
        yield images, batch["label"], batch["mask"]


def data():
    """This module as the trainer's `train.Data` (passed in, never patched in)."""
    from vgg_jax import train

    return train.Data(
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        steps_per_epoch=steps_per_epoch,
        channels=lambda config: CHANNELS,
        dense_batches=dense_batches,
    )
