"""Classification metrics as an offline `evaluate.Metric`, plus bootstrap confidence intervals.

`evaluate.load("accuracy")` fetches its script from the Hub. A `Metric` subclass defined here
needs no download and still goes through `evaluate`'s compute/add_batch machinery.
"""

from typing import Any

import datasets
import evaluate
import numpy as np


class ClassificationReport(evaluate.Metric):
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Macro-F1 is the mean F1 of the classes the references hold: a class with no row there (a
    rare class kept in train only) cannot be scored, and counting it as 0 would only lower the
    mean by a constant.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.__doc__ or "",
            citation="",
            inputs_description="predictions and references: class ids; num_labels: class count",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_labels: int | None = None) -> dict[str, Any]:
        y_pred, y_true = np.asarray(predictions), np.asarray(references)
        if num_labels is None:
            num_labels = int(max(y_pred.max(initial=0), y_true.max(initial=0))) + 1
        matrix = confusion_matrix(y_true, y_pred, num_labels)
        precision, recall, f1 = _per_class(matrix)
        return {
            "accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
            "macro_f1": float(_macro(f1, matrix.sum(axis=1))),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": matrix.sum(axis=1).tolist(),
            "confusion_matrix": matrix.tolist(),
        }


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    flat = np.bincount(y_true * num_labels + y_pred, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels)


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class along the last two axes (0 where undefined)."""
    true_pos = np.diagonal(matrix, axis1=-2, axis2=-1).astype(float)
    predicted, actual = matrix.sum(axis=-2), matrix.sum(axis=-1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return precision, recall, f1


def _macro(f1: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Mean F1 (along the last axis) over the classes with ``support`` (all when none has)."""
    present = support > 0
    if not present.any():
        present = np.ones_like(present)
    return f1[..., present].mean(axis=-1)


def _resampled_matrices(
    y_true: np.ndarray, y_pred: np.ndarray, num_labels: int, idx: np.ndarray
) -> np.ndarray:
    """Confusion matrices [resamples, C, C] of the rows ``idx`` picks, all at once."""
    n_resamples = len(idx)
    cells = y_true[idx] * num_labels + y_pred[idx]
    offsets = np.arange(n_resamples)[:, None] * num_labels * num_labels
    counts = np.bincount((cells + offsets).ravel(), minlength=n_resamples * num_labels**2)
    return counts.reshape(n_resamples, num_labels, num_labels)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_labels: int,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for accuracy and macro-F1 (all resamples vectorised)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    matrices = _resampled_matrices(y_true, y_pred, num_labels, idx)
    accuracy = np.trace(matrices, axis1=1, axis2=2) / n
    macro_f1 = _macro(_per_class(matrices)[2], np.bincount(y_true, minlength=num_labels))
    return {
        "accuracy": _interval(accuracy, confidence),
        "macro_f1": _interval(macro_f1, confidence),
    }


def paired_bootstrap_macro_f1(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    num_labels: int,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Macro-F1 of a minus macro-F1 of b on the same rows, and its percentile interval.

    Each resample draws the same rows for both models, so what the two have in common (the
    hard and easy rows) cancels out: the interval is much tighter than two separate ones.
    """
    y_true, pred_a, pred_b = map(np.asarray, (y_true, pred_a, pred_b))
    n = len(y_true)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    support = np.bincount(y_true, minlength=num_labels)
    f1_a = _macro(_per_class(_resampled_matrices(y_true, pred_a, num_labels, idx))[2], support)
    f1_b = _macro(_per_class(_resampled_matrices(y_true, pred_b, num_labels, idx))[2], support)
    full_a = _macro(_per_class(confusion_matrix(y_true, pred_a, num_labels))[2], support)
    full_b = _macro(_per_class(confusion_matrix(y_true, pred_b, num_labels))[2], support)
    low, high = _interval(f1_a - f1_b, confidence)
    return float(full_a - full_b), low, high
