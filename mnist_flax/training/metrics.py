"""Metrics: clu collections merged inside jit for training, NumPy for evaluation.

Training metrics stay on the device between log points (`TrainMetrics` is a
pytree merged in the compiled step). Evaluation runs once per eval over the
whole split's log-probabilities and computes the classification report.
"""

import flax
import numpy as np
from clu import metrics as clu_metrics


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Mean loss and accuracy over the steps since the last log point."""

    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy


def _rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # Start and end of each run of equal values.
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def binary_auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when one class is absent."""
    num_pos = int(positives.sum())
    num_neg = len(positives) - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _rankdata(scores)
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(log_probs: np.ndarray, labels: np.ndarray) -> dict:
    """Loss, accuracy, precision/recall/F1 (macro and per class), AUROC, confusion matrix.

    Args:
      log_probs: (N, C) log-probabilities of the valid (unpadded) examples.
      labels: (N,) integer labels.

    Returns:
      A dict of floats, per-class lists under "per_class", and "confusion_matrix"
      as a nested list (rows true, columns predicted).
    """
    log_probs = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels, np.int64)
    num_classes = log_probs.shape[1]
    predictions = log_probs.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = np.where(actual > 0, true_pos / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    probs = np.exp(log_probs)
    auroc = np.array([binary_auroc(probs[:, c], labels == c) for c in range(num_classes)])
    present = actual > 0
    return {
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "accuracy": float((predictions == labels).mean()),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "auroc_macro": float(np.nanmean(auroc)),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "auroc": auroc.tolist(),
        },
        "confusion_matrix": matrix.tolist(),
        "num_examples": len(labels),
    }


def scalar_metrics(report: dict, prefix: str) -> dict[str, float]:
    """The scalar entries of a classification report, keyed "prefix/name"."""
    scalars = {f"{prefix}/{k}": v for k, v in report.items() if isinstance(v, float)}
    for name, values in report["per_class"].items():
        for c, value in enumerate(values):
            scalars[f"{prefix}/{name}_class_{c}"] = float(value)
    return scalars
