"""The training stream on real data: exact resume, the in-memory cache, corrupt files."""

import io
import logging
import re

import numpy as np
import pytest
import tensorflow as tf
from input_util import assert_batches_equal, fashion_config, folder_config, take
from PIL import Image

from vgg_jax import input_common, train_input


def test_train_is_deterministic_and_resumes_exactly_across_epochs(tfds_dir):
    # 10 steps per epoch; scale jitter and flips on, so augmentation must also match.
    c = fashion_config(
        tfds_dir, train_split="train[:640]", train_scale_max=44, random_flip=True, seed=3
    )
    assert train_input.steps_per_epoch(c) == 10
    fresh = take(train_input.train_dataset(c, process_index=1, process_count=2), 24)
    again = take(train_input.train_dataset(c, process_index=1, process_count=2), 24)
    assert_batches_equal(fresh, again)
    for start in (7, 13):
        resumed = take(
            train_input.train_dataset(c, start_step=start, process_index=1, process_count=2), 5
        )
        assert_batches_equal(resumed, fresh[start : start + 5])
    # Epochs differ in order, and the other process sees other examples.
    assert not np.array_equal(fresh[0]["label"], fresh[10]["label"])
    other = next(train_input.train_dataset(c, process_index=0, process_count=2))
    assert not np.array_equal(other["image"], fresh[0]["image"])
    c.seed = 4
    assert not np.array_equal(
        next(train_input.train_dataset(c, process_index=1, process_count=2))["image"],
        fresh[0]["image"],
    )


def test_cache_serves_the_same_images_and_resumes_exactly(tfds_dir):
    # 10 steps per epoch; two processes, each with its own 320-image share.
    c = fashion_config(tfds_dir, train_split="train[:640]", seed=5, mean_rgb=(0.3,))
    cached = c.copy_and_resolve_references()
    cached.cache = True
    kw = dict(process_index=1, process_count=2)
    streamed = take(train_input.train_dataset(c, **kw), 10)
    fresh = take(train_input.train_dataset(cached, **kw), 24)

    # One epoch holds each of this process's images once, preprocessed as without the cache.
    def by_content(batches):
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        order = np.lexsort((images.reshape(len(images), -1).sum(1), labels))
        return images[order], labels[order]

    (a, la), (b, lb) = by_content(streamed), by_content(fresh[:10])
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.array_equal(fresh[0]["label"], fresh[10]["label"])  # reshuffled per epoch
    assert_batches_equal(take(train_input.train_dataset(cached, **kw), 24), fresh)
    for start in (7, 13):
        resumed = take(train_input.train_dataset(cached, start_step=start, **kw), 5)
        assert_batches_equal(resumed, fresh[start : start + 5])
    other = next(train_input.train_dataset(cached, process_index=0, process_count=2))
    assert not np.array_equal(other["image"], fresh[0]["image"])


def test_cache_refuses_augmentations_that_change_every_epoch(tfds_dir):
    c = fashion_config(tfds_dir, cache=True, random_flip=True, train_scale_max=40)
    with pytest.raises(ValueError, match=r"random crops.*random flips.*cache=False"):
        next(train_input.train_dataset(c, process_index=0, process_count=1))


def test_cache_of_an_image_folder_counts_the_corrupt_files(photo_root, caplog):
    c = folder_config(photo_root, cache=True, train_scale_max=32, random_flip=False)
    c.color_shift = 0.0
    with caplog.at_level(logging.WARNING, logger="vgg_jax.train_input"):
        batch = next(train_input.train_dataset(c, process_index=0, process_count=1))
    assert batch["image"].shape == (8, 32, 32, 3) and np.isfinite(batch["image"]).all()
    assert "skipped 2 training image(s)" in caplog.text  # broken.jpg and garbage.png


def test_mean_subtraction(photo_root):
    c = folder_config(photo_root, color_shift=0.0)
    raw = folder_config(photo_root, color_shift=0.0, mean_rgb=(0.0, 0.0, 0.0))
    a = next(train_input.train_dataset(c, process_index=0, process_count=1))
    b = next(train_input.train_dataset(raw, process_index=0, process_count=1))
    np.testing.assert_allclose(
        b["image"] - a["image"], np.broadcast_to(c.mean_rgb, a["image"].shape), atol=1e-3
    )
    np.testing.assert_allclose(
        input_common.normalize(np.full((2, 2, 3), 255, np.uint8), c)[0, 0],
        (255 - np.array(c.mean_rgb)),
        rtol=1e-6,
    )


def test_image_folder_batches_from_awkward_files(photo_root, caplog):
    # 7 x 6 = 42 = all records: the epoch needs the second pass, so both bad files were met.
    c = folder_config(photo_root, batch_size=7)
    assert input_common.image_shape(c) == (32, 32, 3)
    assert input_common.num_examples(c, "train") == 5 * 8 + 2  # 8 files per photo, 2 corrupt files
    steps = train_input.steps_per_epoch(c)
    with caplog.at_level(logging.WARNING, logger="vgg_jax.train_input"):
        batches = take(train_input.train_dataset(c, process_index=0, process_count=1), steps + 1)
    for b in batches:
        assert b["image"].shape == (7, 32, 32, 3) and np.isfinite(b["image"]).all()
        assert set(b["label"]) <= {0, 1, 2}
    # 2, or 3 if a bad file also opens the second pass.
    assert re.search(r"skipped [23] training image\(s\)", caplog.text), caplog.text

    # CMYK, grey and alpha files decode to the same picture as PIL's RGB conversion.
    for f in ("chelsea_cmyk.jpg", "chelsea_grey.jpg", "chelsea_alpha.png"):
        data = (photo_root / "train" / "cat" / f).read_bytes()
        ours = input_common.decode_image(tf.constant(data), 3).numpy().astype(float)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), float)
        assert ours.shape == ref.shape and np.abs(ours - ref).mean() < 2.0, f


def test_image_folder_resume_exact(photo_root):
    c = folder_config(photo_root, color_shift=0.1, random_flip=True)
    c.train_split = "val"  # no corrupt files: resume is exact
    fresh = take(train_input.train_dataset(c, process_index=0, process_count=2), 6)
    resumed = take(train_input.train_dataset(c, start_step=3, process_index=0, process_count=2), 3)
    assert_batches_equal(resumed, fresh[3:])


def test_all_corrupt_training_data_is_an_error(tmp_path):
    for i in range(4):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(RuntimeError, match="too many files are corrupt"):
        next(
            train_input.train_dataset(
                folder_config(tmp_path, num_classes=1, batch_size=2),
                process_index=0,
                process_count=1,
            )
        )
