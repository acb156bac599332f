"""The input pipeline end to end through its public interface (`vgg_jax.input_pipeline`):
Fashion-MNIST built from IDX files, errors that name their fix, the imagenet2012 code path."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from input_util import fashion_config, folder_config, take

from configs.default import get_config
from vgg_jax import input_pipeline as ip


def test_fashion_mnist_built_from_idx_files(tfds_dir):
    c = fashion_config(tfds_dir)
    assert ip.num_examples(c, "train") == 60_000
    assert ip.num_examples(c, "test") == 10_000
    assert ip.steps_per_epoch(c) == 60_000 // 64
    assert ip.image_shape(c) == (32, 32, 1)
    # It is the regular tfds dataset, readable without vgg_jax.
    assert tfds.builder("fashion_mnist", data_dir=tfds_dir).is_prepared()

    batch = next(ip.train_dataset(c, process_index=0, process_count=1))
    assert batch["image"].shape == (64, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_clear_errors(photo_root, tmp_path):
    for wrong in (2, 4):  # 4 trained, then failed the test evaluation at the end
        with pytest.raises(ValueError, match=f"config.num_classes={wrong}; set .*=3"):
            next(
                ip.train_dataset(
                    folder_config(photo_root, num_classes=wrong), process_index=0, process_count=1
                )
            )
    with pytest.raises(ValueError, match="not found"):
        ip.eval_dataset(folder_config(photo_root), split="test", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ip.train_dataset(folder_config(photo_root, batch_size=9), process_index=0, process_count=2)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        ip.eval_dataset(folder_config(empty), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="train_scale_min"):
        ip.train_dataset(
            folder_config(photo_root, train_scale_min=16), process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="mean_rgb"):
        ip.normalize(np.zeros((2, 2, 1)), folder_config(photo_root))


def test_label_out_of_range_at_run_time(photo_root, monkeypatch):
    """A source that cannot tell its class count is checked example by example."""
    c = folder_config(photo_root, num_classes=2, eval_batch_size=30)
    ip.clear_source_cache()
    monkeypatch.setattr(ip.get_source(c), "num_classes", None)
    try:
        with pytest.raises(ValueError, match="label out of range"):
            list(ip.eval_dataset(c, process_index=0, process_count=1))
        c.train_split = "val"
        with pytest.raises(tf.errors.InvalidArgumentError, match="label out of range"):
            take(ip.train_dataset(c, process_index=0, process_count=1), 4)
    finally:
        ip.clear_source_cache()


def test_imagenet2012_code_path_with_mock_data(tmp_path):
    c = get_config()  # the paper's recipe, shrunk
    c.data_dir, c.image_size = str(tmp_path), 32
    c.train_scale_min, c.train_scale_max, c.eval_scale = 32, 64, 36
    c.batch_size = c.eval_batch_size = 8
    with tfds.testing.mock_data(num_examples=16):
        source = ip.get_source(c)
        record = next(iter(source.records("train", 0, 1, None, 0)))
        assert bool(tf.io.is_jpeg(record["image"]))  # exercises decode_and_crop_jpeg
        batch = next(ip.train_dataset(c, process_index=0, process_count=2))
        assert batch["image"].shape == (4, 32, 32, 3) and np.isfinite(batch["image"]).all()
        assert batch["label"].max() < 1000
        ev = next(ip.eval_dataset(c, process_index=1, process_count=2))
        assert ev["image"].shape == (4, 32, 32, 3) and ev["mask"].all()
    ip.clear_source_cache()
