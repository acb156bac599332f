"""The paper's transfer protocols on fixed descriptors: linear SVMs and their two metrics.

Appendix B trains a linear SVM on the image descriptors, with its
regularisation C chosen on a held-out 20% of the training images (`fit_svm`),
and reports

* mean class recall (`caltech_protocol`, Caltech-101/256): several random
  splits with a fixed number of training images per class, per-class recall
  on the test images averaged over classes, then over splits; or
* mean average precision (`voc_protocol`, VOC, multi-label): one SVM per
  class (one vs. rest), AP per class on the test split, averaged over classes.

Descriptors in, figures out: nothing here knows about networks or images
(`vgg_jax.transfer` computes the descriptors and is the command line). Needs
scikit-learn (the `transfer` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

# LinearSVC regularisation values tried on the held-out 20% (the paper does not list its grid).
DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
HELD_OUT = 0.2
HELD_OUT_REPEATS = 5  # random 80/20 partitions averaged for the choice of C


def per_class_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` random examples of every class (fewer if a class is short)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append(rng.choice(members, min(per_class, members.size), replace=False))
    return np.sort(np.concatenate(picks))


def _require_sklearn() -> None:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise ImportError(
            "The transfer SVMs need scikit-learn: pip install 'vgg-jax[transfer]' "
            "(or pip install scikit-learn)."
        )


def mean_class_recall(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Recall of each class present in `labels`, averaged over those classes."""
    recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes (those with a positive test example) of the average precision."""
    _require_sklearn()
    from sklearn.metrics import average_precision_score

    present = [k for k in range(labels.shape[1]) if labels[:, k].any()]
    if not present:
        raise ValueError("No class has a positive test example; mAP is undefined.")
    return float(np.mean([average_precision_score(labels[:, k], scores[:, k]) for k in present]))


def _svm(c: float, multi_label: bool, seed: int) -> Any:
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=c, max_iter=20_000, random_state=seed)
    return OneVsRestClassifier(svm) if multi_label else svm


def _score(model: Any, x: np.ndarray, labels: np.ndarray) -> float:
    if labels.ndim == 2:
        return mean_average_precision(labels, model.decision_function(x))
    return mean_class_recall(labels, model.predict(x))


def fit_svm(
    x: np.ndarray,
    labels: np.ndarray,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
    repeats: int = HELD_OUT_REPEATS,
) -> tuple[Any, float]:
    """A linear SVM on all of (x, labels), its C the best of `c_grid` on a held-out 20%.

    Returns (fitted model, chosen C). The held-out score is averaged over
    `repeats` random 80/20 partitions (stratified by class for single-label
    data): with 10 images per class one partition holds out 2 per class, and a
    single draw picked C values off by four orders of magnitude. Ties go to
    the smaller C (stronger regularisation).
    """
    _require_sklearn()
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    multi = labels.ndim == 2
    if not multi and np.min(np.bincount(labels)[np.unique(labels)]) < 2:
        raise ValueError("Every class needs at least 2 training images (one is held out for C).")
    best_c, best = c_grid[0], -1.0
    if len(c_grid) > 1:
        kind = ShuffleSplit if multi else StratifiedShuffleSplit
        parts = list(kind(repeats, test_size=HELD_OUT, random_state=seed).split(x, labels))
        for c in c_grid:
            score = np.mean(
                [
                    _score(_svm(c, multi, seed).fit(x[fit], labels[fit]), x[val], labels[val])
                    for fit, val in parts
                ]
            )
            if score > best:
                best_c, best = c, score
    return _svm(best_c, multi, seed).fit(x, labels), float(best_c)


@dataclasses.dataclass
class SplitResult:
    train_per_class: int
    scores: list[float]  # one per random split
    chosen_c: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        return float(np.std(self.scores))


def caltech_protocol(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    train_per_class: int,
    splits: int = 5,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
) -> SplitResult:
    """Mean class recall averaged over `splits` random draws of N training images per class."""
    short = [int(c) for c in np.unique(train_labels) if np.sum(train_labels == c) < train_per_class]
    if short:
        raise ValueError(
            f"Classes {short} have fewer than {train_per_class} training images; lower "
            "--train-per-class or give more training images."
        )
    scores, cs = [], []
    for s in range(splits):
        idx = per_class_indices(train_labels, train_per_class, seed + s)
        model, c = fit_svm(train_x[idx], train_labels[idx], c_grid, seed + s)
        scores.append(mean_class_recall(test_labels, model.predict(test_x)))
        cs.append(c)
    return SplitResult(train_per_class, scores, cs)


def voc_protocol(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
) -> SplitResult:
    """mAP of one-vs-rest SVMs trained on the whole training split (one 'split')."""
    model, c = fit_svm(train_x, train_labels, c_grid, seed)
    score = mean_average_precision(test_labels, model.decision_function(test_x))
    return SplitResult(0, [score], [c])
