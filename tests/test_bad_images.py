"""Corrupt files in training (streaming and config.cache) and evaluation: skipped, counted once."""

import io
import logging
import re

import numpy as np
import pytest
from input_util import folder_config
from PIL import Image

from vgg_jax import input_pipeline as ip

BAD = ("garbage.png", "truncated.jpg", "truncated.png")


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_split(root, split, good, bad=BAD, seed=0):
    """`good` 32x32 noise images over two classes, plus the corrupt files named in `bad`."""
    rng = np.random.default_rng(seed)
    for i in range(good):
        d = root / split / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:02d}.png").write_bytes(_png(rng.integers(0, 256, (32, 32, 3), np.uint8)))
    photo = rng.integers(0, 256, (32, 32, 3), np.uint8)
    corrupt = {
        "garbage.png": b"not an image at all",
        "truncated.jpg": _jpeg(photo)[:300],
        "truncated.png": _png(photo)[:400],
    }
    for j, name in enumerate(bad):
        d = root / split / f"c{j % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(corrupt[name])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """train/: 21 good + 3 corrupt = 24 files; val/: 7 good + 3 corrupt."""
    root = tmp_path_factory.mktemp("bad_images")
    _write_split(root, "train", 21)
    _write_split(root, "val", 7, seed=1)
    return root


def config_for(root, **overrides):
    # S = image_size on square images: the crop is the whole image, so a truncated JPEG
    # is always read to its end (decode_and_crop_jpeg stops at the crop window).
    fields = dict(num_classes=2, train_scale_min=32, train_scale_max=32, eval_scale=32,
                  batch_size=4, eval_batch_size=4, color_shift=0.0)  # fmt: skip
    return folder_config(root, **{**fields, **overrides})


@pytest.fixture(autouse=True)
def fresh_sources():
    ip.clear_source_cache()
    yield
    ip.clear_source_cache()


def _run(c, steps, start_step=0):
    counter = ip.BadImageCounter()
    it = ip.train_dataset(c, start_step=start_step, process_index=0, process_count=1,
                          bad_images=counter)  # fmt: skip
    batches, counts = [], []
    for _ in range(steps):
        batches.append(next(it))
        counts.append((counter.epoch, counter.batch, counter.epoch_count, counter.total,
                       tuple(n.rsplit("/", 1)[-1] for n in counter.names)))  # fmt: skip
    return batches, counts


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


@pytest.mark.parametrize("cache", [False, True])
def test_three_corrupt_of_24_are_skipped_and_counted_once_per_epoch(root, cache, caplog):
    c = config_for(root, cache=cache, random_flip=not cache)
    steps = ip.steps_per_epoch(c)
    assert steps == 6  # 24 files // 4: the corrupt ones still count as examples
    with caplog.at_level(logging.WARNING, logger="vgg_jax.train_input"):
        batches, counts = _run(c, 2 * steps)
    for b in batches:
        assert b["image"].shape == (4, 32, 32, 3) and np.isfinite(b["image"]).all()
    for epoch in (0, 1):
        mine = counts[epoch * steps : (epoch + 1) * steps]
        assert {e for e, *_ in mine} == {epoch}
        names = [n for *_, ns in mine for n in ns]
        assert sorted(names) == sorted(BAD)  # each corrupt file exactly once per epoch
        assert sum(n for _, n, *_ in mine) == 3 and mine[-1][2] == 3
    assert counts[-1][3] == 6  # total over the two epochs
    # Both epochs reported, the last one too (when its last batch is yielded).
    for epoch in (1, 2):  # counted from 1, as the trainer's lines count
        assert re.search(rf"Epoch {epoch}, process 0: skipped 3 training image", caplog.text)


@pytest.mark.parametrize("cache", [False, True])
def test_resume_is_exact_with_corrupt_files(root, cache):
    c = config_for(root, cache=cache, random_flip=not cache, seed=7)
    fresh, fresh_counts = _run(c, 12)  # two epochs of 6 steps
    for start in (1, 9):  # inside epoch 0 and inside epoch 1
        resumed, counts = _run(c, 12 - start, start_step=start)
        _assert_same(resumed, fresh[start:])
        # Per-step counts are a function of the step: the resumed run counts the same files.
        assert [x[1] for x in counts] == [x[1] for x in fresh_counts[start:]]
        assert [x[4] for x in counts] == [x[4] for x in fresh_counts[start:]]


def test_stops_only_when_a_batch_cannot_be_filled(tmp_path):
    # 5 good of 8: the batch of 4 and its successor still hold 4 good ones.
    _write_split(tmp_path, "train", 5, bad=BAD)
    ok = config_for(tmp_path, batch_size=4)
    batches, counts = _run(ok, 2)
    assert all(b["label"].shape == (4,) for b in batches)
    # 1 good of 4 files: no batch of 4 can be filled, in either mode; one line says why.
    bad = tmp_path / "fewer"
    _write_split(bad, "train", 1, bad=BAD)
    for cache in (False, True):
        c = config_for(bad, batch_size=4, cache=cache, random_flip=False)
        with pytest.raises(RuntimeError, match="too many files are corrupt") as err:
            _run(c, 1)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("cache", [False, True])
def test_fail_policy_names_the_file(root, cache):
    c = config_for(root, cache=cache, random_flip=False, bad_images="fail")
    with pytest.raises(ValueError, match=r"(garbage|truncated)\.(png|jpg).*cannot be decoded"):
        _run(c, 12)
    with pytest.raises(ValueError, match="bad_images must be one of"):
        _run(config_for(root, bad_images="ignore"), 1)


def test_eval_skips_counts_and_keeps_every_good_example_once(root, caplog):
    c = config_for(root)
    for count in (1, 2):
        total, labels, steps = 0, [], []
        for index in range(count):
            counter = ip.BadImageCounter()
            batches = list(
                ip.eval_dataset(c, process_index=index, process_count=count, bad_images=counter)
            )
            steps.append(len(batches))
            labels += [b["label"][b["mask"]] for b in batches]
            total += counter.total
        assert len(set(steps)) == 1
        assert sum(len(x) for x in labels) == 7  # the 7 good images, each once
        assert total == 3
    counter = ip.BadImageCounter()
    with caplog.at_level(logging.WARNING, logger="vgg_jax.eval_input"):
        full = list(ip.eval_dataset(c, mode="full", process_index=0, process_count=1,
                                    bad_images=counter))  # fmt: skip
    assert sum(int(b["mask"].sum()) for b in full) == 7 and counter.total == 3
    assert all(name in caplog.text for name in BAD)
    with pytest.raises(ValueError, match=r"Evaluation image .*(garbage|truncated)"):
        list(ip.eval_dataset(config_for(root, bad_images="fail"), process_index=0,
                             process_count=1))  # fmt: skip


def test_each_process_resumes_its_own_share_of_the_counts():
    counters = [ip.BadImageCounter(epoch=2, epoch_count=n, total=10 * n) for n in (1, 3)]
    saved = counters[0].saved(np.array([[c.epoch_count, c.total] for c in counters]))
    assert (saved["epoch"], saved["epoch_count"], saved["total"]) == (2, 4, 40)
    for index, own in ((0, (1, 10)), (1, (3, 30))):  # as many processes: each its own share
        counter = ip.BadImageCounter()
        counter.resume(saved, index, 2)
        assert (counter.epoch, counter.epoch_count, counter.total) == (2, *own)
    # Another process count: process 0 takes the run's counts, so their sum stays 40.
    resumed = [ip.BadImageCounter() for _ in range(3)]
    for index, counter in enumerate(resumed):
        counter.resume(saved, index, 3)
    assert [(c.epoch_count, c.total) for c in resumed] == [(4, 40), (0, 0), (0, 0)]
    # A checkpoint of an earlier version kept one process's counts, without "processes".
    earlier = {"epoch": 1, "epoch_count": 5, "total": 7}
    counter = ip.BadImageCounter()
    counter.resume(earlier, 0, 1)
    assert (counter.epoch, counter.epoch_count, counter.total) == (1, 5, 7)
