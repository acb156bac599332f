"""The evaluation stream on real data: each example once over processes, raw pixels, scales."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from input_util import fashion_config, folder_config

from vgg_jax import data_sources, eval_input, input_common


def test_fashion_mnist_eval_counts_every_example_once_over_processes(tfds_dir):
    # A quarter of the test set, read back by tfds itself (its order is not the IDX files').
    split = "test[:2501]"
    c = fashion_config(tfds_dir, eval_split=split)
    truth = tfds.as_numpy(tfds.load("fashion_mnist", split=split, data_dir=tfds_dir, batch_size=-1))
    labels, images = truth["label"], truth["image"]
    for count in (1, 2):
        hist, total, pixel_sum, num_batches = np.zeros(10, int), 0, 0.0, []
        for index in range(count):
            batches = list(eval_input.eval_dataset(c, process_index=index, process_count=count))
            num_batches.append(len(batches))
            for b in batches:
                assert b["image"].shape == (96 // count, 32, 32, 1)
                m = b["mask"]
                hist += np.bincount(b["label"][m], minlength=10)
                total += m.sum()
                pixel_sum += b["image"][m].mean(axis=(1, 2, 3)).sum()
        assert total == 2501  # 2501 % 96 (and shares of 1251 and 1250 % 48) leave remainders
        assert len(set(num_batches)) == 1  # every process runs the same number of steps
        np.testing.assert_array_equal(hist, np.bincount(labels, minlength=10))
        # Bilinear upscaling keeps the mean brightness of the real images.
        assert abs(pixel_sum / total - images.mean() / 255) < 2e-3


def test_full_mode_batches_a_fixed_size_source_as_the_single_image_stream(tfds_dir):
    """Fashion-MNIST's images all have one size, so mode="full" can batch them (padding too)."""
    c = fashion_config(tfds_dir, eval_split="test[:37]")
    assert data_sources.create_source("fashion_mnist", tfds_dir, "").image_size == (28, 28)
    kw = dict(mode="full", normalize=False, scales=(32, 64), process_index=1, process_count=2)
    singles = list(eval_input.eval_dataset(c, **kw))
    batched = list(eval_input.eval_dataset(c, batch_size=8, **kw))
    # Shares of 19 and 18: every process yields 19 entries one at a time, 3 full batches of 8.
    assert len(singles) == 19 and [len(b["label"]) for b in batched] == [8, 8, 8]
    for key in ("label", "mask"):
        joined = np.concatenate([b[key] for b in batched])
        np.testing.assert_array_equal(joined[:19], np.concatenate([s[key] for s in singles]))
    mask = np.concatenate([b["mask"] for b in batched])
    assert mask.sum() == 18 and not mask[18:].any()  # the padding is masked out
    for q in (32, 64):
        stacked = np.concatenate([b["images"][q] for b in batched])
        assert stacked.shape == (24, q, q, 1)
        one_by_one = np.concatenate([s["images"][q] for s in singles])
        np.testing.assert_array_equal(stacked[:18], one_by_one[:18])


def test_image_folder_eval_exact_and_corrupt_file_named(photo_root, tmp_path):
    c = folder_config(photo_root, eval_batch_size=4)
    n = input_common.num_examples(c, "val")
    assert n == 5 * 6
    for count in (1, 2):
        labels, steps = [], []
        for index in range(count):
            bs = list(eval_input.eval_dataset(c, process_index=index, process_count=count))
            steps.append(len(bs))
            labels += [b["label"][b["mask"]] for b in bs]
        assert len(set(steps)) == 1
        assert sum(len(x) for x in labels) == n  # 30 = 7 * 4 + 2 and 2 * (7 * 2 + 1)
    full = list(eval_input.eval_dataset(c, mode="full", scale=40, process_index=0, process_count=1))
    assert len(full) == n
    for b in full:
        assert b["image"].shape[0] == 1 and min(b["image"].shape[1:3]) == 40

    (photo_root / "val" / "coffee" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0junk")
    try:
        input_common.clear_source_cache()
        counter = input_common.BadImageCounter()
        batches = list(
            eval_input.eval_dataset(c, process_index=0, process_count=1, bad_images=counter)
        )
        assert sum(int(b["mask"].sum()) for b in batches) == n  # skipped by default, and counted
        assert counter.total == 1
        c.bad_images = "fail"
        with pytest.raises(ValueError, match="zz_broken.jpg"):
            list(eval_input.eval_dataset(c, process_index=0, process_count=1))
    finally:
        (photo_root / "val" / "coffee" / "zz_broken.jpg").unlink()
        input_common.clear_source_cache()


def test_eval_raw_pixels_at_several_scales_in_one_stream(photo_root):
    """scales=(...): every example at each Q in one stream, as the single-scale streams give it."""
    c = folder_config(photo_root, mean_rgb=(100.0, 110.0, 120.0), std_rgb=(50.0, 60.0, 70.0))
    kw = dict(mode="full", process_index=0, process_count=1)
    multi = list(eval_input.eval_dataset(c, normalize=False, scales=(32, 40), **kw))
    assert len(multi) == input_common.num_examples(c, "val") and "image" not in multi[0]
    for q in (32, 40):
        single = list(eval_input.eval_dataset(c, scale=q, **kw))
        for m, s in zip(multi, single, strict=True):
            raw = m["images"][q]
            assert min(raw.shape[1:3]) == q and raw.shape == s["image"].shape
            assert 0.0 <= raw.min() and raw.max() <= 1.0  # raw pixels, not normalised
            # normalize() of the raw pixels (value_range 255) is the default stream's image.
            np.testing.assert_allclose(
                input_common.normalize(raw * 255.0, c), s["image"], atol=1e-4
            )
            np.testing.assert_array_equal(m["label"], s["label"])
    with pytest.raises(ValueError, match="at least one"):
        eval_input.eval_dataset(c, scales=(), **kw)
    with pytest.raises(ValueError, match="smaller than image_size"):
        eval_input.eval_dataset(c, scales=(40, 16), process_index=0, process_count=1)
