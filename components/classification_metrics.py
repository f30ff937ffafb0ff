"""Classification metrics as an offline `evaluate.Metric`, plus bootstrap confidence intervals.

`evaluate.load("accuracy")` fetches its script from the Hub. A `Metric` subclass defined here
needs no download and still goes through `evaluate`'s compute/add_batch machinery.
"""

from typing import Any

import datasets
import evaluate
import numpy as np


class ClassificationReport(evaluate.Metric):
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""

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
            "macro_f1": float(f1.mean()),
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
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    cells = y_true[idx] * num_labels + y_pred[idx]
    offsets = np.arange(n_resamples)[:, None] * num_labels * num_labels
    counts = np.bincount((cells + offsets).ravel(), minlength=n_resamples * num_labels**2)
    matrices = counts.reshape(n_resamples, num_labels, num_labels)
    accuracy = np.trace(matrices, axis1=1, axis2=2) / n
    macro_f1 = _per_class(matrices)[2].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return {
        name: (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
        for name, values in (("accuracy", accuracy), ("macro_f1", macro_f1))
    }
