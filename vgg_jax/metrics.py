"""Metrics on the host: progress bar, metrics.jsonl, TensorBoard, curves.png, error counts.

Only process 0 writes the files. The trainer hands over plain floats that it
fetched from the devices every `log_every_steps` steps, never per step.
`ErrorCounts` counts the evaluator's top-1/top-5 errors on the host with a
mask: exact whatever the batch size and the number of devices or processes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_jax import fileio

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class ProgressBar:
    """One console line: epoch, step, loss, accuracy, learning rate, images/s, ETA."""

    def __init__(self, total_steps: int, steps_per_epoch: int, enabled: bool = True, stream=None):
        self.total = total_steps
        self.per_epoch = steps_per_epoch
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, step: int, figures: Mapping[str, float], seconds_per_step: float) -> None:
        if not self.enabled:
            return
        epoch = step / self.per_epoch
        done = step / max(self.total, 1)
        width = 20
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        eta = _duration(max(self.total - step, 0) * seconds_per_step)
        accuracy = figures.get("train_accuracy")  # none for a box regressor
        line = (
            f"epoch {epoch:6.2f} [{bar}] step {step}/{self.total} "
            f"loss {figures.get('train_loss', math.nan):.4f} "
            + (f"acc {accuracy:.4f} " if accuracy is not None else "")
            + f"lr {figures.get('learning_rate', math.nan):.2e} "
            f"{figures.get('images_per_second', 0.0):.0f} img/s ETA {eta}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (evaluation results, notices), shown even with the bar off."""
        self.stream.write(("\n" if self.tty and self.enabled else "") + text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = "scalars"
    meta.data_class = summary_pb2.DATA_CLASS_SCALAR
    return meta


_SCALAR = None


class MetricsWriter:
    """Appends JSON lines to workdir/metrics.jsonl and scalars to TensorBoard event files.

    resume_step: the step a run restarts from (0 for a fresh start). The records of
    later steps, written by a run that was killed or preempted after its last
    checkpoint, are dropped first (the resumed run writes them again), so that
    metrics.jsonl holds each step once and in order; see `truncate_metrics`.
    """

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = fileio.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled and resume_step is not None:
            truncate_metrics(workdir, resume_step)
        if enabled and tensorboard:
            try:
                import tensorflow as tf

                global _SCALAR
                _SCALAR = _SCALAR or _scalar_metadata()
                self._tb = tf.summary.create_file_writer(fileio.join(workdir, "tensorboard"))
            except Exception:  # TensorBoard is a convenience; the JSON file is the record
                self._tb = None

    def write(self, step: int, epoch: float, figures: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "epoch": round(float(epoch), 4), "time": time.time()}
        record.update({k: float(v) for k, v in figures.items()})
        fileio.append_text(self.path, json.dumps(record) + "\n")
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for k, v in figures.items():
                    # tf.summary.write is in TF itself; tf.summary.scalar needs the tensorboard
                    # package. The metadata marks the value as a scalar, as scalar() would.
                    tf.summary.write(k, tf.constant(float(v), tf.float32), metadata=_SCALAR)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of workdir/metrics.jsonl (an empty list when there is none).

    A torn last line (the run was killed while appending it) is ignored; a damaged
    line before it raises ValueError naming the file and line.
    """
    path = fileio.join(workdir, METRICS_FILE)
    if not fileio.exists(path):
        return []
    lines = [(n, line) for n, line in enumerate(fileio.read_text(path).splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # torn by a kill mid-append: the resumed run writes that step again
            raise ValueError(f"{path} line {n} is not a JSON record ({e.msg}).") from None
    return records


def merge_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, in step order; a step's later figures update its earlier ones."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        by_step.setdefault(int(r["step"]), {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def truncate_metrics(workdir: str, step: int) -> int:
    """Keeps only the records of steps <= `step` in workdir/metrics.jsonl, in step order.

    The file is rewritten atomically (never half a file), and only when a record goes
    or moves or a torn last line is dropped. Records of one step stay as the run wrote
    them (an evaluation step has a training record and an evaluation record); returns
    how many remain.
    """
    path = fileio.join(workdir, METRICS_FILE)
    if not fileio.exists(path):
        return 0
    records = read_metrics(workdir)
    kept = sorted((r for r in records if int(r["step"]) <= step), key=lambda r: int(r["step"]))
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if kept != records or text != fileio.read_text(path):
        fileio.write_text_atomic(path, text)
    return len(kept)


def per_epoch(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """(epoch, value) series, one point per epoch as the seed plots them.

    Training figures are averaged over the epoch's logged intervals; the test
    accuracy is the evaluation at the epoch's end. A resumed run may log a step
    twice; the later record wins.
    """
    sums: dict[str, dict[int, list[float]]] = {}
    for r in merge_steps(records):
        bucket = max(1, math.ceil(r["epoch"] - 1e-9))
        for key in ("train_loss", "train_accuracy", "eval_top1_accuracy"):
            if key in r:
                sums.setdefault(key, {}).setdefault(bucket, []).append(r[key])
    series = {}
    for key, buckets in sums.items():
        if key == "eval_top1_accuracy":
            series[key] = [(float(e), v[-1]) for e, v in sorted(buckets.items())]
        else:
            series[key] = [(float(e), float(sum(v) / len(v))) for e, v in sorted(buckets.items())]
    return series


def plot_curves(workdir: str, path: str | None = None) -> str:
    """Training loss (left axis), training and test accuracy (right axis) per epoch."""
    # A bare Figure (no pyplot): no global backend switch, nothing left open in notebooks.
    from matplotlib.figure import Figure

    series = per_epoch(read_metrics(workdir))
    path = path or fileio.join(workdir, CURVES_FILE)
    fig = Figure(figsize=(6, 4))
    ax_loss = fig.subplots()
    ax_acc = ax_loss.twinx()
    styles = {
        "train_loss": (ax_loss, "train loss", "C0", "-"),
        "train_accuracy": (ax_acc, "train acc", "C1", "--"),
        "eval_top1_accuracy": (ax_acc, "test acc", "C2", "-."),
    }
    lines = []
    for key, (ax, label, color, style) in styles.items():
        points = series.get(key, [])
        if points:
            xs, ys = zip(*points, strict=True)
            lines += ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_loss.grid(True, alpha=0.3)
    if lines:
        ax_loss.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    ax_loss.set_title(fileio.basename(fileio.absolute(workdir)))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    fileio.write_bytes_atomic(path, png.getvalue())
    return path


# ---------------------------------------------------------------------------
# Evaluation: exact top-1/top-5 error counts (vgg_jax.evaluate's table).


@dataclasses.dataclass
class ErrorCounts:
    """Exact top-1/top-5 error counts over the examples whose mask is True."""

    count: int = 0
    top1_wrong: int = 0
    top5_wrong: int = 0

    def update(self, probs: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> None:
        probs, labels = np.asarray(probs), np.asarray(labels).astype(np.int64)
        mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
        if not len(probs) == len(labels) == len(mask):
            raise ValueError(
                f"probs, labels and mask disagree on the batch size: "
                f"{len(probs)}, {len(labels)}, {len(mask)}."
            )
        k = min(5, probs.shape[-1])
        # Ties broken towards the lower class index, as argmax does.
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        top1 = top[:, 0] == labels
        top5 = np.any(top == labels[:, None], axis=-1)
        self.count += int(mask.sum())
        self.top1_wrong += int((mask & ~top1).sum())
        self.top5_wrong += int((mask & ~top5).sum())

    def merge(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(
            self.count + other.count,
            self.top1_wrong + other.top1_wrong,
            self.top5_wrong + other.top5_wrong,
        )

    def all_processes(self) -> ErrorCounts:
        """The counts summed over every process (a no-op with one process)."""
        from vgg_jax import parallel  # jax: the training metrics above need none

        total = parallel.per_process([self.count, self.top1_wrong, self.top5_wrong]).sum(axis=0)
        return ErrorCounts(*(int(v) for v in total))

    @property
    def top1_error(self) -> float:
        return self.top1_wrong / self.count if self.count else float("nan")

    @property
    def top5_error(self) -> float:
        return self.top5_wrong / self.count if self.count else float("nan")

