"""Adversarial cases, each a subprocess run of the real command (docs/robustness.md lists them).

Every failure must be one line on stderr with a non-zero exit status, never a
traceback, and nothing may be lost. One tiny run of `python -m vgg_jax.train` on a
32 px image folder (2 steps, a checkpoint each) is shared by the cases that need a
trained workdir; each copies it before changing it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
import importlib.util

_spec = importlib.util.spec_from_file_location("adversarial_default", {default!r})
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config():
    c = _default.get_config()
    c.model, c.num_classes, c.width_divisor, c.fc_width = "vgg11", 2, 16, 32
    c.dataset, c.data_dir, c.train_split, c.eval_split = "image_folder", {data!r}, "train", "val"
    c.image_size = c.train_scale_min = c.train_scale_max = c.eval_scale = 32
    c.random_flip, c.color_shift, c.shuffle_buffer = False, 0.0, 16
    c.batch_size = c.eval_batch_size = 4
    c.num_devices, c.max_steps, c.checkpoint_every_steps, c.log_every_steps = 1, 2, 1, 1
    c.schedule, c.progress_bar, c.tensorboard = "constant", False, False
    return c
"""


def _command(module, *args, env=None, timeout=300):
    """Runs `python -m vgg_jax.<module> args`; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", f"vgg_jax.{module}", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_failure(proc) -> str:
    """Asserts a failure reported in one line without a traceback; returns that line."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, proc.stdout
    return lines[-1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A compilation cache shared by the subprocesses (the same tiny model compiles once)."""
    return {"VGG_JAX_COMPILATION_CACHE": str(tmp_path_factory.mktemp("jax_cache"))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """image_folder data: 2 classes, 8 training and 4 validation PNGs; and its config file."""
    root = tmp_path_factory.mktemp("adversarial")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for i in range(count):
            d = root / "photos" / split / f"class{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.png")
    config = root / "tiny.py"
    default = os.path.join(ROOT, "configs", "default.py")
    config.write_text(CONFIG.format(default=default, data=str(root / "photos")))
    return root


@pytest.fixture(scope="module")
def trained(folder, env):
    """A workdir trained by the real command: checkpoints at steps 1 and 2."""
    workdir = folder / "trained"
    proc = _command("train", "--config", folder / "tiny.py", "--workdir", workdir, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workdir


def _copy(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------
# Config files.


def test_config_file_errors_are_one_line_naming_file_and_line(tmp_path, folder):
    proc = _command("train", "--config", tmp_path / "nope.py", "--workdir", tmp_path / "w")
    assert f"config file {tmp_path / 'nope.py'} does not exist" in _one_line_failure(proc)

    proc = _command("train", "--config", "configs/fashion_mnist.py:nope", "--workdir", tmp_path)
    line = _one_line_failure(proc)
    assert "Unknown variant 'nope'; choose one of ('seed', 'quick', 'd2l')" in line
    assert "configs/fashion_mnist.py, line " in line

    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        def get_config():
            c = dict(
            return c
    """))
    proc = _command("train", "--config", bad, "--workdir", tmp_path / "w")
    line = _one_line_failure(proc)
    assert f"syntax error in {bad}, line 3: 'c = dict('" in line
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------
# Workdirs.


def test_unusable_workdirs_are_one_line(tmp_path, folder, env):
    config = folder / "tiny.py"
    (tmp_path / "file").write_text("not a directory")
    proc = _command("train", "--config", config, "--workdir", tmp_path / "file", env=env)
    assert "is a file; give a directory" in _one_line_failure(proc)
    proc = _command("train", "--config", config, "--workdir", tmp_path / "file" / "sub", env=env)
    assert "a part of this path is a file" in _one_line_failure(proc)
    assert (tmp_path / "file").read_text() == "not a directory"  # nothing lost


def test_read_only_workdir_is_one_line(tmp_path, folder, env):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = _mount(readonly, "ro,size=64k")
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions and cannot mount here: not testable")
        readonly.chmod(0o500)
    try:
        proc = _command("train", "--config", folder / "tiny.py", "--workdir", readonly / "w",
                        env=env)  # fmt: skip
        line = _one_line_failure(proc)
        assert str(readonly / "w") in line
        assert "read-only" in line or "permission denied" in line
    finally:
        if mounted:
            subprocess.run(["umount", str(readonly)], check=True)


def _mount(path, options) -> bool:
    """Mounts a tmpfs on `path` (possible as root); False where mounting is not allowed."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return proc.returncode == 0


def test_evaluate_on_a_workdir_without_checkpoint(tmp_path, trained):
    (tmp_path / "config.json").write_text((trained / "config.json").read_text())
    proc = _command("evaluate", "--workdir", tmp_path, "--mode", "dense", "--scales", "32")
    assert f"{tmp_path} has no checkpoint yet; train first." in _one_line_failure(proc)


def test_paths_that_do_not_exist(tmp_path, trained):
    proc = _command("evaluate", "--checkpoint", tmp_path / "none", "--scales", "32")
    line = _one_line_failure(proc)
    assert str(tmp_path / "none") in line and "no such bundle or run directory exists" in line
    proc = _command("predict", tmp_path / "none.jpg", "--weights", trained)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "none.jpg" in proc.stderr


# ---------------------------------------------------------------------------
# Checkpoints and bundles.


def test_evaluate_latest_skips_a_damaged_checkpoint_in_one_line(tmp_path, trained, folder):
    run = _copy(trained, tmp_path)
    data = max((p for p in (run / "checkpoints" / "2").rglob("*") if "/d/" in str(p)),
               key=lambda p: p.stat().st_size)  # fmt: skip
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = tmp_path / "r.json"
    proc = _command("evaluate", "--workdir", run, "--which", "latest", "--scales", "32",
                    "--mode", "dense", "--no-flip", "--output", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint 2 is damaged (checkpoints/2/state/" in proc.stderr
    assert ": checksum mismatch); left in place; using 1" in proc.stderr
    assert json.loads(out.read_text())["rows"][0]["count"] == 4
    assert (run / "checkpoints" / "2").is_dir()  # evaluation moves nothing


def test_predict_accepts_a_training_workdir(trained, folder):
    image = next((folder / "photos" / "val").rglob("*.png"))
    proc = _command("predict", image, "--weights", trained, "--top", "2")
    assert proc.returncode == 0, proc.stderr
    assert "1. " in proc.stdout and "2. " in proc.stdout


def test_bundle_with_another_channel_or_class_count_than_the_data(tmp_path, folder):
    from weights_util import random_variables

    from vgg_jax import checkpoints, models

    options = dict(num_classes=2, width_divisor=16, fc_width=32, image_size=32)
    model = models.create_model("vgg11", **options)
    variables = random_variables(model, channels=1)  # greyscale
    bundle = checkpoints.ModelBundle("vgg11", options, variables)
    checkpoints.save_bundle(tmp_path / "m", bundle)
    proc = _command("evaluate", "--checkpoint", tmp_path / "m", "--config", folder / "tiny.py",
                    "--scales", "32", "--no-flip")  # fmt: skip
    line = _one_line_failure(proc)
    assert "takes 1-channel images" in line and "3-channel" in line  # both counts named

    options["num_classes"] = 5  # RGB as the data, but 5 classes where the folder has 2
    model = models.create_model("vgg11", **options)
    variables = random_variables(model)
    checkpoints.save_bundle(tmp_path / "m5", checkpoints.ModelBundle("vgg11", options, variables))
    proc = _command("evaluate", "--checkpoint", tmp_path / "m5", "--config", folder / "tiny.py",
                    "--scales", "32", "--no-flip")  # fmt: skip
    assert "has 5 classes but the dataset" in _one_line_failure(proc)


# ---------------------------------------------------------------------------
# A full disk.


def test_full_disk_names_the_intact_checkpoint_and_loses_nothing(tmp_path, trained, folder, env):
    disk = tmp_path / "disk"
    disk.mkdir()
    # Explicit inode count and no huge pages: a kernel's tmpfs defaults must not decide
    # whether a file can still be created (one CI machine refused the filler's creation).
    if not _mount(disk, "size=8m,nr_inodes=16384,huge=never"):
        pytest.skip("a small file system needs root and mount; a full disk is not testable here")
    try:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:  # created first; fills the disk after the copy
            run = disk / "run"
            shutil.copytree(trained, run)
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - 16384))
        config = folder / "tiny.py"
        proc = _command("train", "--config", config, "--workdir", run,
                        "--config.max_steps=4", env=env)  # fmt: skip
        line = _one_line_failure(proc)
        assert "no space left on device" in line
        assert f"The newest intact checkpoint in {run} is step 2" in line
        assert "Event loop is closed" not in proc.stderr, proc.stderr
        assert "background save thread" not in proc.stderr, proc.stderr  # orbax's log: held
        filler.unlink()
        proc = _command("train", "--config", config, "--workdir", run,
                        "--config.max_steps=4", env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "Resuming from step 2" in proc.stdout + proc.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=True)
