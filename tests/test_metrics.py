"""Metrics on the host: the evaluator's exact error counts."""

import numpy as np
import pytest

from vgg_jax import metrics


def test_error_counts_by_hand():
    probs = np.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    counts = metrics.ErrorCounts()
    counts.update(probs, np.asarray([1, 2, 0, 1]), np.asarray([True, True, True, False]))
    assert (counts.count, counts.top1_wrong, counts.top5_wrong) == (3, 2, 0)
    assert counts.top1_error == pytest.approx(2 / 3)
