"""Data sources: Fashion-MNIST's IDX files checked, and the ways to get them when missing."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from input_util import FASHION_DIR

from vgg_jax import data_sources


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


def test_an_unknown_dataset_is_one_line_with_the_nearest_names(tmp_path):
    # tfds's own message lists all 400+ of its names on as many lines.
    with pytest.raises(ValueError) as e:
        data_sources.create_source("cifar1O", data_dir=str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and len(message) < 300, message
    assert message.startswith("Unknown dataset 'cifar1O'. Did you mean 'cifar10'")
    with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_data'\. Give a"):
        data_sources.create_source("no_such_data", data_dir=str(tmp_path))


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


def test_concurrent_preparation_waits_for_the_first(tfds_dir, tmp_path, caplog):
    """A second process (here a thread) that finds the data being prepared waits, then uses it."""
    import shutil
    import threading

    data_sources.fashion_mnist_builder(tfds_dir)  # the copy the first process will "make"
    fresh = tmp_path / "tfds"
    builder = tfds.builder("fashion_mnist", data_dir=str(fresh))
    found = []
    waiter = threading.Thread(
        target=lambda: found.append(data_sources.fashion_mnist_builder(str(fresh)))
    )
    with caplog.at_level("INFO", logger=data_sources.__name__):
        with data_sources._preparing(builder):  # this "process" is preparing
            waiter.start()
            waiter.join(timeout=1.0)
            assert waiter.is_alive()  # blocked on the lock, not preparing a second copy
            shutil.copytree(os.path.join(tfds_dir, "fashion_mnist"), fresh / "fashion_mnist")
        waiter.join(timeout=60)
    assert not waiter.is_alive() and found[0].is_prepared()
    assert found[0].info.splits["test"].num_examples == 10_000
    assert "Preparing" not in caplog.text  # it used the copy the first one made


def test_an_unprepared_dataset_is_one_error_and_leaves_no_empty_folders(tmp_path):
    # ImageNet without its manual download: tfds fails at once, offline. The empty
    # imagenet2012/ and downloads/ folders it made made tfds warn on every later run.
    (tmp_path / "fashion_mnist").mkdir()  # someone else's folder: kept
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar and .* in config"):
        data_sources.create_source("imagenet2012", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == ["fashion_mnist"]
