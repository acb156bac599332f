"""Input pipeline: sources -> tf.data -> numpy batches of this process's share (PAPER.md 2-3).

The public interface in one place (every function takes the experiment's
`config`, fields in configs/default.py); each part lives in the module that
holds its idea:

* `vgg_jax.train_input`: `train_dataset(config, *, start_step=0, ...)`, the
  infinite, exactly resumable training stream (bad images replaced and counted,
  `config.cache` in memory), and `steps_per_epoch(config)`.
* `vgg_jax.eval_input`: `eval_dataset(config, *, split=None, mode=..., scale=...,
  normalize=True, scales=None, ...)`, one padded pass with a 'mask' (central
  crop or whole images, raw pixels, several scales in one stream), and
  `decode_eval_image(encoded, config, scale)` for tools that score files.
* `vgg_jax.augment`: the per-image training preprocessing (`Augment`,
  `train_preprocess`, `random_scaled_crop`, `sample_crop`, `color_shift_delta`).
* `vgg_jax.input_common`: what both streams share: `get_source`,
  `num_examples`, `image_shape`, `normalize`, `decode_image`, `eval_preprocess`,
  `rescaled_shape`, `process_share`, and the bad-image policy and `BadImageCounter`.

Callers import from here (`from vgg_jax import input_pipeline`) and need not
know the split.
"""

from __future__ import annotations

from vgg_jax.augment import (
    PCA_EIGVAL,
    PCA_EIGVEC,
    Augment,
    color_shift_delta,
    random_scaled_crop,
    sample_crop,
    train_preprocess,
)
from vgg_jax.eval_input import decode_eval_image, eval_dataset
from vgg_jax.input_common import (
    BAD_IMAGE_POLICIES,
    BadImageCounter,
    Batch,
    bad_image_policy,
    clear_source_cache,
    decode_image,
    eval_preprocess,
    get_source,
    image_shape,
    normalize,
    num_examples,
    process_share,
    rescaled_shape,
)
from vgg_jax.train_input import steps_per_epoch, train_dataset

__all__ = [
    "BAD_IMAGE_POLICIES",
    "PCA_EIGVAL",
    "PCA_EIGVEC",
    "Augment",
    "BadImageCounter",
    "Batch",
    "bad_image_policy",
    "clear_source_cache",
    "color_shift_delta",
    "decode_eval_image",
    "decode_image",
    "eval_dataset",
    "eval_preprocess",
    "get_source",
    "image_shape",
    "normalize",
    "num_examples",
    "process_share",
    "random_scaled_crop",
    "rescaled_shape",
    "sample_crop",
    "steps_per_epoch",
    "train_dataset",
    "train_preprocess",
]
