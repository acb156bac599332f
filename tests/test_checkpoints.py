"""Model bundles and run checkpoints: round trip, other models, damage, fallback, best."""

import json
import os
import re
import shutil
import sys
import types

import jax
import numpy as np
import pytest
from weights_util import random_variables

from vgg_jax import checkpoints, fileio, models

# Quiet: a failed orbax restore must not leave tensorstore's "Event loop is closed" reports
# behind (before the fix: in 3 of 6 and 5 of 6 runs of the two damaged-file tests).
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

OPTIONS = dict(num_classes=10, width_divisor=16, fc_width=32, image_size=32)


def make_bundle(**overrides):
    options = {**OPTIONS, **overrides}
    model = models.create_model("A", **options)
    return checkpoints.ModelBundle("vgg11", options, random_variables(model))


def test_round_trip(tmp_path):
    bundle = make_bundle()
    bundle.preprocessing = checkpoints.Preprocessing("BGR", 255.0, (1.0, 2.0, 3.0), (1, 1, 1))
    checkpoints.save_bundle(tmp_path / "m", bundle)
    loaded = checkpoints.load_bundle(tmp_path / "m")
    assert loaded.preprocessing == bundle.preprocessing
    assert loaded.options == OPTIONS
    for a, b in zip(
        jax.tree.leaves(bundle.variables), jax.tree.leaves(loaded.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    apply = jax.jit(bundle.model.apply)  # one model: the loaded variables reuse its compilation
    np.testing.assert_array_equal(apply(bundle.variables, x), apply(loaded.variables, x))


def test_preprocessing_bgr_and_scaling():
    pre = checkpoints.Preprocessing("BGR", 255.0, (10.0, 20.0, 30.0), (1.0, 2.0, 4.0))
    pixels = np.array([[[[1.0, 0.5, 0.0]]]])
    np.testing.assert_allclose(pre(pixels)[0, 0, 0], [-10.0, (127.5 - 20) / 2, (255 - 30) / 4])
    with pytest.raises(ValueError, match="channel_order"):
        checkpoints.Preprocessing("GBR")


def test_other_model_is_refused_naming_the_parameter(tmp_path):
    checkpoints.save_bundle(tmp_path / "m", make_bundle())
    meta_path = tmp_path / "m" / checkpoints.BUNDLE_FILE
    text = meta_path.read_text().replace('"num_classes": 10', '"num_classes": 7')
    meta_path.write_text(text)
    with pytest.raises(ValueError, match="params/fc8"):
        checkpoints.load_bundle(tmp_path / "m")
    text = meta_path.read_text().replace('"vgg11"', '"vgg13"')
    meta_path.write_text(text)
    with pytest.raises(ValueError, match="conv1_2"):
        checkpoints.load_bundle(tmp_path / "m")


def _data_files(variables_dir):
    for root, _, files in os.walk(variables_dir):
        for name in files:
            if "manifest" in name or name.startswith("d") or "ocdbt" in root:
                yield os.path.join(root, name)


def test_damaged_bundle_is_a_clear_error(tmp_path):
    path = checkpoints.save_bundle(tmp_path / "m", make_bundle())
    variables_dir = os.path.join(path, checkpoints.VARIABLES_DIR)
    pristine = tmp_path / "pristine"
    shutil.copytree(variables_dir, pristine)
    # One byte flipped, the size kept: found by the checksums before orbax reads anything.
    victim = max(_data_files(variables_dir), key=os.path.getsize)
    with open(victim, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    rel = os.path.relpath(victim, path).replace(os.sep, "/")
    with pytest.raises(ValueError, match=f"truncated or damaged \\({rel}: checksum mismatch"):
        checkpoints.load_bundle(path)
    # Every data file truncated.
    shutil.rmtree(variables_dir)
    shutil.copytree(pristine, variables_dir)
    for name in _data_files(variables_dir):
        with open(name, "r+b") as f:
            f.truncate(max(0, os.path.getsize(name) // 3))
    with pytest.raises(ValueError, match=r"truncated or damaged \(variables/.*bytes, \d+ recorded"):
        checkpoints.load_bundle(path)
    # A bundle of an earlier version (no checksums): orbax's own failure, in the same words.
    os.remove(os.path.join(variables_dir, checkpoints.CHECKSUMS_FILE))
    with pytest.raises(ValueError, match="truncated or damaged"):
        checkpoints.load_bundle(path)
    shutil.rmtree(variables_dir)
    with pytest.raises(ValueError, match="truncated or damaged"):
        checkpoints.load_bundle(path)
    with pytest.raises(FileNotFoundError, match="not a vgg_jax model bundle"):
        checkpoints.load_bundle(tmp_path)
    # The pristine files load (the checksums file beside orbax's does not disturb it).
    shutil.copytree(pristine, variables_dir)
    loaded = checkpoints.load_bundle(path)
    assert jax.tree.structure(loaded.variables) == jax.tree.structure(make_bundle().variables)


def test_a_failed_restore_drops_its_closed_loop_reports_and_keeps_others(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=ValueError("something else"))
    with checkpoints._closed_loop_reports_dropped():
        sys.unraisablehook(closed)
        sys.unraisablehook(other)
    assert seen == [other] and sys.unraisablehook == seen.append  # put back after a success
    with pytest.raises(KeyError), checkpoints._closed_loop_reports_dropped():
        raise KeyError("damaged")
    sys.unraisablehook(closed)  # reads finishing after the error reached the caller
    sys.unraisablehook(other)
    assert seen == [other, other]
    with checkpoints._closed_loop_reports_dropped():  # installed once, not stacked
        assert getattr(sys.unraisablehook, "drops_closed_loop_reports", False)
        sys.unraisablehook(other)
    assert seen == [other] * 3


# ---------------------------------------------------------------------------
# Training-run checkpoints: checksums, damage, fallback, best.

STEPS = (10, 20, 30)


def _variables_at(step):
    """The tiny model's variables scaled by the step, so a loaded step can be told apart."""
    variables = make_bundle().variables
    return jax.tree.map(lambda x: np.asarray(x) * step, dict(variables))


def _run_config():
    return {
        "model": "vgg11", **OPTIONS, "dataset": "fake", "value_range": 255.0,
        "mean_rgb": [1.0, 2.0, 3.0], "std_rgb": [1.0, 1.0, 1.0],
    }  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    """A workdir with config.json and training states at steps 10, 20, 30 (checksummed)."""
    (tmp_path / checkpoints.CONFIG_FILE).write_text(json.dumps(_run_config()))
    mgr = checkpoints.state_manager(str(tmp_path), keep=5)
    for step in STEPS:
        checkpoints.save_state(mgr, step, {"params": _variables_at(step)["params"]}, {"e": step})
    checkpoints.wait_until_finished(mgr)
    mgr.close()
    return tmp_path


def _largest_data_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return r"state/.*: \d+ bytes, \d+ recorded \(truncated or overwritten\)"


def _delete_data(step_dir):
    _largest_data_file(step_dir).unlink()
    return r"state/.*/d/\w+: file missing"


def _delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()
    return r"state/_METADATA: metadata missing"


def _flip_bytes(step_dir):
    path = _largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the checksum tells
    return r"state/.*/d/\w+: checksum mismatch"


def test_every_saved_step_records_checksums_of_all_its_files(run_dir):
    for step in STEPS:
        step_dir = run_dir / "checkpoints" / str(step)
        record = json.loads((step_dir / checkpoints.CHECKSUMS_FILE).read_text())
        on_disk = {
            str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
            if p.is_file() and p.name != checkpoints.CHECKSUMS_FILE
        }  # fmt: skip
        assert set(record["files"]) == on_disk and "state/_METADATA" in on_disk
        assert checkpoints.verify_step(str(run_dir), step) is None


@pytest.mark.parametrize("damage", [_truncate, _delete_data, _delete_metadata, _flip_bytes])
def test_damaged_newest_step_falls_back_to_the_previous_one(run_dir, damage):
    reason = damage(run_dir / "checkpoints" / "30")
    assert re.fullmatch("checkpoints/30/" + reason, checkpoints.verify_step(str(run_dir), 30))
    lines = []
    bundle = checkpoints.load_workdir(run_dir, "latest", say=lines.append)
    assert bundle.metadata["step"] == 20
    np.testing.assert_array_equal(
        bundle.variables["params"]["fc8"]["kernel"], _variables_at(20)["params"]["fc8"]["kernel"]
    )
    assert len(lines) == 1
    assert re.fullmatch(
        rf"checkpoint 30 is damaged \(checkpoints/30/{reason}\); left in place; using 20", lines[0]
    )
    assert (run_dir / "checkpoints" / "30").is_dir()  # a reader never moves anything
    # The trainer's call moves it aside (kept, not deleted) so step 30 can be written again.
    mgr = checkpoints.state_manager(str(run_dir), keep=5)
    lines = []
    assert checkpoints.newest_intact_step(mgr, str(run_dir), lines.append) == 20
    assert "moved to damaged/checkpoints-30; using 20" in lines[0]
    assert mgr.all_steps() == [10, 20]
    assert (run_dir / "damaged" / "checkpoints-30" / "state").is_dir()


def test_damaged_step_of_a_url_workdir_is_copied_aside_then_deleted(run_dir, monkeypatch):
    _flip_bytes(run_dir / "checkpoints" / "30")
    mgr = checkpoints.state_manager(str(run_dir), keep=5)
    files = sorted(p.relative_to(run_dir / "checkpoints" / "30")
                   for p in (run_dir / "checkpoints" / "30").rglob("*"))  # fmt: skip
    monkeypatch.setattr(fileio, "is_url", lambda path: True)  # gs://'s code path (tf.io.gfile)
    lines = []
    assert checkpoints.newest_intact_step(mgr, str(run_dir), lines.append) == 20
    assert "moved to damaged/checkpoints-30; using 20" in lines[0]
    assert mgr.all_steps() == [10, 20]
    moved = run_dir / "damaged" / "checkpoints-30"
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == files  # every file kept


def test_all_steps_damaged_is_one_clear_error_and_nothing_moves(run_dir):
    for step in STEPS:
        _flip_bytes(run_dir / "checkpoints" / str(step))
    mgr = checkpoints.state_manager(str(run_dir), keep=5)
    with pytest.raises(ValueError, match=r"Every checkpoint in .* damaged: 30 \(.*\); 20 .*; 10"):
        checkpoints.newest_intact_step(mgr, str(run_dir), print)
    assert mgr.all_steps() == list(STEPS)


def test_step_without_checksums_is_unverified_but_used_and_orbax_errors_name_the_step(run_dir):
    step_dir = run_dir / "checkpoints" / "30"
    (step_dir / checkpoints.CHECKSUMS_FILE).unlink()  # as an older version wrote it
    assert checkpoints.verify_step(str(run_dir), 30) is None
    _truncate(step_dir)
    mgr = checkpoints.state_manager(str(run_dir), keep=5, read_only=True)
    model = make_bundle().model
    target = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _variables_at(1)["params"]
    )}  # fmt: skip
    with pytest.raises(ValueError, match=r"Could not read checkpoint 30 in SRC: .*damaged"):
        checkpoints.restore_state(mgr, 30, model, target, "SRC")
    state, meta = checkpoints.restore_state(mgr, 20, model, target, "SRC")
    assert meta == {"e": 20}


@pytest.mark.parametrize("mode, kept", [("max", 3), ("min", 2)])
def test_save_best_keeps_the_best_by_the_chosen_metric(tmp_path, mode, kept):
    values = (0.5, 0.4, 0.7)
    (tmp_path / checkpoints.CONFIG_FILE).write_text(json.dumps(_run_config()))
    mgr = checkpoints.best_manager(str(tmp_path), metric="eval_loss", mode=mode)
    saved = [
        checkpoints.save_best(mgr, s, _variables_at(s), {"eval_loss": v}, "eval_loss", mode)
        for s, v in zip((1, 2, 3), values, strict=True)
    ]
    assert saved == ([True, False, True] if mode == "max" else [True, True, False])
    assert not checkpoints.save_best(mgr, 4, _variables_at(4), {"eval_loss": float("nan")},
                                     "eval_loss", mode)  # fmt: skip
    mgr.close()
    bundle = checkpoints.load_workdir(tmp_path, "best")
    assert bundle.metadata["step"] == kept
    np.testing.assert_array_equal(
        bundle.variables["params"]["fc8"]["bias"], _variables_at(kept)["params"]["fc8"]["bias"]
    )
    _flip_bytes(tmp_path / "best" / str(kept))
    with pytest.raises(ValueError, match=rf"best checkpoint .*\(step {kept}\) is damaged .*latest"):
        checkpoints.load_workdir(tmp_path, "best")


def test_preprocessing_from_a_config_mapping():
    pre = checkpoints.Preprocessing.from_config(_run_config())
    assert pre == checkpoints.Preprocessing("RGB", 255.0, (1.0, 2.0, 3.0), (1.0, 1.0, 1.0))


def test_a_bundle_that_does_not_fit_the_data_is_named():
    bundle = make_bundle()  # 10 classes, RGB
    network = (bundle.name, bundle.num_classes, bundle.variables)
    checkpoints.check_fits_data(*network, 10, 3, "fake")
    with pytest.raises(ValueError, match=r"vgg11 has 10 classes but imagenet has 1000; evaluate"):
        checkpoints.check_fits_data(*network, 1000, 3, "imagenet")
    with pytest.raises(ValueError, match=r"takes 3-channel images but fm has 1-channel images"):
        checkpoints.check_fits_data(*network, None, 1, "fm")
