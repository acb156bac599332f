"""vgg_jax.metrics: metrics.jsonl across restarts and torn lines, progress, per-epoch series, the
evaluator's exact error counts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from vgg_jax import metrics


def _write(workdir, steps, **figures):
    writer = metrics.MetricsWriter(str(workdir), tensorboard=False)
    for s in steps:
        writer.write(s, s / 2, {"train_loss": 1.0 / s, **figures})
    writer.close()


def _steps(workdir):
    return [r["step"] for r in metrics.read_metrics(str(workdir))]


def test_resume_drops_the_records_after_the_restored_step(tmp_path):
    _write(tmp_path, [1, 2, 3, 4, 5])  # killed after step 5, last checkpoint at step 3
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=3)
    for s in (4, 5, 6):
        writer.write(s, s / 2, {"train_loss": 0.5})
    writer.close()
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    records = metrics.read_metrics(str(tmp_path))
    assert [r["train_loss"] for r in records[3:]] == [0.5, 0.5, 0.5]  # the resumed run's


def test_fresh_start_over_a_killed_run_without_checkpoint_starts_an_empty_file(tmp_path):
    _write(tmp_path, [1, 2])
    metrics.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=0).close()
    assert metrics.read_metrics(str(tmp_path)) == []


def test_nothing_to_drop_leaves_the_file_untouched(tmp_path):
    _write(tmp_path, [1, 2])
    _write(tmp_path, [2], eval_top1_accuracy=0.5)  # an evaluation record of the same step
    path = tmp_path / metrics.METRICS_FILE
    before = path.read_bytes()
    assert metrics.truncate_metrics(str(tmp_path), 2) == 3
    assert path.read_bytes() == before


def test_out_of_order_records_of_an_old_restart_are_put_in_step_order(tmp_path):
    _write(tmp_path, [1, 2, 3, 2, 3, 4])
    assert metrics.truncate_metrics(str(tmp_path), 3) == 5
    assert _steps(tmp_path) == [1, 2, 2, 3, 3]


def test_disabled_writer_leaves_the_file_alone(tmp_path):
    _write(tmp_path, [1, 2, 3])
    metrics.MetricsWriter(str(tmp_path), enabled=False, resume_step=1).close()
    assert _steps(tmp_path) == [1, 2, 3]


def test_a_torn_last_line_is_ignored_and_dropped_on_resume(tmp_path):
    _write(tmp_path, [1, 2])
    path = tmp_path / metrics.METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 3, "epoch": 1.5, "train_lo')  # killed mid-append
    assert _steps(tmp_path) == [1, 2]
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=2)
    writer.write(3, 1.5, {"train_loss": 0.25})
    assert _steps(tmp_path) == [1, 2, 3]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1, "epoch": 0.5}\nnot json\n{"step": 2, "epoch": 1.0}\n')
    with pytest.raises(ValueError, match=r"line 2 is not a JSON record"):
        metrics.read_metrics(str(tmp_path))


def test_merge_steps_gives_one_record_per_step_in_order():
    records = [
        {"step": 2, "train_loss": 1.0},
        {"step": 1, "train_loss": 2.0},
        {"step": 2, "eval_top1_accuracy": 0.5},
    ]
    assert metrics.merge_steps(records) == [
        {"step": 1, "train_loss": 2.0},
        {"step": 2, "train_loss": 1.0, "eval_top1_accuracy": 0.5},
    ]


def test_per_epoch_series_average_training_figures_and_take_epoch_end_eval():
    records = [
        {"step": 1, "epoch": 0.5, "train_loss": 2.0, "train_accuracy": 0.2},
        {"step": 2, "epoch": 1.0, "train_loss": 1.0, "train_accuracy": 0.4},
        {"step": 2, "epoch": 1.0, "eval_top1_accuracy": 0.5},
        {"step": 3, "epoch": 1.5, "train_loss": 0.5, "train_accuracy": 0.8},
        {"step": 4, "epoch": 2.0, "train_loss": 0.5, "train_accuracy": 0.8},
        {"step": 4, "epoch": 2.0, "eval_top1_accuracy": 0.7},
    ]
    series = metrics.per_epoch(records)
    assert series["train_loss"] == [(1.0, 1.5), (2.0, 0.5)]
    assert series["train_accuracy"] == [(1.0, pytest.approx(0.3)), (2.0, 0.8)]
    assert series["eval_top1_accuracy"] == [(1.0, 0.5), (2.0, 0.7)]


def test_progress_line_shows_epoch_step_figures_and_eta():
    stream = io.StringIO()  # not a tty: one line per update
    bar = metrics.ProgressBar(total_steps=100, steps_per_epoch=20, stream=stream)
    figures = {"train_loss": 0.5, "train_accuracy": 0.75, "learning_rate": 0.01}
    bar.update(50, {**figures, "images_per_second": 128.0}, seconds_per_step=2.0)
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert "epoch   2.50" in line and "step 50/100" in line and "#" * 10 + "-" * 10 in line
    assert "loss 0.5000" in line and "acc 0.7500" in line and "lr 1.00e-02" in line
    assert "128 img/s" in line and "ETA 0:01:40" in line  # 50 steps left at 2 s each
    del figures["train_accuracy"]  # a box regressor (localisation) has none: no "acc nan"
    bar.update(60, figures, seconds_per_step=2.0)
    assert "loss 0.5000 lr 1.00e-02" in stream.getvalue().splitlines()[-1]


def test_disabled_bar_prints_no_progress_but_still_messages():
    stream = io.StringIO()
    bar = metrics.ProgressBar(10, 5, enabled=False, stream=stream)
    bar.update(5, {"train_loss": 1.0}, 0.1)
    bar.message("validation top-1 0.5")
    assert stream.getvalue() == "validation top-1 0.5\n"


def test_error_counts_by_hand():
    probs = np.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    counts = metrics.ErrorCounts()
    counts.update(probs, np.asarray([1, 2, 0, 1]), np.asarray([True, True, True, False]))
    assert (counts.count, counts.top1_wrong, counts.top5_wrong) == (3, 2, 0)
    assert counts.top1_error == pytest.approx(2 / 3)
