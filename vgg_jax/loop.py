"""The training loop, written once for every task (classification, localisation, ...).

A task (`Task`) says what differs: how to build the first state, the batches
from a start step, the jitted step, an evaluation returning named figures and
which figure drives the plateau schedule and picks the best checkpoint. `run`
does the rest, the same way for every task:

* holds the workdir's lock (`workdir_lock`, process 0) for the whole run;
* resumes from the newest intact checkpoint, after checking that the stored
  config allows it (`configuration.check_resume`; `config.resume_override`
  continues anyway and rewrites config.json);
* steps, logs every `log_every_steps`, evaluates every `eval_every_epochs`,
  saves on the grid (every `checkpoint_every_steps`, each epoch's end, the
  last step), keeps the best variables, saves and returns on SIGTERM or Ctrl-C;
* stops on divergence without saving the bad state (`Divergence`).

Bit-exact resume rests on the tasks: the dropout key of step s is
`fold_in(key(seed), s)` and the batches of step s are a function of (seed, s).

Divergence rule: every step's loss is fetched before each save and at each
log point. A non-finite loss stops the run, and so does a loss above
`config.divergence_factor` (default 10) times the median of the last
`DIVERGENCE_WINDOW` healthy losses, once `DIVERGENCE_WARMUP` of them are
known. The "last good" checkpoint is the newest one written before the
divergence window, which begins after the last step whose loss was at or
below that median (the loss of step s is computed with the parameters of the
checkpoint at step s - 1, so the checkpoint just before the bad step is
never it). Checkpoints newer than it are moved to workdir/diverged/ (not
deleted), so a rerun with a lower learning rate resumes from it.

(About 630 lines, and one idea: the loop every task shares.)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from vgg_jax import checkpoints, configuration, fileio, models, parallel, workdir_lock
from vgg_jax import metrics as metrics_lib

DIVERGENCE_WINDOW = 50  # healthy per-step losses whose median is the "recent level"
DIVERGENCE_WARMUP = 10  # losses needed before the ratio test applies (non-finite: always)
DIVERGED_DIR = "diverged"  # where checkpoints written during a divergence are moved


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: the step, variables, optimizer and plateau state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    plateau: Any  # optax.contrib.ReduceLROnPlateauState (scale 1 for other schedules)


StepFn = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
    """What one kind of training contributes to the loop.

    `train_step(state, batch) -> (state, figures)`: jitted; figures hold per-step
    device scalars "loss", "learning_rate" and optionally "accuracy".
    `batches(start_step)`: this process's rows of the global batches from start_step on.
    `evaluate(state) -> {name: float}`: the end-of-epoch evaluation, names among
    `eval_figures`. `plateau_metric` feeds schedule="plateau", `best_metric` picks the
    best checkpoint (`higher_is_better` decides the direction of each).
    """

    config: ml_collections.ConfigDict
    model: models.VGG
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    total_steps: int
    abstract_state: TrainState  # shapes (jax.eval_shape of init_state)
    state_sharding: TrainState  # NamedShardings of the same tree
    init_state: Callable[[Callable[[str], None]], TrainState]  # (say) -> state on state_sharding
    batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]]
    train_step: StepFn
    evaluate: Callable[[TrainState], dict[str, float]]
    eval_figures: tuple[str, ...]
    plateau_metric: str
    best_metric: str
    plateau: optax.GradientTransformationExtraArgs
    describe_eval: Callable[[int, Mapping[str, float]], str] | None = None
    plot_curves: bool = True  # curves.png at the end (the classification figures)
    # Undecodable training images skipped by `batches` (input_pipeline.BadImageCounter:
    # fields batch, epoch, epoch_count, total, updated at every next()); None: not counted.
    bad_images: Any = None


@dataclasses.dataclass
class Outcome:
    """What `run` ends with: the final (or restored) state and the summary figures."""

    state: TrainState
    summary: dict[str, Any]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # best, seconds, last eval

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))


def higher_is_better(name: str) -> bool:
    """Direction of a figure by its name: accuracies and IoU up, errors and losses down."""
    if "accuracy" in name or "iou" in name:
        return True
    if "error" in name or "loss" in name:
        return False
    raise ValueError(
        f"Figure {name!r} is not an accuracy, IoU, error or loss: its direction is unknown."
    )


def check_metric(task_figures: tuple[str, ...], field: str, name: str) -> None:
    """Raises a clear error when config.<field> names no figure of the task's evaluation."""
    if name not in task_figures:
        raise ValueError(
            f"config.{field}={name!r} is not a figure of this task's evaluation; choose one "
            f"of {task_figures}."
        )


def to_host(tree: Any) -> Any:
    """Fetches replicated arrays (works for arrays spanning several processes, too)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def variables_of(state: TrainState) -> dict[str, Any]:
    """{'params', 'batch_stats' (batch-norm nets only)}: what a model applies."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


class Preemption:
    """Turns SIGTERM, and a first Ctrl-C (SIGINT), into a flag the loop checks after each step.

    The loop then saves the step it is at and returns, so stopping a run by hand loses
    nothing, as a preemption does not. A second signal of either kind stops the process
    at once, unsaved (exit status 128 + its number), also when the step never ends (a
    collective waiting for a dead peer): a watcher thread reads the signals from Python's
    wakeup file descriptor, which the C-level handler writes even while the main thread
    is blocked in native code and no Python handler can run.
    """

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def __init__(self):
        self.requested: str | None = None  # what asked: "SIGTERM" or "Ctrl-C"
        self._previous: dict[int, Any] = {}
        self._watcher: _SignalWatcher | None = None

    def __enter__(self):
        try:
            for signum in self.NAMES:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored: by design (nohup)
                    self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = {}
        if self._previous:
            self._watcher = _SignalWatcher.start(self.NAMES)
        return self

    def _handle(self, signum, frame):
        first = self.requested is None
        self.requested = self.requested or self.NAMES[signum]
        if self._watcher is not None:
            return  # the watcher announced it, and ends the process on a second signal
        if not first and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if first:
            _announce(self.NAMES[signum])

    def __exit__(self, *exc):
        if self._watcher is not None:
            self._watcher.stop()
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python, nothing to restore
                signal.signal(signum, previous)


def _announce(name: str) -> None:
    print(
        f"\n{name}: saving after this step, then stopping ({name} again to stop unsaved).",
        file=sys.stderr,
        flush=True,
    )


class _SignalWatcher:
    """A daemon thread that reads the signal numbers Python's C handler writes to a
    socket (signal.set_wakeup_fd): it announces the first stop signal and ends the
    process at the second, whatever the main thread is doing."""

    def __init__(self, names: Mapping[int, str], receive: Any, send: Any, previous_fd: int):
        self._names, self._receive, self._send = names, receive, send
        self._previous_fd = previous_fd
        self._thread = threading.Thread(target=self._watch, name="stop-signals", daemon=True)

    @classmethod
    def start(cls, names: Mapping[int, str]) -> _SignalWatcher | None:
        receive, send = socket.socketpair()
        send.setblocking(False)
        previous_fd = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        if previous_fd != -1:  # someone else reads the wakeup fd (an event loop): leave it
            signal.set_wakeup_fd(previous_fd)
            receive.close()
            send.close()
            return None
        watcher = cls(names, receive, send, previous_fd)
        watcher._thread.start()
        return watcher

    def _watch(self) -> None:
        seen = 0
        while data := self._receive.recv(64):
            for signum in data:
                if signum not in self._names:
                    continue
                seen += 1
                name = self._names[signum]
                if seen == 1:
                    _announce(name)
                    continue
                print(
                    f"{name} again: stopped without saving; a rerun resumes from the last "
                    "checkpoint.",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(128 + signum)

    def stop(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        self._send.close()  # the watcher's recv returns b"": it ends
        self._thread.join()
        self._receive.close()


# ---------------------------------------------------------------------------
# Divergence.


class Divergence(FloatingPointError):
    """The training loss left its recent level; carries the step and the reason."""

    def __init__(self, step: int, reason: str, window_start: int):
        super().__init__(reason)
        self.step, self.reason, self.window_start = step, reason, window_start


class DivergenceGuard:
    """Checks each step's loss against the median of the recent healthy ones."""

    def __init__(self, factor: float, window: int = DIVERGENCE_WINDOW):
        self.factor = float(factor)
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.last_normal: int | None = None  # the last step at or below the recent median

    def check(self, step: int, loss: float) -> None:
        """Raises Divergence for a non-finite loss or one far above the recent level."""
        median = float(np.median(self.recent)) if self.recent else math.nan
        if not math.isfinite(loss):
            self._stop(step, f"The training loss is {loss} at step {step}")
        warm = len(self.recent) >= DIVERGENCE_WARMUP
        if self.factor > 0 and warm and loss > self.factor * median:
            self._stop(
                step,
                f"The training loss is {loss:.4g} at step {step}, more than "
                f"{self.factor:g}x the median {median:.4g} of the last {len(self.recent)} steps",
            )
        if not self.recent or loss <= median:
            self.last_normal = step
        self.recent.append(loss)

    def _stop(self, step: int, reason: str) -> None:
        start = self.last_normal if self.last_normal is not None else step - 1
        raise Divergence(step, reason, start)


def last_good_step(saved: list[int], window_start: int) -> int | None:
    """The newest saved step whose parameters produced a loss before the divergence window.

    The checkpoint at step c holds the parameters that computed the loss of step c + 1, so
    it is good when c + 1 <= window_start.
    """
    good = [s for s in saved if s + 1 <= window_start]
    return max(good) if good else None


def set_aside_diverged(workdir: str, steps: list[int]) -> str:
    """Moves the checkpoints of `steps` into workdir/diverged/ (kept, not deleted)."""
    target = fileio.join(workdir, DIVERGED_DIR)
    fileio.makedirs(target)
    for step in steps:
        source = fileio.join(workdir, checkpoints.STATE_DIR, str(step))
        dest = fileio.join(target, str(step))
        n = 1
        while fileio.exists(dest):
            dest, n = fileio.join(target, f"{step}.{n}"), n + 1
        fileio.move_tree(source, dest)
    return target


def divergence_message(e: Divergence, config, workdir: str, good: int | None, moved: list[int]):
    """The stop's one paragraph: what happened, what is kept, what to change."""
    where = fileio.join(workdir, DIVERGED_DIR)
    text = f"{e.reason}: training stopped without saving it. "
    if moved:
        text += (
            f"The checkpoints of steps {moved}, written while the loss was already rising, "
            f"were moved to {where} (not deleted). "
        )
    if good is None:
        text += (
            "No checkpoint was written before the divergence, so none is kept: the next run "
            "starts from scratch. "
        )
    else:
        text += (
            f"The last good checkpoint is step {good} in "
            f"{fileio.join(workdir, checkpoints.STATE_DIR)}; the next run resumes from it. "
        )
    return text + (
        f"Lower config.learning_rate (now {config.learning_rate:g}) or raise "
        "config.warmup_epochs, or check the input data, then run again."
    )


# ---------------------------------------------------------------------------
# Logging.


class _Logger:
    """Holds per-step figures on device; fetches and checks them, writes every N steps."""

    def __init__(self, run: _Run, start_step: int):
        self.run = run
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.last_time = time.perf_counter()
        self.last_step = start_step
        self.seconds_per_step = math.nan
        self.guard = DivergenceGuard(run.config.get("divergence_factor", 10.0))
        self.bad_since_log = 0

    def add(self, step: int, figures: dict[str, jax.Array]) -> None:
        self.pending.append((step, figures))
        counter = self.run.task.bad_images
        if counter is not None:
            self.bad_since_log += counter.batch

    def fetch(self) -> dict[str, float]:
        """The pending steps' figures, averaged; every step's loss checked (Divergence)."""
        if not self.pending:
            return {}
        steps = [s for s, _ in self.pending]
        fetched = to_host([f for _, f in self.pending])
        self.pending = []
        for s, f in zip(steps, fetched, strict=True):
            self.guard.check(s, float(f["loss"]))
        now = time.perf_counter()
        done = steps[-1] - self.last_step
        elapsed = now - self.last_time
        self.last_time, self.last_step = now, steps[-1]
        if done > 0:
            self.seconds_per_step = elapsed / done
        figures = {"train_loss": float(np.mean([f["loss"] for f in fetched]))}
        if "accuracy" in fetched[-1]:
            figures["train_accuracy"] = float(np.mean([f["accuracy"] for f in fetched]))
        figures["learning_rate"] = float(fetched[-1]["learning_rate"])
        batch = self.run.config.batch_size
        figures["images_per_second"] = batch / self.seconds_per_step if done > 0 else 0.0
        figures.update(self._bad_images())
        return figures

    def _bad_images(self) -> dict[str, float]:
        """Skipped training images since the last log point, in the epoch and in all,
        summed over processes (each counts its own rows)."""
        counter = self.run.task.bad_images
        if counter is None:
            return {}
        counts = [self.bad_since_log, counter.epoch_count, counter.total]
        self.bad_since_log = 0
        since, epoch_count, total = (int(c) for c in parallel.per_process(counts).sum(axis=0))
        if since:
            self.run.say(
                f"Skipped {since} undecodable training images (epoch {counter.epoch + 1}: "
                f"{epoch_count}, run: {total}); config.bad_images='fail' stops at the first."
            )
        return {"bad_images": since, "bad_images_epoch": epoch_count, "bad_images_total": total}

    def write(self, step: int, figures: Mapping[str, float]) -> None:
        run = self.run
        if figures and parallel.is_main_process():
            run.writer.write(step, step / run.steps_per_epoch, figures)
            run.bar.update(step, figures, self.seconds_per_step)


# ---------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Run:
    task: Task
    workdir: str
    manager: ocp.CheckpointManager
    best: ocp.CheckpointManager
    writer: metrics_lib.MetricsWriter
    bar: metrics_lib.ProgressBar
    meta: dict[str, Any]
    plateau_update: Callable

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.task.config

    @property
    def steps_per_epoch(self) -> int:
        return self.task.steps_per_epoch

    def say(self, text: str) -> None:
        if parallel.is_main_process():
            self.bar.message(text)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """workdir/config.json: what `checkpoints.load_workdir` and evaluators read back."""
    text = json.dumps(config.to_dict(), indent=2, default=str)
    fileio.write_text_atomic(fileio.join(workdir, checkpoints.CONFIG_FILE), text)


# What a rerun after a divergence stop may change beside the resumable fields (the stop's advice).
AFTER_DIVERGENCE_FIELDS = ("learning_rate", "warmup_epochs")


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """The config differences a resume accepts; refuses the others (configuration.check_resume).

    `config.resume_override=True` accepts any difference. After a divergence stop
    (workdir/diverged exists) the learning rate and warm-up may change too, as the
    stop's message advises. The caller records accepted differences in config.json
    once the checkpoint has been restored.
    """
    if not checkpoints.is_run(workdir):
        return []
    try:
        stored = checkpoints.read_run_config(workdir)
    except ValueError as e:  # damaged, beside intact checkpoints: only an override goes on
        if config.get("resume_override", False):
            return [f"the damaged {checkpoints.CONFIG_FILE} replaced by this config"]
        raise ValueError(
            f"{e} The checkpoints are intact: put the run's config.json back, or pass "
            "--config.resume_override=True to continue with this command's config (config.json "
            "is then rewritten)."
        ) from None
    try:
        return configuration.check_resume(stored, config, workdir)
    except ValueError:
        accepted = _after_divergence(stored, config, workdir)
        if accepted is None:
            raise
        return accepted


def _after_divergence(stored: dict, config, workdir: str) -> list[str] | None:
    """The differences, when a diverged run changes only what the stop's message advised."""
    if not fileio.isdir(fileio.join(workdir, DIVERGED_DIR)):
        return None
    diffs = configuration.config_differences(stored, config)
    allowed = set(configuration.resumable_fields(config)) | set(AFTER_DIVERGENCE_FIELDS)
    if set(diffs) - allowed:
        return None
    return [f"{k}: {a} -> {b}" for k, (a, b) in diffs.items()]


def _mode(metric: str) -> str:
    return "max" if higher_is_better(metric) else "min"


def _restore(run: _Run, step: int) -> tuple[TrainState, dict[str, Any]]:
    """The state saved at `step`, checked against the model first (naming a mismatch)."""
    task = run.task
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        task.abstract_state,
        task.state_sharding,
    )
    source = fileio.join(run.workdir, checkpoints.STATE_DIR, str(step))
    return checkpoints.restore_state(run.manager, step, task.model, target, source)


def _save(run: _Run, state: TrainState, seconds: float, finished: bool = False) -> None:
    step = int(to_host(state.step))
    meta = {**run.meta, "finished": finished, "epoch": step / run.steps_per_epoch}
    meta["seconds"] = seconds
    counter = run.task.bad_images
    if counter is not None:  # every process's counts (process 0 writes meta), to continue them
        meta["bad_images"] = counter.saved(
            parallel.per_process([counter.epoch_count, counter.total])
        )
    checkpoints.save_state(run.manager, step, state, meta)


def _after_eval(run: _Run, state: TrainState, figures: dict[str, float]) -> TrainState:
    """Feeds the plateau figure to the schedule; keeps the best variables."""
    task = run.task
    step = int(to_host(state.step))
    if run.config.schedule == "plateau":
        value = figures[task.plateau_metric]
        # The plateau minimises: 1 - accuracy (today's validation error), or the error itself.
        value = np.float32(1.0 - value if higher_is_better(task.plateau_metric) else value)
        _, plateau = run.plateau_update(state.plateau, value)
        old = float(to_host(state.plateau.scale))
        new = float(to_host(plateau.scale))
        if new < old:
            run.say(
                f"Validation {task.plateau_metric} stalled: learning rate x{new / old:g} "
                f"(scale {new:g})."
            )
        state = state.replace(plateau=plateau)
    metric = task.best_metric
    if checkpoints.save_best(
        run.best, step, variables_of(state), figures, metric=metric, mode=_mode(metric)
    ):
        run.meta.update(best_metric=metric, best_value=figures[metric], best_step=step)
        if metric == "eval_top1_accuracy":
            run.meta["best_accuracy"] = figures[metric]  # the name earlier runs and transfer read
    return state


def _setup(task: Task, workdir: str) -> _Run:
    config = task.config
    main = parallel.is_main_process()
    plateau = task.plateau
    repl = parallel.replicated(task.mesh)
    return _Run(
        task=task,
        workdir=workdir,
        manager=checkpoints.state_manager(workdir, keep=config.keep_checkpoints),
        best=checkpoints.best_manager(
            workdir, metric=task.best_metric, mode=_mode(task.best_metric)
        ),
        writer=None,  # opened once the start step is known
        bar=metrics_lib.ProgressBar(
            task.total_steps, task.steps_per_epoch, enabled=main and config.progress_bar
        ),
        meta={"model": config.model, "best_step": -1},
        plateau_update=jax.jit(
            lambda state, value: plateau.update(updates={}, state=state, value=value),
            out_shardings=repl,
        ),
    )


def _restored_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("best_metric", "best_value", "best_step", "best_accuracy", "seconds", "eval")
    keep += ("bad_images",)
    out = {k: v for k, v in meta.items() if k in keep}
    if "best_value" not in out and "best_accuracy" in out:  # a checkpoint of an earlier version
        out["best_value"] = out["best_accuracy"]
        out["best_metric"] = "eval_top1_accuracy"
    return out


def run(task: Task, workdir: str) -> Outcome:
    """Trains (or resumes) `task` in `workdir` until its last step, SIGTERM or divergence."""
    workdir = fileio.absolute(workdir)
    for field, name in (("plateau_metric", task.plateau_metric), ("best_metric", task.best_metric)):
        check_metric(task.eval_figures, field, name)
        higher_is_better(name)
    with workdir_lock.hold(workdir, enabled=parallel.is_main_process()):
        fileio.makedirs(workdir)
        run_ = _setup(task, workdir)
        try:
            return _run(run_)
        finally:
            checkpoints.wait_until_finished(run_.manager)
            run_.best.wait_until_finished()
            run_.manager.close()
            run_.best.close()
            if run_.writer is not None:
                run_.writer.close()


def _run(run: _Run) -> Outcome:
    task, config, workdir = run.task, run.config, run.workdir
    latest = checkpoints.newest_intact_step(run.manager, workdir, run.say)
    if latest is not None:
        accepted = check_resumable(config, workdir)
        state, meta = _restore(run, latest)
        if accepted:
            changed = "; ".join(accepted)
            run.say(f"Resuming with a changed config: {changed} (config.json rewritten).")
            if parallel.is_main_process():
                save_config(config, workdir)
        run.meta.update(_restored_meta(meta))
        if latest >= task.total_steps:
            best = run.meta.get("best_value")
            best_text = f", best {task.best_metric} {best:.4f}" if best is not None else ""
            schedule = config.get("schedule")
            if schedule in configuration.LENGTH_SCHEDULES:
                more = f" (schedule={schedule!r} decays over the run's length: a longer run is new)"
            else:
                more = ", or raise num_epochs/max_steps to continue"
            run.say(
                f"The run in {workdir} is complete (step {latest} of {task.total_steps}"
                f"{best_text}); nothing to do. Use a new --workdir to train again{more}."
            )
            return Outcome(
                state, {"step": latest, "complete": True, **_summary_meta(run.meta)}, run.meta
            )
        run.say(f"Resuming from step {latest} in {workdir}.")
    else:
        if parallel.is_main_process():
            save_config(config, workdir)
        state = task.init_state(run.say)
    run.writer = metrics_lib.MetricsWriter(
        workdir,
        enabled=parallel.is_main_process(),
        tensorboard=config.get("tensorboard", True),
        resume_step=latest or 0,
    )
    try:
        return _steps(run, state)
    except Divergence as e:
        raise _diverged(run, e) from None


def _diverged(run: _Run, e: Divergence) -> FloatingPointError:
    """Sets aside the checkpoints written during the divergence; the stop's message."""
    checkpoints.wait_until_finished(run.manager)
    saved = sorted(run.manager.all_steps())
    good = last_good_step(saved, e.window_start)
    moved = [s for s in saved if good is None or s > good]
    if moved and parallel.is_main_process():
        run.manager.close()
        set_aside_diverged(run.workdir, moved)
        run.manager = checkpoints.state_manager(run.workdir, keep=run.config.keep_checkpoints)
    return FloatingPointError(divergence_message(e, run.config, run.workdir, good, moved))


def _summary_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "eval"}


def _steps(run: _Run, state: TrainState) -> Outcome:
    task, config = run.task, run.config
    spe, total = task.steps_per_epoch, task.total_steps
    step = int(to_host(state.step))
    counts = run.meta.pop("bad_images", None)  # the summary has the figures' counts instead
    if task.bad_images is not None and counts:  # each process continues its own share
        task.bad_images.resume(counts, jax.process_index(), jax.process_count())
    if run.bar.enabled:
        # Reading the input (an in-memory training set decodes it all) and compiling take
        # 20-40 s on a 2-core CPU before the first progress line; say what is happening.
        run.say(
            f"Step {step} of {total}: preparing the training input and compiling the train "
            f"step; progress every {config.log_every_steps} steps."
        )
    data = task.batches(step)
    logger = _Logger(run, step)
    figures: dict[str, float] = {}
    seconds_before, start = float(run.meta.get("seconds", 0.0)), time.perf_counter()

    def seconds() -> float:
        return seconds_before + time.perf_counter() - start

    with Preemption() as preemption:
        while step < total:
            batch = parallel.global_batch(dict(next(data)), task.mesh)
            state, step_figures = task.train_step(state, batch)
            step += 1
            logger.add(step, step_figures)
            epoch_end = step % spe == 0
            last = step == total
            evaluate = last or (epoch_end and (step // spe) % config.eval_every_epochs == 0)
            save = epoch_end or last or step % config.checkpoint_every_steps == 0
            if evaluate or save or step % config.log_every_steps == 0:
                logged = logger.fetch()  # every step's loss checked before anything is saved
                if evaluate:
                    ev = task.evaluate(state)
                    state = _after_eval(run, state, ev)
                    run.meta["eval"] = ev
                    run.say(_describe(task, step, ev))
                    logged.update(ev)
                logger.write(step, logged)
                figures.update(logged)
            if save:
                _save(run, state, seconds(), finished=last)
            if preemption.requested and not last:
                logger.write(step, logger.fetch())
                _save(run, state, seconds())
                checkpoints.wait_until_finished(run.manager)
                run.say(
                    f"{preemption.requested}: saved step {step} in {run.workdir}; run the same "
                    "command again to resume."
                )
                return Outcome(state, {"step": step, "preempted": True, **figures}, run.meta)
    checkpoints.wait_until_finished(run.manager)
    if parallel.is_main_process() and task.plot_curves:
        metrics_lib.plot_curves(run.workdir)
    run.meta["seconds"] = seconds()
    summary = {"step": step, "complete": True, **figures, **_summary_meta(run.meta)}
    return Outcome(state, summary, run.meta)


def _describe(task: Task, step: int, figures: Mapping[str, float]) -> str:
    if task.describe_eval is not None:
        return task.describe_eval(step, figures)
    return f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
