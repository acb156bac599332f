"""Workdir files on URLs (TPU pods write to gs://): exercised on TensorFlow's in-memory ram://."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vgg_jax import checkpoints, fileio
from vgg_jax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def url_dir(tmp_path):
    # A fresh in-memory directory per test (tmp_path's name keeps them apart).
    path = f"ram://{tmp_path.name}/run"
    fileio.makedirs(path)
    return path


def test_absolute_leaves_urls_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fileio.absolute("gs://bucket/runs/a") == "gs://bucket/runs/a"
    assert fileio.absolute("runs/a") == str(tmp_path / "runs" / "a")
    assert fileio.join("gs://bucket", "runs", "a") == "gs://bucket/runs/a"
    assert fileio.basename("gs://bucket/runs/a/") == "a"


@pytest.mark.parametrize("where", ["local", "url"])
def test_atomic_write_append_and_read(where, tmp_path, url_dir):
    root = str(tmp_path) if where == "local" else url_dir
    path = fileio.join(root, "notes.txt")
    assert not fileio.exists(path)
    fileio.write_text_atomic(path, "one\n")
    fileio.append_text(path, "two\n")
    fileio.append_text(path, "three\n")
    assert fileio.read_text(path) == "one\ntwo\nthree\n"
    assert fileio.isfile(path) and not fileio.isdir(path) and fileio.isdir(root)
    assert tf.io.gfile.listdir(root) == ["notes.txt"]  # no temporary file left


def test_an_atomic_write_makes_its_folders_and_its_errors_name_the_file(tmp_path):
    path = tmp_path / "new" / "deeper" / "result.json"  # `--output results/x.json`
    fileio.write_text_atomic(path, "{}")
    assert path.read_text() == "{}"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError) as e:  # a folder to make where a file is
        fileio.write_text_atomic(blocker / "result.json", "{}")
    assert e.value.filename in (str(blocker), str(blocker / "result.json"))
    with pytest.raises(IsADirectoryError) as e:
        fileio.write_text_atomic(tmp_path / "new", "{}")
    assert e.value.filename == str(tmp_path / "new")  # not the temporary name
    assert sorted(os.listdir(tmp_path)) == ["a_file", "new"]  # no temporary file left


def test_concurrent_atomic_writers_of_one_file_each_leave_a_whole_file(tmp_path):
    # Two processes storing one result at once (two `evaluate` commands): with one shared
    # temporary name, one renamed the other's half-written file and the other then failed.
    path = tmp_path / "result.json"
    script = (
        "import sys; from vgg_jax import fileio\n"
        "for _ in range(200): fileio.write_text_atomic(sys.argv[1], sys.argv[2] * 100_000)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), letter], env=env,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for letter in "ab"
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    assert path.read_text() in ("a" * 100_000, "b" * 100_000)
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left


def test_metrics_curves_and_run_config_on_a_url(url_dir):
    writer = metrics_lib.MetricsWriter(url_dir, tensorboard=False)
    for step, epoch, loss, acc in [(10, 0.5, 2.0, 0.3), (20, 1.0, 1.5, 0.5), (40, 2.0, 1.0, 0.7)]:
        writer.write(step, epoch, {"train_loss": loss, "train_accuracy": acc})
    writer.write(20, 1.0, {"eval_top1_accuracy": 0.6})
    writer.close()
    records = metrics_lib.read_metrics(url_dir)
    assert [r["step"] for r in records] == [10, 20, 40, 20]
    png = metrics_lib.plot_curves(url_dir)
    assert png == fileio.join(url_dir, metrics_lib.CURVES_FILE)
    assert np.asarray(Image.open(io.BytesIO(fileio.read_bytes(png)))).shape[:2] == (480, 720)

    fileio.write_text_atomic(fileio.join(url_dir, checkpoints.CONFIG_FILE), json.dumps({"a": 1}))
    assert checkpoints.read_run_config(url_dir) == {"a": 1}


@pytest.mark.parametrize("where", ["local", "url"])
def test_move_tree_moves_every_file(where, tmp_path, url_dir):
    root = str(tmp_path) if where == "local" else url_dir
    source = fileio.join(root, "checkpoints", "30")
    fileio.makedirs(fileio.join(source, "state", "d"))
    fileio.write_text_atomic(fileio.join(source, "_CHECKPOINT_METADATA"), "{}")
    fileio.write_text_atomic(fileio.join(source, "state", "d", "ab12"), "data")
    fileio.makedirs(fileio.join(root, "damaged"))
    target = fileio.join(root, "damaged", "checkpoints-30")
    fileio.move_tree(source, target)
    assert not fileio.exists(source) and fileio.isdir(fileio.join(root, "checkpoints"))
    assert fileio.read_text(fileio.join(target, "state", "d", "ab12")) == "data"
    assert fileio.read_text(fileio.join(target, "_CHECKPOINT_METADATA")) == "{}"
