"""Trainer tests on a tiny VGG-A with in-memory data (tests/fake_data.py).

Sharding (1 vs 8 devices, model axis), gradient accumulation, the plateau
schedule, exact resume after SIGKILL, SIGTERM, NaN, mismatched checkpoints,
config typos. Two processes against one: tests/test_launch.py (through launch/local.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import fake_data
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import checkpoints, metrics, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")


# Runs of the same tiny config (here and in worker subprocesses) compile once.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(autouse=True)
def _no_nan(monkeypatch):
    monkeypatch.setattr(fake_data, "NAN_AT_STEP", -1)


@pytest.fixture(scope="module")
def dp8_run(tmp_path_factory):
    """The tiny default run (4 steps, 8 devices), shared: tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("dp8")
    _train(workdir)
    return workdir


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _train(workdir, **overrides):
    config = fake_data.tiny_config(**overrides)
    return train.train_and_evaluate(config, str(workdir), data=fake_data.data())


def _params(workdir, which="latest"):
    return checkpoints.load_workdir(workdir, which).variables["params"]


def _losses(workdir):
    return [r["train_loss"] for r in metrics.read_metrics(str(workdir)) if "train_loss" in r]


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    flat_a = checkpoints._flatten(a)
    flat_b = checkpoints._flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_allclose(flat_a[k], flat_b[k], rtol=rtol, atol=atol, err_msg=k)


def _assert_trees_equal(a, b):
    flat_a, flat_b = checkpoints._flatten(a), checkpoints._flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k])), k


# ---------------------------------------------------------------------------
# Devices and sharding.


def test_one_and_eight_devices_agree(tmp_path, dp8_run):
    assert len(jax.devices()) == 8, "conftest should provide 8 CPU devices"
    _train(tmp_path / "one", num_devices=1)
    np.testing.assert_allclose(_losses(tmp_path / "one"), _losses(dp8_run), rtol=1e-5)
    assert len(_losses(tmp_path / "one")) == 4
    _assert_trees_close(_params(tmp_path / "one"), _params(dp8_run))


def test_model_axis_shards_fc_and_gives_same_numbers(tmp_path, dp8_run):
    config = fake_data.tiny_config(mesh_model_axis=2)
    mesh = parallel.create_mesh(config)
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    model = train.create_model(config)
    shapes = jax.eval_shape(lambda: train.init_state(config, model, 3, 16))
    shardings = parallel.tree_shardings(shapes, mesh)
    assert shardings.params["fc6"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, None, None, "model"
    )
    assert shardings.params["fc7"]["kernel"].spec == jax.sharding.PartitionSpec("model", None)
    assert shardings.opt_state[1].trace["fc6"]["kernel"].spec[-1] == "model"
    _train(tmp_path / "mp", mesh_model_axis=2)
    np.testing.assert_allclose(_losses(dp8_run), _losses(tmp_path / "mp"), rtol=1e-5)
    _assert_trees_close(_params(dp8_run), _params(tmp_path / "mp"))


def test_more_devices_than_there_are_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"num_devices=9, .* sees 8 device.*at most 8, or 0"):
        parallel.create_mesh(fake_data.tiny_config(num_devices=9))


def test_batch_that_does_not_divide_the_data_axis_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=12 does not divide .* 8 devices"):
        _train(tmp_path, batch_size=12)


def test_grad_accumulation_equals_unsplit_batch(tmp_path):
    # Dropout draws its masks per micro-batch, so compare without dropout (see train.py).
    _train(tmp_path / "whole", dropout_rate=0.0, num_devices=2)
    _train(tmp_path / "accum", dropout_rate=0.0, num_devices=2, grad_accum_steps=4)
    np.testing.assert_allclose(_losses(tmp_path / "whole"), _losses(tmp_path / "accum"), rtol=1e-5)
    _assert_trees_close(_params(tmp_path / "whole"), _params(tmp_path / "accum"))


# ---------------------------------------------------------------------------
# Optimizer and schedules.


def test_plateau_cuts_lr_by_ten_at_most_three_times():
    config = fake_data.tiny_config(schedule="plateau", plateau_patience=1)
    plateau = train.create_plateau(config)
    state = plateau.init({})
    scales = []
    errors = [0.5, 0.4] + [0.4] * 12  # improves once, then stalls
    for error in errors:
        _, state = plateau.update(updates={}, state=state, value=jnp.float32(error))
        scales.append(float(state.scale))
    assert scales[0] == scales[1] == 1.0
    distinct = sorted(set(np.round(scales, 8)), reverse=True)
    np.testing.assert_allclose(distinct, [1.0, 0.1, 0.01, 0.001], rtol=1e-5)
    assert min(scales) >= 1e-3 * (1 - 1e-6)


def test_plateau_schedule_reads_validation_error_in_training(tmp_path):
    # Evaluation after every epoch of 2 steps; random labels never improve much.
    _train(
        tmp_path,
        schedule="plateau",
        plateau_patience=0,
        max_steps=0,
        num_epochs=3,
        batch_size=128,
        learning_rate=1e-6,
    )
    lrs = [r["learning_rate"] for r in metrics.read_metrics(str(tmp_path)) if "learning_rate" in r]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[-1] < 1e-6, "validation accuracy stalled but the learning rate was not cut"


def test_weight_decay_skips_biases_unless_asked():
    params = {"conv": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    assert train.weight_decay_mask(params, False) == {"conv": {"kernel": True, "bias": False}}
    assert train.weight_decay_mask(params, True) == {"conv": {"kernel": True, "bias": True}}


def test_step_schedule_multiplies_every_n_epochs():
    config = fake_data.tiny_config(schedule="step", step_epochs=3, step_factor=0.9)
    lr = train.learning_rate_fn(config, steps_per_epoch=10)
    assert float(lr(29)) == pytest.approx(0.01)
    assert float(lr(30)) == pytest.approx(0.009)
    assert float(lr(60)) == pytest.approx(0.0081)


def test_warmup_rises_linearly_then_hands_over_to_the_schedule():
    config = fake_data.tiny_config(
        schedule="cosine", learning_rate=0.04, warmup_epochs=0.5, num_epochs=3, max_steps=0
    )
    lr = train.learning_rate_fn(config, steps_per_epoch=20)  # 10 warm-up steps, 50 cosine
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.02)
    assert float(lr(10)) == pytest.approx(0.04)
    assert float(lr(35)) == pytest.approx(0.02, rel=1e-4)  # half-way through the cosine
    assert float(lr(60)) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------
# Initialisation from other runs.


def test_paper_a_init_copies_four_convs_and_fc_and_reinits_head(tmp_path):
    config_a = fake_data.tiny_config()
    config_b = fake_data.tiny_config(model="vgg13", num_classes=5, seed=1)
    state_a = train.init_state(config_a, train.create_model(config_a), 3, 16)
    state_b = train.init_state(config_b, train.create_model(config_b), 3, 16)
    said = []
    params = train.transfer_params(state_b.params, state_a.params, "paper_a", said.append)
    for name in ("conv1_1", "conv2_1", "conv3_1", "conv3_2"):
        np.testing.assert_array_equal(
            params["features"][name]["kernel"], state_a.params["features"][name]["kernel"]
        )
    for name in ("conv1_2", "conv2_2"):  # B's own layers stay random
        np.testing.assert_array_equal(
            params["features"][name]["kernel"], state_b.params["features"][name]["kernel"]
        )
    np.testing.assert_array_equal(params["fc6"]["kernel"], state_a.params["fc6"]["kernel"])
    np.testing.assert_array_equal(params["fc8"]["kernel"], state_b.params["fc8"]["kernel"])
    assert any("re-initialised" in s for s in said)


def test_init_from_workdir_same_mode(tmp_path, dp8_run):
    _train(tmp_path / "b", init_from=str(dp8_run), max_steps=1, learning_rate=1e-9)
    _assert_trees_close(_params(dp8_run, "best"), _params(tmp_path / "b"), rtol=1e-4)


# ---------------------------------------------------------------------------
# Checkpoints, resume and faults.


def test_finished_run_is_not_overwritten_and_tmp_checkpoint_is_ignored(tmp_path, dp8_run, capsys):
    run = _copy(dp8_run, tmp_path)
    # A half-written checkpoint of a later step, as a crash during saving leaves it.
    tmp = run / "checkpoints" / "12.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    (tmp / "junk").write_text("half written")
    records = metrics.read_metrics(str(run))
    capsys.readouterr()
    again = _train(run)
    assert again["complete"] and again["step"] == 4
    said = capsys.readouterr().err
    assert "is complete (step 4 of 4" in said and "raise num_epochs/max_steps to continue" in said
    assert metrics.read_metrics(str(run)) == records
    cosine = tmp_path / "cosine"  # its decay spans the run: a longer one is a new run
    _train(cosine, schedule="cosine", max_steps=2, num_devices=1)
    capsys.readouterr()
    assert _train(cosine, schedule="cosine", max_steps=2, num_devices=1)["complete"]
    said = capsys.readouterr().err
    assert "decays over the run's length" in said and "raise num_epochs" not in said
    resumed = _train(run, max_steps=6)  # more steps: resumes from 4, not from 12
    assert resumed["step"] == 6
    steps = [r["step"] for r in metrics.read_metrics(str(run)) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_of_another_model_is_refused(tmp_path, dp8_run):
    tmp_path = _copy(dp8_run, tmp_path)
    with pytest.raises(ValueError, match=r"model: .?vgg11.? -> .?vgg13"):  # the config check
        _train(tmp_path, model="vgg13", max_steps=4)
    # Past the config check (resume_override), the checkpoint itself names the parameter.
    with pytest.raises(ValueError, match=r"conv1_2"):
        _train(tmp_path, model="vgg13", max_steps=4, resume_override=True)
    with pytest.raises(ValueError, match=r"params/fc6/.* has shape \(32,?\)"):
        _train(tmp_path, fc_width=64, max_steps=4, resume_override=True)
    # A resume that failed records nothing: config.json still describes the checkpoints.
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "vgg11"


def test_nan_loss_stops_naming_the_step_and_sets_aside_what_it_computed(tmp_path, monkeypatch):
    monkeypatch.setattr(fake_data, "NAN_AT_STEP", 2)  # the third batch
    with pytest.raises(FloatingPointError, match=r"at step 3") as stop:
        _train(tmp_path, max_steps=6)
    # Step 3's loss came from the checkpoint of step 2, so it is set aside, not kept, and the
    # message says plainly that a rerun starts from scratch.
    assert "No checkpoint was written before the divergence" in str(stop.value)
    assert "moved to" in str(stop.value) and (tmp_path / "diverged" / "2").is_dir()
    assert checkpoints.state_manager(str(tmp_path), read_only=True).all_steps() == []


def test_training_validates_the_config_first(tmp_path):
    # The checks themselves: tests/test_configuration.py.
    with pytest.raises(ValueError, match=r"Unknown model name 'vgg17'"):
        _train(tmp_path, model="vgg17")


def test_command_line_override_typo(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vgg_jax.train", "--config", "configs/fashion_mnist.py:quick"]
        + ["--config.batch_sise=3", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "Bad command line: no config field 'batch_sise'. "
        'Did you mean "batch_size" instead of "batch_sise"?'
    )
    assert not os.path.exists(tmp_path / "checkpoints")


def _worker(workdir, overrides, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, WORKER, str(workdir), json.dumps(overrides)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _wait_for_checkpoint(workdir, proc, timeout=300):  # compiling may be slow under load
    path = workdir / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(p.name.isdigit() for p in path.iterdir()):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


RESUME_RUN = dict(max_steps=0, num_epochs=2, batch_size=32, checkpoint_every_steps=3, num_devices=2)


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path):
    # 16 steps in two epochs of 8; checkpoints every 3 steps. Slow batches let the kill land
    # mid-epoch after the first checkpoint.
    straight = _worker(tmp_path / "straight", RESUME_RUN)
    killed = _worker(tmp_path / "killed", RESUME_RUN, env={"FAKE_DATA_SLEEP": "0.3"})
    _wait_for_checkpoint(tmp_path / "killed", killed)
    time.sleep(0.5)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    steps = checkpoints.state_manager(str(tmp_path / "killed"), read_only=True).all_steps()
    assert steps and max(steps) < 16
    rerun = _worker(tmp_path / "killed", RESUME_RUN)
    out = rerun.communicate(timeout=180)[0]
    assert rerun.returncode == 0, out
    assert "Resuming from step" in out
    assert straight.wait(timeout=180) == 0, straight.stdout.read()
    _assert_trees_equal(_params(tmp_path / "straight"), _params(tmp_path / "killed"))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _worker(tmp_path, RESUME_RUN, env={"FAKE_DATA_SLEEP": "0.3"})
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    steps = checkpoints.state_manager(str(tmp_path), read_only=True).all_steps()
    assert saved in steps and saved < 16


def test_metrics_file_and_curves(tmp_path):
    _train(tmp_path, max_steps=0, num_epochs=2, batch_size=128)
    records = metrics.read_metrics(str(tmp_path))
    keys = set().union(*records)
    for key in (
        "step",
        "epoch",
        "train_loss",
        "train_accuracy",
        "learning_rate",
        "images_per_second",
        "eval_top1_accuracy",
        "eval_top5_accuracy",
    ):
        assert key in keys, key
    evals = [r for r in records if "eval_top1_accuracy" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]
    # 20 examples: accuracy is a multiple of 1/20, counted exactly despite padding.
    assert all(
        abs(r["eval_top1_accuracy"] * 20 - round(r["eval_top1_accuracy"] * 20)) < 1e-6
        for r in evals
    )
    import matplotlib.image

    png = matplotlib.image.imread(str(tmp_path / "curves.png"))
    assert png.ndim == 3 and png.shape[0] > 100
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model"] == "vgg11"


def test_dense_end_of_epoch_evaluation_and_any_figure_picks_the_best(tmp_path, dp8_run):
    # At Q = image_size the dense protocol sees each 32x32 image once (a 1x1 score map):
    # the central crop's figures, computed through protocols.DenseEvaluator instead.
    result = _train(tmp_path / "dense", train_eval="dense", train_eval_scales=(32,),
                    best_metric="eval_top5_accuracy")  # fmt: skip
    central = [r for r in metrics.read_metrics(str(dp8_run)) if "eval_top1_accuracy" in r][-1]
    dense = [r for r in metrics.read_metrics(str(tmp_path / "dense")) if "eval_top1_accuracy" in r]
    assert "eval_loss" not in dense[-1]  # the dense protocol's figures only
    for key in ("eval_top1_accuracy", "eval_top5_accuracy"):
        assert abs(dense[-1][key] - central[key]) <= 1 / 20 + 1e-9, key  # at most one image
    assert result["best_metric"] == "eval_top5_accuracy"
    with pytest.raises(ValueError, match=r"best_metric='eval_top9'.*eval_top5_accuracy"):
        _train(tmp_path / "typo", best_metric="eval_top9")
