"""Undecodable images: the policy (config.bad_images) and the counter the streams keep.

Kept apart from the TensorFlow streams (`vgg_jax.input_common`) so that a
trainer fed by other data (`train.train_and_evaluate(..., data=...)`) counts
them without importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

BAD_IMAGE_POLICIES = ("skip", "fail")


@dataclasses.dataclass
class BadImageCounter:
    """Undecodable images skipped by a `train_dataset` or `eval_dataset` iterator.

    Create one, pass it as `bad_images=`; after every `next()` it describes the
    batch just yielded (this process only; sum over processes for a global count):

      batch        images skipped for that batch: a pure function of (config.seed,
                   step) and the data, so a resumed run counts what the first run did;
      names        their file names (tfds ids for tfds datasets);
      epoch        that batch's epoch (always 0 for evaluation);
      epoch_count  skipped in that epoch so far; total: skipped in all.

    Every bad file is counted once per epoch it is skipped in (`total` sums
    epochs). A resumed run starts from the counts it is given, e.g.
    `BadImageCounter(epoch=e, epoch_count=n, total=t)` or `resume` (each process's
    share of what a checkpoint kept); `epoch_count` restarts at 0 when the epoch changes.
    """

    batch: int = 0
    epoch: int = 0
    epoch_count: int = 0
    total: int = 0
    names: list[str] = dataclasses.field(default_factory=list)

    def add(self, epoch: int, names: list[str]) -> None:
        """Records the skipped files of one batch of `epoch`."""
        if epoch != self.epoch:
            self.epoch, self.epoch_count = epoch, 0
        self.batch, self.names = len(names), list(names)
        self.epoch_count += len(names)
        self.total += len(names)

    def saved(self, shares: np.ndarray) -> dict[str, Any]:
        """What a checkpoint keeps of the counts: the epoch, the counts summed over processes
        and each process's own [epoch_count, total] (`shares`, one row per process)."""
        shares = np.asarray(shares, np.int64).reshape(-1, 2)
        epoch_count, total = (int(v) for v in shares.sum(axis=0))
        return {
            "epoch": self.epoch,
            "epoch_count": epoch_count,
            "total": total,
            "processes": shares.tolist(),
        }

    def resume(self, saved: dict[str, Any], process_index: int, process_count: int) -> None:
        """Continues the counts of a checkpoint (`saved`: what `saved` returned then).

        Each process takes its own share when the run had as many processes; otherwise
        (another process count, or a checkpoint of an earlier version, which kept process
        0's counts only) process 0 takes them all and the others start at 0, so that the
        sum over processes stays the run's.
        """
        shares = saved.get("processes") or [[saved["epoch_count"], saved["total"]]]
        if len(shares) == process_count:
            own = shares[process_index]
        else:
            own = np.sum(shares, axis=0) if process_index == 0 else (0, 0)
        self.epoch = int(saved["epoch"])
        self.epoch_count, self.total = (int(v) for v in own)


def bad_image_policy(config) -> str:
    """config.bad_images: "skip" (default: skip and count) or "fail" (stop at the first)."""
    policy = config.get("bad_images", "skip")
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"config.bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}.")
    return policy


def check_bad_images(config, names: list[str], what: str) -> None:
    """With config.bad_images="fail", an error naming the first undecodable file."""
    if names and bad_image_policy(config) == "fail":
        raise ValueError(
            f"{what} image {names[0]!r} cannot be decoded; repair or remove it, or set "
            "config.bad_images='skip' to skip and count such files."
        )
