"""The one training loop (vgg_jax.loop) under both tasks: resume, preemption, divergence, lock.

Classification runs on tests/fake_data.py, localisation on real Fashion-MNIST
canvases (tiny nets, a few steps); the data are passed in, never patched in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys

import fake_data
import jax
import numpy as np
import pytest

from vgg_jax import checkpoints, data_sources, localize, loop, metrics, train, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
LOC_CONFIG = os.path.join(ROOT, "configs", "localize_fashion_mnist.py")
needs_fashion_mnist = pytest.mark.skipif(
    data_sources.find_fashion_mnist_dir() is None,
    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)",
)


# Runs of the same tiny config (here and in worker subprocesses) compile once.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def loc_config(**overrides):
    config = localize.load_config(LOC_CONFIG + ":tiny")
    config.update(overrides)
    return config


def _interrupted(batches, at_step: int, action):
    """`batches` that run `action` when the batch of step `at_step` is due."""

    def wrapped(config, start_step=0, **kwargs):
        for step, batch in enumerate(batches(config, start_step=start_step, **kwargs), start_step):
            if step + 1 == at_step:
                action()
            yield batch

    return wrapped


class Classification:
    """The classification task on fake data; `interrupt` wraps its training batches."""

    name = "classification"
    run = dict(max_steps=8, checkpoint_every_steps=3, log_every_steps=2, num_devices=2)

    def train(self, workdir, interrupt=None, **overrides):
        data = fake_data.data()
        if interrupt:
            data = dataclasses.replace(data, train_dataset=interrupt(data.train_dataset))
        config = fake_data.tiny_config(**{**self.run, **overrides})
        return train.train_and_evaluate(config, str(workdir), data=data)

    def params(self, workdir):
        return checkpoints.load_workdir(str(workdir), "latest").variables


class Localization:
    """The localisation task on Fashion-MNIST canvases."""

    name = "localization"
    run = dict(max_steps=8, checkpoint_every_steps=3, log_every_steps=2)

    def train(self, workdir, interrupt=None, **overrides):
        batches = interrupt(localize.train_batches) if interrupt else localize.train_batches
        config = loc_config(**{**self.run, **overrides})
        return localize.train_and_evaluate(config, str(workdir), batches=batches)

    def params(self, workdir):
        return checkpoints.load_bundle(str(workdir)).variables


TASKS = [
    pytest.param(Classification(), id="classification"),
    pytest.param(Localization(), id="localization", marks=needs_fashion_mnist),
]


def _crash():
    raise RuntimeError("killed")


@pytest.mark.parametrize("task", TASKS)
def test_killed_and_preempted_runs_resume_exactly_with_metrics_once(
    task, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(fake_data, "BAD_PER_STEP", 1)  # every batch reports one skipped file
    task.train(tmp_path / "straight")
    workdir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="killed"):  # a kill between the saves of 3 and 6
        task.train(workdir, interrupt=lambda b: _interrupted(b, 5, _crash))
    assert checkpoints.state_manager(str(workdir), read_only=True).latest_step() == 3
    sigterm = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    preempted = task.train(workdir, interrupt=lambda b: _interrupted(b, 5, sigterm))
    assert preempted["step"] == 5 and preempted["preempted"]
    assert task.train(workdir)["complete"]
    said = capsys.readouterr().err
    assert "Resuming from step 3" in said and "Resuming from step 5" in said
    records = metrics.read_metrics(str(workdir))
    steps = [r["step"] for r in records]
    # Logged on the grid (2), at saves (3, 6) and SIGTERM (5), at the end; each step once
    # although step 4 was logged before the kill and again after resuming from step 3.
    assert steps == [2, 3, 4, 5, 6, 8], steps
    if task.name == "classification":  # each step's skipped file counted once across resumes
        final = [r for r in records if "bad_images_total" in r][-1]
        assert final["step"] == 8 and final["bad_images_total"] == 8, final
        assert "Skipped 1 undecodable training images" in said
    straight = task.params(tmp_path / "straight")
    jax.tree.map(np.testing.assert_array_equal, task.params(workdir), straight)


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt, as in a terminal; a process started in the background
    of a script (CI) inherits it ignored, and the trainer leaves an ignored signal alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_the_step_and_a_rerun_resumes_exactly(
    tmp_path, capsys, ctrl_c_as_in_a_terminal
):
    task = Classification()
    task.train(tmp_path / "straight")
    workdir = tmp_path / "stopped"
    ctrl_c = lambda: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
    stopped = task.train(workdir, interrupt=lambda b: _interrupted(b, 5, ctrl_c))
    assert stopped["step"] == 5 and stopped["preempted"]  # step 5 is off the save grid (3, 6)
    said = capsys.readouterr().err
    assert "Ctrl-C: saving after this step" in said
    assert f"Ctrl-C: saved step 5 in {workdir}; run the same command again" in said
    assert task.train(workdir)["complete"]
    assert "Resuming from step 5" in capsys.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, task.params(workdir),
                 task.params(tmp_path / "straight"))  # fmt: skip
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


HANGING_TRAINER = """
import signal, sys, threading
sys.path[:0] = [{root!r}, {tests!r}]
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
import dataclasses, fake_data
from vgg_jax import train

def hanging(config, start_step=0, **kwargs):
    batches = fake_data.train_dataset(config, start_step=start_step, **kwargs)
    for step, batch in enumerate(batches, start_step):
        if step == 3:
            print("HUNG", flush=True)
            threading.Event().wait()  # a step that never ends (a peer that died)
        yield batch

data = dataclasses.replace(fake_data.data(), train_dataset=hanging)
train.train_and_evaluate(fake_data.tiny_config(max_steps=8), sys.argv[1], data=data)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_second_stop_signal_ends_a_hung_step_at_once(tmp_path, signum):
    """The first signal waits for a step that never ends; the second ends the process."""
    script = tmp_path / "hang.py"
    script.write_text(HANGING_TRAINER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "HUNG"
        proc.send_signal(signum)
        with pytest.raises(subprocess.TimeoutExpired):  # the first only asks for a save
            proc.wait(timeout=3)
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read()
    name = loop.Preemption.NAMES[signum]
    assert proc.returncode == 128 + signum, err
    assert f"{name}: saving after this step" in err
    assert f"{name} again: stopped without saving" in err


def test_divergence_keeps_a_checkpoint_before_it_and_a_lower_lr_resumes(tmp_path, capsys):
    task = Classification()
    # The learning rate ramps up to 20 over 8 steps: the loss rises, then goes non-finite.
    steep = dict(learning_rate=20.0, warmup_epochs=0.5, schedule="constant", max_steps=12,
                 checkpoint_every_steps=1, keep_checkpoints=20, num_devices=1)  # fmt: skip
    with pytest.raises(FloatingPointError) as stop:
        task.train(tmp_path, **steep)
    message = str(stop.value)
    bad = int(re.search(r"at step (\d+)", message).group(1))
    good = int(re.search(r"last good checkpoint is step (\d+)", message).group(1))
    assert good < bad - 1  # not the checkpoint just before the bad step: it computed that loss
    assert "Lower config.learning_rate" in message and "diverged" in message
    assert checkpoints.state_manager(str(tmp_path), read_only=True).all_steps() == [good]
    moved = sorted(int(p) for p in os.listdir(tmp_path / "diverged"))
    assert moved == list(range(good + 1, bad))  # set aside, not deleted
    capsys.readouterr()
    result = task.train(tmp_path, **{**steep, "learning_rate": 0.01})
    assert f"Resuming from step {good}" in capsys.readouterr().err
    assert result["complete"] and result["step"] == 12 and np.isfinite(result["train_loss"])
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.01


def test_divergence_before_any_checkpoint_says_the_run_starts_from_scratch():
    guard = loop.DivergenceGuard(factor=10.0)
    for step, loss in enumerate([2.3] * 12 + [2.2], 1):
        guard.check(step, loss)
    with pytest.raises(loop.Divergence, match=r"more than 10x the median") as e:
        guard.check(14, 40.0)
    assert e.value.window_start == 13  # the last step at or below the median
    assert loop.last_good_step([12, 13], e.value.window_start) == 12
    assert loop.last_good_step([13], e.value.window_start) is None
    text = loop.divergence_message(e.value, fake_data.tiny_config(), "/w", None, [13])
    assert "No checkpoint was written before the divergence" in text and "scratch" in text


def test_second_trainer_on_a_workdir_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vgg_jax import workdir_lock\n"
         f"with workdir_lock.hold({str(tmp_path)!r}):\n    print('held', flush=True)\n"
         "    time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirInUse, match=str(holder.pid)):
            Classification().train(tmp_path)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


def test_resume_with_another_experiment_is_refused_unless_overridden(tmp_path, capsys):
    task = Classification()
    task.train(tmp_path, max_steps=2, num_devices=1)
    with pytest.raises(ValueError, match=r"model: .?vgg11.? -> .?vgg11_lrn"):
        task.train(tmp_path, max_steps=3, num_devices=1, model="vgg11_lrn")
    result = task.train(tmp_path, max_steps=3, num_devices=1, model="vgg11_lrn",
                        resume_override=True)  # fmt: skip
    assert result["step"] == 3
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "vgg11_lrn"


def test_a_damaged_config_json_beside_intact_checkpoints_names_the_way_out(tmp_path, capsys):
    task = Classification()
    task.train(tmp_path, max_steps=2, num_devices=1)
    (tmp_path / "config.json").write_text('{"model": "vgg1')  # cut short by hand or a disk
    way_out = r"config is damaged\. The checkpoints are intact: put the run's config.json back"
    with pytest.raises(ValueError, match=way_out + r", or pass --config.resume_override=True"):
        task.train(tmp_path, max_steps=3, num_devices=1)
    result = task.train(tmp_path, max_steps=3, num_devices=1, resume_override=True)
    assert result["step"] == 3  # resumed from step 2, not started again
    assert "the damaged config.json replaced by this config" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 3


def test_the_silent_start_up_is_announced_with_the_progress_bar(tmp_path, capsys):
    task = Classification()
    task.train(tmp_path / "bar", max_steps=2, num_devices=1, progress_bar=True)
    said = capsys.readouterr().err.splitlines()
    announced = [i for i, line in enumerate(said) if line.startswith("Step 0 of 2: preparing")]
    progress = [i for i, line in enumerate(said) if line.startswith("epoch ")]
    assert announced and progress and announced[0] < progress[0], said
    task.train(tmp_path / "quiet", max_steps=2, num_devices=1, progress_bar=False)
    assert "preparing the training input" not in capsys.readouterr().err


@needs_fashion_mnist
def test_localisation_honours_grad_accum_steps(tmp_path):
    # No BN and no dropout: the accumulated update is the unsplit one (train.py's docstring).
    run = dict(model="vgg11", dropout_rate=0.0, max_steps=3, num_devices=2)
    localize.train_and_evaluate(loc_config(**run), str(tmp_path / "whole"))
    localize.train_and_evaluate(loc_config(**run, grad_accum_steps=4), str(tmp_path / "accum"))
    whole = checkpoints.load_bundle(str(tmp_path / "whole")).variables
    accum = checkpoints.load_bundle(str(tmp_path / "accum")).variables
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, accum)
    assert checkpoints.load_bundle(str(tmp_path / "whole")).metadata["results"]["steps"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_fashion_mnist
def test_localisation_on_two_processes_matches_one(tmp_path):
    run = {"num_devices": 0, "max_steps": 2, "model": "vgg11"}
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "VGG_JAX_COORDINATOR": f"127.0.0.1:{port}",
        "VGG_JAX_NUM_PROCESSES": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path / "multi"), json.dumps(run), "localize"],
            cwd=ROOT, env={**env, "VGG_JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    localize.train_and_evaluate(loc_config(**run), str(tmp_path / "single"))  # 8 devices here
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    single = checkpoints.load_bundle(str(tmp_path / "single"))
    multi = checkpoints.load_bundle(str(tmp_path / "multi"))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        single.variables,
        multi.variables,
    )
    one, two = single.metadata["results"], multi.metadata["results"]
    assert one["eval_loc_error"] == pytest.approx(two["eval_loc_error"], abs=1e-6)
