"""The training stream on real data: exact resume, the in-memory cache, corrupt files."""

import io
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from input_util import assert_batches_equal, fashion_config, folder_config, take
from PIL import Image

from configs.default import get_config
from vgg_jax import input_common, train_input
from vgg_jax.augment import Augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.parametrize("shape", [(28, 28), (20, 30)])
def test_scaled_crops_sample_where_tf_resize_does(shape):
    # The cache's numpy augmentation against tf.image.resize of the whole image, then the crop.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, *shape, 3), dtype=np.uint8)
    scales = np.array([32, 33, 37, 40, 44, 32])
    big_h, big_w = train_input._rescaled(*shape, scales, 32)
    oy = np.array([0, 1, 5, 8, 3, 0])
    ox = np.minimum(np.array([0, 0, 4, 8, 12, 0]), big_w - 32)
    flip = np.array([False, True, False, True, True, False])
    ours = train_input.scaled_crops(images, scales, oy, ox, flip, 32)
    for i in range(len(images)):
        h, w = input_common.rescaled_shape(*shape, int(scales[i]), minimum=32)
        assert (int(h), int(w)) == (big_h[i], big_w[i])
        whole = input_common.resize(images[i], h, w, "bilinear").numpy()
        crop = whole[oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        np.testing.assert_allclose(ours[i], crop[:, ::-1] if flip[i] else crop, atol=2e-3)


def test_cache_augments_anew_each_epoch_and_resumes_exactly(tfds_dir):
    # Scale jittering and flips from the decoded images in memory: 10 steps per epoch.
    c = fashion_config(
        tfds_dir, train_split="train[:640]", cache=True, train_scale_max=40, random_flip=True
    )
    kw = dict(process_index=1, process_count=2)
    fresh = take(train_input.train_dataset(c, **kw), 24)
    assert fresh[0]["image"].shape == (32, 32, 32, 1) and fresh[0]["image"].dtype == np.float32
    assert_batches_equal(take(train_input.train_dataset(c, **kw), 24), fresh)
    for start in (7, 13):
        resumed = take(train_input.train_dataset(c, start_step=start, **kw), 5)
        assert_batches_equal(resumed, fresh[start : start + 5])
    # An epoch holds the same records, but each comes out anew: the multiset of image sums
    # changes from epoch to epoch, as it does not without augmentation.
    fixed = c.copy_and_resolve_references()
    fixed.train_scale_max, fixed.random_flip = 32, False
    plain = take(train_input.train_dataset(fixed, **kw), 20)

    def epoch_sums(batches):
        labels = np.sort(np.concatenate([b["label"] for b in batches]))
        return labels, np.sort(np.concatenate([b["image"].sum((1, 2, 3)) for b in batches]))

    for batches, changes in ((fresh, True), (plain, False)):
        (labels0, sums0), (labels1, sums1) = epoch_sums(batches[:10]), epoch_sums(batches[10:20])
        np.testing.assert_array_equal(labels0, labels1)
        assert np.allclose(sums0, sums1, rtol=1e-5) != changes


def test_cache_colour_shift_adds_one_pca_offset_per_image():
    # Same generator state: the crops agree, and the colour shift adds a constant per image.
    images = np.random.default_rng(1).integers(0, 256, (8, 30, 30, 3), dtype=np.uint8)
    c = get_config()
    plain, shifted = (Augment(24, 24, 30, True, shift, 3, "bilinear") for shift in (0.0, 0.1))
    a = train_input._augment_in_memory(c, plain, images, np.arange(8), np.random.default_rng(2))
    b = train_input._augment_in_memory(c, shifted, images, np.arange(8), np.random.default_rng(2))
    offset = b - a
    np.testing.assert_allclose(offset, offset[:, :1, :1, :] * np.ones_like(offset), atol=1e-3)
    assert np.abs(offset[:, 0, 0, :]).max() > 0.1 and len(np.unique(offset[:, 0, 0, 0])) == 8


def test_cache_augmentation_matches_the_streamed_distribution(tfds_dir):
    # Mean and spread of the jittered images, cached and streamed, over one 640-image epoch.
    c = fashion_config(tfds_dir, train_split="train[:640]", train_scale_max=44, random_flip=True)
    cached = c.copy_and_resolve_references()
    cached.cache = True
    kw = dict(process_index=0, process_count=1)
    streamed = np.concatenate([b["image"] for b in take(train_input.train_dataset(c, **kw), 10)])
    ours = np.concatenate([b["image"] for b in take(train_input.train_dataset(cached, **kw), 10)])
    np.testing.assert_allclose(ours.mean(), streamed.mean(), rtol=0.03)
    np.testing.assert_allclose(ours.std(), streamed.std(), rtol=0.03)
    # Per pixel position (where the jittered crops put the items), within sampling noise.
    assert np.abs(ours.mean(0) - streamed.mean(0)).max() < 0.08


def test_cache_augmentation_refuses_other_resamplers_and_mixed_sizes(tfds_dir, photo_root):
    c = fashion_config(tfds_dir, cache=True, train_scale_max=40, resize_method="bicubic")
    with pytest.raises(ValueError, match=r"resamples bilinearly.*resize_method='bilinear'"):
        next(train_input.train_dataset(c, process_index=0, process_count=1))
    folder = folder_config(photo_root, cache=True)  # photos of several sizes, jittered
    with pytest.raises(ValueError, match=r"one size.*cache=False"):
        next(train_input.train_dataset(folder, process_index=0, process_count=1))


def test_cache_of_an_image_folder_counts_the_corrupt_files(photo_root, caplog):
    c = folder_config(photo_root, cache=True, train_scale_max=32, random_flip=False)
    c.color_shift = 0.0
    with caplog.at_level(logging.WARNING, logger="vgg_jax.train_input"):
        batch = next(train_input.train_dataset(c, process_index=0, process_count=1))
    assert batch["image"].shape == (8, 32, 32, 3) and np.isfinite(batch["image"]).all()
    assert "skipped 2 training image(s)" in caplog.text  # broken.jpg and garbage.png


DAMAGED_RECORDS = """
import sys
sys.path.insert(0, {tests!r})
from input_util import fashion_config
from vgg_jax import eval_input, train_input

config = fashion_config({data_dir!r}, cache=True)
share = dict(process_index=0, process_count=1)
for name, read in (
    ("cached training", lambda: next(train_input.train_dataset(config, **share))),
    ("evaluation", lambda: list(eval_input.eval_dataset(config, **share))),
):
    try:
        read()
    except ValueError as e:
        print(name, "->", e)
    else:
        print(name, "-> read without an error")
"""


def test_damaged_record_files_are_one_clear_error_not_a_hang(tfds_dir, tmp_path):
    # tf.data's ignore_errors() after the reader retried a truncated TFRecord file forever:
    # the cached training set and the evaluation stream hung. Run apart, with a time limit.
    data_dir = tmp_path / "tfds"
    shutil.copytree(os.path.join(tfds_dir, "fashion_mnist"), data_dir / "fashion_mnist")
    for path in (data_dir / "fashion_mnist").glob("*/fashion_mnist-*.tfrecord-*"):
        os.truncate(path, path.stat().st_size // 2)
    script = DAMAGED_RECORDS.format(tests=os.path.dirname(__file__), data_dir=str(data_dir))
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line, split in zip(lines, ("train", "test"), strict=True):
        assert f"-> The '{split}' records of fashion_mnist in {data_dir}" in line, line
        assert "are damaged (truncated record" in line and "prepare the dataset again" in line


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
