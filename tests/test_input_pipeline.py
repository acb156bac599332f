"""Input pipeline on real data: Fashion-MNIST (Debian IDX files) and an image folder of photos."""

import functools
import io
import logging
import os
import re

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs.default import get_config
from vgg_jax import data_sources
from vgg_jax import input_pipeline as ip

FASHION_DIR = data_sources.find_fashion_mnist_dir()


# ---------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    if FASHION_DIR is None:
        pytest.fail(data_sources.FASHION_MNIST_HELP)  # the data is a test prerequisite
    # A prepared tfds data_dir may be reused across runs (preparation takes 15-50 s).
    return os.environ.get("VGG_JAX_TEST_TFDS_DIR") or str(tmp_path_factory.mktemp("tfds"))


def fashion_config(data_dir, **overrides):
    """The seed experiment's settings: plain bilinear resize to 32, values in [0, 1]."""
    c = get_config()
    c.dataset, c.data_dir = "fashion_mnist", data_dir
    c.train_split, c.eval_split = "train", "test"
    c.num_classes, c.image_size = 10, 32
    c.train_scale_min = c.train_scale_max = c.eval_scale = 32
    c.random_flip, c.color_shift = False, 0.0
    c.value_range, c.mean_rgb, c.std_rgb = 1.0, (0.0,), (1.0,)
    c.batch_size, c.eval_batch_size, c.shuffle_buffer = 64, 96, 1024
    c.update(overrides)
    return c


def _jpeg(img: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resized(arr, width) -> Image.Image:
    img = Image.fromarray(arr)
    return img.resize((width, max(1, round(img.height * width / img.width))), Image.BILINEAR)


PHOTOS = {
    "cat": ("chelsea", "cat"),
    "coffee": ("coffee",),
    "rocket": ("rocket", "astronaut"),
}


@pytest.fixture(scope="session")
def photo_root(tmp_path_factory):
    """train/ and val/ class folders of real photos in awkward encodings, plus corrupt files."""
    root = tmp_path_factory.mktemp("folder")
    for split, widths in (("train", (500, 333, 160, 64)), ("val", (500, 200))):
        for cls, names in PHOTOS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for name in names:
                arr = getattr(skimage.data, name)()
                for w in widths:
                    (d / f"{name}_{w}.jpg").write_bytes(_jpeg(_resized(arr, w)))
                (d / f"{name}_grey.jpg").write_bytes(_jpeg(_resized(arr, 300).convert("L")))
                (d / f"{name}_cmyk.jpg").write_bytes(_jpeg(_resized(arr, 300).convert("CMYK")))
                _resized(arr, 250).convert("RGBA").save(d / f"{name}_alpha.png")
                _resized(arr, 12).save(d / f"{name}_tiny.png")  # smaller than the crop
    good = (root / "train" / "cat" / "chelsea_500.jpg").read_bytes()
    (root / "train" / "coffee" / "broken.jpg").write_bytes(good[: len(good) // 3])
    (root / "train" / "rocket" / "garbage.png").write_bytes(b"not an image at all")
    return root


def folder_config(root, **overrides):
    c = get_config()
    c.dataset, c.data_dir = "image_folder", str(root)
    c.train_split, c.eval_split = "train", "val"
    c.num_classes, c.image_size = 3, 32
    c.train_scale_min, c.train_scale_max, c.eval_scale = 32, 64, 36
    c.batch_size, c.eval_batch_size = 8, 8
    c.update(overrides)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------------------
# Fashion-MNIST.


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


def test_fashion_mnist_eval_counts_every_example_once_over_processes(tfds_dir):
    c = fashion_config(tfds_dir)
    idx = os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz")
    images = data_sources.read_idx(idx.replace("labels-idx1", "images-idx3"), 2051, 10_000)
    labels = data_sources.read_idx(idx, 2049, 10_000)
    for count in (1, 2):
        hist, total, pixel_sum, num_batches = np.zeros(10, int), 0, 0.0, []
        for index in range(count):
            batches = list(ip.eval_dataset(c, process_index=index, process_count=count))
            num_batches.append(len(batches))
            for b in batches:
                assert b["image"].shape == (96 // count, 32, 32, 1)
                m = b["mask"]
                hist += np.bincount(b["label"][m], minlength=10)
                total += m.sum()
                pixel_sum += b["image"][m].mean(axis=(1, 2, 3)).sum()
        assert total == 10_000  # 10000 % 96 (and % 48 per process) leave remainders
        assert len(set(num_batches)) == 1  # every process runs the same number of steps
        np.testing.assert_array_equal(hist, np.bincount(labels, minlength=10))
        # Bilinear upscaling keeps the mean brightness of the real test set.
        assert abs(pixel_sum / total - images.mean() / 255) < 2e-3


def test_train_is_deterministic_and_resumes_exactly_across_epochs(tfds_dir):
    # 10 steps per epoch; scale jitter and flips on, so augmentation must also match.
    c = fashion_config(
        tfds_dir, train_split="train[:640]", train_scale_max=44, random_flip=True, seed=3
    )
    assert ip.steps_per_epoch(c) == 10
    fresh = take(ip.train_dataset(c, process_index=1, process_count=2), 24)
    again = take(ip.train_dataset(c, process_index=1, process_count=2), 24)
    assert_batches_equal(fresh, again)
    for start in (7, 13):
        resumed = take(ip.train_dataset(c, start_step=start, process_index=1, process_count=2), 5)
        assert_batches_equal(resumed, fresh[start : start + 5])
    # Epochs differ in order, and the other process sees other examples.
    assert not np.array_equal(fresh[0]["label"], fresh[10]["label"])
    other = next(ip.train_dataset(c, process_index=0, process_count=2))
    assert not np.array_equal(other["image"], fresh[0]["image"])
    c.seed = 4
    assert not np.array_equal(
        next(ip.train_dataset(c, process_index=1, process_count=2))["image"], fresh[0]["image"]
    )


def test_cache_serves_the_same_images_and_resumes_exactly(tfds_dir):
    # 10 steps per epoch; two processes, each with its own 320-image share.
    c = fashion_config(tfds_dir, train_split="train[:640]", seed=5, mean_rgb=(0.3,))
    cached = c.copy_and_resolve_references()
    cached.cache = True
    kw = dict(process_index=1, process_count=2)
    streamed = take(ip.train_dataset(c, **kw), 10)
    fresh = take(ip.train_dataset(cached, **kw), 24)

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
    assert_batches_equal(take(ip.train_dataset(cached, **kw), 24), fresh)
    for start in (7, 13):
        resumed = take(ip.train_dataset(cached, start_step=start, **kw), 5)
        assert_batches_equal(resumed, fresh[start : start + 5])
    other = next(ip.train_dataset(cached, process_index=0, process_count=2))
    assert not np.array_equal(other["image"], fresh[0]["image"])


def test_cache_refuses_augmentations_that_change_every_epoch(tfds_dir):
    c = fashion_config(tfds_dir, cache=True, random_flip=True, train_scale_max=40)
    with pytest.raises(ValueError, match=r"random crops.*random flips.*cache=False"):
        next(ip.train_dataset(c, process_index=0, process_count=1))


def test_cache_of_an_image_folder_counts_the_corrupt_files(photo_root, caplog):
    c = folder_config(photo_root, cache=True, train_scale_max=32, random_flip=False)
    c.color_shift = 0.0
    with caplog.at_level(logging.WARNING, logger="vgg_jax.input_pipeline"):
        batch = next(ip.train_dataset(c, process_index=0, process_count=1))
    assert batch["image"].shape == (8, 32, 32, 3) and np.isfinite(batch["image"]).all()
    assert "skipped 2 training image(s)" in caplog.text  # broken.jpg and garbage.png


@pytest.mark.parametrize("online", [False, True])
def test_missing_fashion_mnist_lists_the_three_ways(tmp_path, monkeypatch, online):
    monkeypatch.setattr(data_sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "none"))
    monkeypatch.delenv(data_sources.FASHION_MNIST_ENV, raising=False)
    # Offline it fails at once (tfds itself would retry for minutes); online, on a failed download.
    monkeypatch.setattr(data_sources, "_reachable", lambda url: online)

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(FileNotFoundError) as err:
        data_sources.fashion_mnist_builder(str(tmp_path / "tfds"))
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert data_sources.FASHION_MNIST_ENV in msg and "online" in msg


def test_idx_headers_and_counts_are_validated(tmp_path):
    real = os.path.join(FASHION_DIR or "", "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="holds 10000 items"):
        data_sources.read_idx(real, 2049, 60_000)
    with pytest.raises(ValueError, match="magic"):
        data_sources.read_idx(real, 2051, 10_000)
    short = tmp_path / "t.idx"
    short.write_bytes(np.array([2049, 10_000], ">u4").tobytes() + bytes(50))
    with pytest.raises(ValueError, match="truncated"):
        data_sources.read_idx(str(short), 2049, 10_000)


# ---------------------------------------------------------------------------
# Augmentation statistics on real photographs.


def _photo_jpeg(name="coffee", width=500) -> tf.Tensor:
    return tf.constant(_jpeg(_resized(getattr(skimage.data, name)(), width), quality=95))


def _aug(**kw):
    base = dict(
        size=64,
        scale_min=64,
        scale_max=128,
        flip=False,
        color_shift=0.0,
        channels=3,
        method="bilinear",
    )
    return ip.Augment(**{**base, **kw})


def _seed(i):
    return tf.constant([7, i], tf.int64)


@functools.cache
def _pre(aug):
    """train_preprocess compiled once per Augment (eager op-by-op is slow)."""
    return tf.function(lambda encoded, seed: ip.train_preprocess(encoded, seed, aug))


@functools.cache
def _crop(aug):
    return tf.function(lambda encoded, seed: ip.random_scaled_crop(encoded, seed, aug))


def test_scale_jitter_covers_range_and_crops_stay_inside():
    aug = _aug(size=224, scale_min=256, scale_max=512)
    h, w = 375, 500
    scales, oys, oxs = [], [], []
    for i in range(600):
        s, big_h, big_w, oy, ox = (int(v) for v in ip.sample_crop(h, w, _seed(i), aug))
        assert big_h == s and abs(big_w - round(w * s / h)) <= 1  # smallest side is S
        assert 0 <= oy <= big_h - 224 and 0 <= ox <= big_w - 224
        scales.append(s)
        oys.append(oy / (big_h - 224) if big_h > 224 else 0.5)
        oxs.append(ox / (big_w - 224))
    assert min(scales) <= 262 and max(scales) >= 506
    assert abs(np.mean(scales) - 384) < 12  # uniform on [256, 512]: sd of the mean ~3
    assert abs(np.mean(oxs) - 0.5) < 0.05 and min(oxs) < 0.02 and max(oxs) > 0.98


@pytest.mark.parametrize(
    "name,width,fmt", [("rocket", 500, "jpeg"), ("coffee", 40, "jpeg"), ("chelsea", 300, "png")]
)
def test_decode_and_crop_equals_resize_then_crop(name, width, fmt):
    """The window path (decode_and_crop_jpeg + direct resampling) reproduces the classic
    decode -> resize whole image -> crop, down- and upscaling, edges included."""
    img = _resized(getattr(skimage.data, name)(), width)
    if fmt == "jpeg":
        encoded = tf.constant(_jpeg(img, quality=95))
    else:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        encoded = tf.constant(buf.getvalue())
    fast, full = _aug(decode_crop=True), _aug(decode_crop=False)
    for i in range(25):
        a = _crop(fast)(encoded, _seed(i)).numpy()
        b = _crop(full)(encoded, _seed(i)).numpy()
        assert a.shape == b.shape == (64, 64, 3)
        np.testing.assert_allclose(a, b, atol=0.01)


def test_flip_rate_is_one_half():
    encoded = _photo_jpeg("chelsea", 300)
    flipped = 0
    n = 200
    for i in range(n):
        a = _pre(_aug(flip=True))(encoded, _seed(i)).numpy()
        b = _pre(_aug(flip=False))(encoded, _seed(i)).numpy()
        if np.allclose(a, b[:, ::-1], atol=0.01) and not np.allclose(a, b, atol=0.01):
            flipped += 1
        else:
            np.testing.assert_allclose(a, b, atol=0.01)
    assert abs(flipped / n - 0.5) < 0.1  # binomial sd 0.035


def test_color_shift_follows_the_imagenet_pca():
    encoded = _photo_jpeg("coffee", 300)
    deltas = []
    for i in range(200):
        a = _pre(_aug(color_shift=0.1))(encoded, _seed(i)).numpy()
        b = _pre(_aug())(encoded, _seed(i)).numpy()
        d = (a - b).reshape(-1, 3)
        assert np.allclose(d, d[0], atol=1e-3)  # one RGB offset per image
        deltas.append(d[0])
    deltas = np.array(deltas)
    assert np.all(np.abs(deltas.mean(0)) < 1.5)
    evals, evecs = np.linalg.eigh(np.cov(deltas.T))
    # Main axis: ImageNet's first eigenvector, sd 0.1 * 0.2175 * 255 = 5.5 levels.
    assert abs(evecs[:, -1] @ ip.PCA_EIGVEC[:, 0]) > 0.99
    assert abs(np.sqrt(evals[-1]) - 0.1 * 0.2175 * 255) < 0.1 * 0.2175 * 255 * 0.2

    # The pipeline's fused colour shift + normalisation equals normalize() of the shifted image.
    c = get_config()
    c.value_range, c.std_rgb = 1.0, (0.2, 0.3, 0.25)
    c.mean_rgb = (0.5, 0.4, 0.3)
    fused = ip.train_preprocess(encoded, _seed(5), _aug(color_shift=0.1), c).numpy()
    plain = ip.normalize(ip.train_preprocess(encoded, _seed(5), _aug(color_shift=0.1)), c)
    np.testing.assert_allclose(fused, plain.numpy(), rtol=1e-5, atol=1e-4)


def test_mean_subtraction_and_no_colour_shift_for_grey(photo_root):
    c = folder_config(photo_root, color_shift=0.0)
    raw = folder_config(photo_root, color_shift=0.0, mean_rgb=(0.0, 0.0, 0.0))
    a = next(ip.train_dataset(c, process_index=0, process_count=1))
    b = next(ip.train_dataset(raw, process_index=0, process_count=1))
    np.testing.assert_allclose(
        b["image"] - a["image"], np.broadcast_to(c.mean_rgb, a["image"].shape), atol=1e-3
    )
    np.testing.assert_allclose(
        ip.normalize(np.full((2, 2, 3), 255, np.uint8), c)[0, 0],
        (255 - np.array(c.mean_rgb)),
        rtol=1e-6,
    )
    # The colour shift is defined for RGB only: a 1-channel image is left alone.
    grey = tf.constant(_jpeg(_resized(skimage.data.camera(), 200)))
    g1 = ip.train_preprocess(grey, _seed(0), _aug(channels=1, color_shift=0.1))
    g0 = ip.train_preprocess(grey, _seed(0), _aug(channels=1))
    np.testing.assert_array_equal(g1.numpy(), g0.numpy())


# ---------------------------------------------------------------------------
# Image folder.


def test_image_folder_batches_from_awkward_files(photo_root, caplog):
    # 7 x 6 = 42 = all records: the epoch needs the second pass, so both bad files were met.
    c = folder_config(photo_root, batch_size=7)
    assert ip.image_shape(c) == (32, 32, 3)
    assert ip.num_examples(c, "train") == 5 * 8 + 2  # 8 files per photo, 2 corrupt files
    steps = ip.steps_per_epoch(c)
    with caplog.at_level(logging.WARNING, logger="vgg_jax.input_pipeline"):
        batches = take(ip.train_dataset(c, process_index=0, process_count=1), steps + 1)
    for b in batches:
        assert b["image"].shape == (7, 32, 32, 3) and np.isfinite(b["image"]).all()
        assert set(b["label"]) <= {0, 1, 2}
    # 2, or 3 if a bad file also opens the second pass.
    assert re.search(r"skipped [23] training image\(s\)", caplog.text), caplog.text

    # CMYK, grey and alpha files decode to the same picture as PIL's RGB conversion.
    for f in ("chelsea_cmyk.jpg", "chelsea_grey.jpg", "chelsea_alpha.png"):
        data = (photo_root / "train" / "cat" / f).read_bytes()
        ours = ip.decode_image(tf.constant(data), 3).numpy().astype(float)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), float)
        assert ours.shape == ref.shape and np.abs(ours - ref).mean() < 2.0, f


def test_image_folder_eval_exact_and_corrupt_file_named(photo_root, tmp_path):
    c = folder_config(photo_root, eval_batch_size=4)
    n = ip.num_examples(c, "val")
    assert n == 5 * 6
    for count in (1, 2):
        labels, steps = [], []
        for index in range(count):
            bs = list(ip.eval_dataset(c, process_index=index, process_count=count))
            steps.append(len(bs))
            labels += [b["label"][b["mask"]] for b in bs]
        assert len(set(steps)) == 1
        assert sum(len(x) for x in labels) == n  # 30 = 7 * 4 + 2 and 2 * (7 * 2 + 1)
    full = list(ip.eval_dataset(c, mode="full", scale=40, process_index=0, process_count=1))
    assert len(full) == n
    for b in full:
        assert b["image"].shape[0] == 1 and min(b["image"].shape[1:3]) == 40

    (photo_root / "val" / "coffee" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0junk")
    try:
        ip._cached_source.cache_clear()
        counter = ip.BadImageCounter()
        batches = list(ip.eval_dataset(c, process_index=0, process_count=1, bad_images=counter))
        assert sum(int(b["mask"].sum()) for b in batches) == n  # skipped by default, and counted
        assert counter.total == 1
        c.bad_images = "fail"
        with pytest.raises(ValueError, match="zz_broken.jpg"):
            list(ip.eval_dataset(c, process_index=0, process_count=1))
    finally:
        (photo_root / "val" / "coffee" / "zz_broken.jpg").unlink()
        ip._cached_source.cache_clear()


def test_eval_raw_pixels_at_several_scales_in_one_stream(photo_root):
    """scales=(...): every example at each Q in one stream, as the single-scale streams give it."""
    c = folder_config(photo_root, mean_rgb=(100.0, 110.0, 120.0), std_rgb=(50.0, 60.0, 70.0))
    kw = dict(mode="full", process_index=0, process_count=1)
    multi = list(ip.eval_dataset(c, normalize=False, scales=(32, 40), **kw))
    assert len(multi) == ip.num_examples(c, "val") and "image" not in multi[0]
    for q in (32, 40):
        single = list(ip.eval_dataset(c, scale=q, **kw))
        for m, s in zip(multi, single, strict=True):
            raw = m["images"][q]
            assert min(raw.shape[1:3]) == q and raw.shape == s["image"].shape
            assert 0.0 <= raw.min() and raw.max() <= 1.0  # raw pixels, not normalised
            # normalize() of the raw pixels (value_range 255) is the default stream's image.
            np.testing.assert_allclose(ip.normalize(raw * 255.0, c), s["image"], atol=1e-4)
            np.testing.assert_array_equal(m["label"], s["label"])
    with pytest.raises(ValueError, match="at least one"):
        ip.eval_dataset(c, scales=(), **kw)
    with pytest.raises(ValueError, match="smaller than image_size"):
        ip.eval_dataset(c, scales=(40, 16), process_index=0, process_count=1)


def test_image_folder_resume_exact(photo_root):
    c = folder_config(photo_root, color_shift=0.1, random_flip=True)
    c.train_split = "val"  # no corrupt files: resume is exact
    fresh = take(ip.train_dataset(c, process_index=0, process_count=2), 6)
    resumed = take(ip.train_dataset(c, start_step=3, process_index=0, process_count=2), 3)
    assert_batches_equal(resumed, fresh[3:])


def test_clear_errors(photo_root, tmp_path):
    with pytest.raises(ValueError, match="config.num_classes=3"):
        next(
            ip.train_dataset(
                folder_config(photo_root, num_classes=2), process_index=0, process_count=1
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
    ip._cached_source.cache_clear()
    monkeypatch.setattr(ip.get_source(c), "num_classes", None)
    try:
        with pytest.raises(ValueError, match="label out of range"):
            list(ip.eval_dataset(c, process_index=0, process_count=1))
        c.train_split = "val"
        with pytest.raises(tf.errors.InvalidArgumentError, match="label out of range"):
            take(ip.train_dataset(c, process_index=0, process_count=1), 4)
    finally:
        ip._cached_source.cache_clear()


def test_all_corrupt_training_data_is_an_error(tmp_path):
    for i in range(4):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(RuntimeError, match="too many files are corrupt"):
        next(
            ip.train_dataset(
                folder_config(tmp_path, num_classes=1, batch_size=2),
                process_index=0,
                process_count=1,
            )
        )


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
    ip._cached_source.cache_clear()
