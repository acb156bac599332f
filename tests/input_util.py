"""Data for the input-pipeline tests: Fashion-MNIST configs, a folder of awkward photos."""

import io
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from configs.default import get_config
from vgg_jax import data_sources

FASHION_DIR = data_sources.find_fashion_mnist_dir()


def fashion_tfds_dir() -> str:
    """A tfds data_dir for Fashion-MNIST (the `tfds_dir` fixture of conftest.py)."""
    if FASHION_DIR is None:
        pytest.fail(data_sources.FASHION_MNIST_HELP)  # the data is a test prerequisite
    # tfds's own data_dir, where the demo and the end-to-end tests prepare it too: prepared
    # once per machine (15-50 s) instead of once per test worker. Concurrent workers wait
    # for the first one's preparation (data_sources locks it). VGG_JAX_TEST_TFDS_DIR
    # names another.
    from tensorflow_datasets.core import constants

    return os.environ.get("VGG_JAX_TEST_TFDS_DIR") or constants.DATA_DIR


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


def jpeg(img: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resized(arr, width) -> Image.Image:
    img = Image.fromarray(arr)
    return img.resize((width, max(1, round(img.height * width / img.width))), Image.BILINEAR)


PHOTOS = {
    "cat": ("chelsea", "cat"),
    "coffee": ("coffee",),
    "rocket": ("rocket", "astronaut"),
}


def write_photo_folder(root):
    """`root` with train/ and val/ class folders of real photos in awkward encodings, plus
    corrupt files (the `photo_root` fixture of conftest.py)."""
    for split, widths in (("train", (500, 333, 160, 64)), ("val", (500, 200))):
        for cls, names in PHOTOS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for name in names:
                arr = getattr(skimage.data, name)()
                for w in widths:
                    (d / f"{name}_{w}.jpg").write_bytes(jpeg(resized(arr, w)))
                (d / f"{name}_grey.jpg").write_bytes(jpeg(resized(arr, 300).convert("L")))
                (d / f"{name}_cmyk.jpg").write_bytes(jpeg(resized(arr, 300).convert("CMYK")))
                resized(arr, 250).convert("RGBA").save(d / f"{name}_alpha.png")
                resized(arr, 12).save(d / f"{name}_tiny.png")  # smaller than the crop
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
