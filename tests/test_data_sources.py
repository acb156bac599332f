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
