"""GLUE metrics under the key names of the `evaluate` glue metric, computed with scikit-learn and scipy.

`evaluate.load("glue", ...)` fetches its script from the hub at run time, so it is not used.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from sift_cli.errors import SiftError


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: share of predictions, accuracy and mean confidence (NaN when empty).

    A prediction with confidence c falls in bin i when i/n < c <= (i+1)/n (c = 0 joins the first bin).
    These are the points of a reliability diagram and the terms of the ECE.
    """
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(np.round(confidence * n_bins, 9)).astype(int) - 1, 0, n_bins - 1)
    share, accuracy, mean_confidence = np.zeros(n_bins), np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            share[b] = in_bin.mean()
            accuracy[b] = correct[in_bin].mean()
            mean_confidence[b] = confidence[in_bin].mean()
    return {"share": share, "accuracy": accuracy, "confidence": mean_confidence}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by bin size."""
    bins = calibration_bins(probs, labels, n_bins)
    filled = bins["share"] > 0
    return float(np.sum(bins["share"][filled] * np.abs(bins["accuracy"][filled] - bins["confidence"][filled])))


def _pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(pearsonr(preds, labels)[0])


def _spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(spearmanr(preds, labels)[0])


CLASSIFICATION_METRICS = {
    "accuracy": lambda preds, labels: float(accuracy_score(labels, preds)),
    "f1": lambda preds, labels: float(f1_score(labels, preds)),
    "matthews_correlation": lambda preds, labels: float(matthews_corrcoef(labels, preds)),
}
REGRESSION_METRICS = {"pearson": _pearson, "spearmanr": _spearman}


def check_metric_names(names, regression: bool) -> None:
    known = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    for name in names:
        if name not in known:
            raise SiftError(f"unknown metric '{name}' for a {'regression' if regression else 'classification'} "
                            f"task; choose from: {', '.join(known)}")


def predicted_class_share(preds: np.ndarray) -> float:
    """The share of the most predicted class: 1 for a model that predicts one class for everything."""
    return float(np.bincount(preds).max() / len(preds)) if len(preds) else float("nan")


def glue_metrics(logits: np.ndarray, labels: np.ndarray, names, suffix: str = "") -> dict[str, float]:
    """Metrics of one evaluation split; `suffix` tells MNLI's mismatched set apart (accuracy_mm). Classifiers
    also get their calibration error (`ece`) and the share of their most predicted class."""
    if logits.ndim == 2 and logits.shape[1] == 1:  # regression head
        preds = logits[:, 0]
        return {f"{name}{suffix}": REGRESSION_METRICS[name](preds, labels) for name in names}
    preds = logits.argmax(axis=-1)
    labels = labels.astype(int)
    out = {f"{name}{suffix}": CLASSIFICATION_METRICS[name](preds, labels) for name in names}
    out[f"ece{suffix}"] = expected_calibration_error(softmax(logits.astype(np.float64)), labels)
    out[f"predicted_class_share{suffix}"] = predicted_class_share(preds)
    return out
