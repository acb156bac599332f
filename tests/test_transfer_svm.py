"""Linear SVMs and the transfer metrics on synthetic descriptors with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from vgg_jax import transfer_svm


def test_mean_class_recall_and_map_on_known_answers():
    labels = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 1, 1, 0])
    # Class 0: 3/4, class 1: 1/2 -> 0.625 (plain accuracy would be 4/6).
    assert transfer_svm.mean_class_recall(labels, predicted) == pytest.approx(0.625)
    multi = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    # Class 0 ranks its positives 1st and 4th: AP = (1 + 2/4) / 2; class 1 ranks them 1st, 2nd.
    scores = np.array([[0.9, 0.1], [0.5, 0.8], [0.2, 0.9], [0.4, 0.0]])
    assert transfer_svm.mean_average_precision(multi, scores) == pytest.approx((0.75 + 1) / 2)


def test_svm_protocols_on_separable_and_noisy_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20))
    labels = np.repeat(np.arange(3), 40)
    x = centres[labels] + 0.3 * rng.normal(size=(120, 20))
    test_labels = np.repeat(np.arange(3), 30)
    test_x = centres[test_labels] + 0.3 * rng.normal(size=(90, 20))
    good = transfer_svm.caltech_protocol(x, labels, test_x, test_labels, 10, splits=3)
    assert good.mean > 0.95 and len(good.scores) == 3
    assert set(good.chosen_c) <= set(transfer_svm.DEFAULT_C_GRID)
    noise = transfer_svm.caltech_protocol(
        rng.normal(size=x.shape), labels, test_x, test_labels, 10, splits=3
    )
    assert noise.mean < 0.6  # chance is 1/3: the metric can fail
    with pytest.raises(ValueError, match="fewer than 50 training images"):
        transfer_svm.caltech_protocol(x, labels, test_x, test_labels, 50)
    # Multi-label: class k present where feature k is high.
    multi = (x[:, :3] > 0).astype(int)
    result = transfer_svm.voc_protocol(x, multi, test_x, (test_x[:, :3] > 0).astype(int))
    assert result.mean > 0.9
