"""GLUE metrics and ECE against hand-computed values."""

import math

import numpy as np
import pytest

from sift_cli.metrics import calibration_bins, expected_calibration_error, glue_metrics


def test_classification_metrics_by_hand():
    # predictions 1,0,1,1 ; labels 1,0,0,1 -> TP=2 FP=1 TN=1 FN=0
    logits = np.array([[0.0, 2.0], [3.0, 0.0], [0.0, 1.0], [0.0, 4.0]])
    labels = np.array([1, 0, 0, 1])
    m = glue_metrics(logits, labels, ["accuracy", "f1", "matthews_correlation"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    mcc = (2 * 1 - 1 * 0) / math.sqrt((2 + 1) * (2 + 0) * (1 + 1) * (1 + 0))
    assert m["matthews_correlation"] == pytest.approx(mcc)
    assert "ece" in m


def test_regression_metrics_by_hand():
    preds = np.array([[1.0], [2.0], [3.0], [4.0]])
    labels = np.array([1.0, 3.0, 2.0, 5.0])
    m = glue_metrics(preds, labels, ["pearson", "spearmanr"])
    x, y = preds[:, 0] - 2.5, labels - 2.75
    assert m["pearson"] == pytest.approx((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))
    # ranks 1,2,3,4 vs 1,3,2,4: d^2 = 0+1+1+0 = 2 -> 1 - 6*2/(4*15) = 0.8
    assert m["spearmanr"] == pytest.approx(0.8)
    assert "ece" not in m


def test_metric_keys_take_the_split_suffix():
    m = glue_metrics(np.array([[1.0, 0.0, 0.0]]), np.array([0]), ["accuracy"], suffix="_mm")
    assert set(m) == {"accuracy_mm", "ece_mm", "predicted_class_share_mm"}


def test_the_predicted_class_share_is_the_most_predicted_class_s_share():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    assert glue_metrics(logits, np.array([0, 1, 2, 2]), ["accuracy"])["predicted_class_share"] == 0.5
    assert glue_metrics(logits[1:3], np.array([0, 1]), ["accuracy"])["predicted_class_share"] == 1.0


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.55 (wrong), 0.35-bin is impossible for 2 classes
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 1])
    # bin (0.8,0.9]: acc 1/2, conf 0.9 -> |0.5-0.9| * 2/4 = 0.2
    # bin (0.5,0.6]: items 0.6 (correct) and 0.55 (wrong): acc 0.5, conf 0.575 -> 0.075 * 2/4 = 0.0375
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2375)


def test_ece_of_a_perfectly_calibrated_model_is_zero():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)


def test_calibration_bins_by_hand():
    # three classes; confidences 0.5 (correct), 0.7 (wrong), 0.75 (correct), 1.0 (correct)
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.05, 0.2, 0.75], [1.0, 0.0, 0.0]])
    labels = np.array([0, 2, 2, 0])
    bins = calibration_bins(probs, labels, n_bins=10)
    assert bins["share"].tolist() == [0, 0, 0, 0, 0.25, 0, 0.25, 0.25, 0, 0.25]  # 0.5 | 0.7 | 0.75 | 1.0
    assert bins["accuracy"][[4, 6, 7, 9]].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert np.isnan(bins["accuracy"][0]) and np.isnan(bins["confidence"][0])
    # |1 - 0.5| + |0 - 0.7| + |1 - 0.75| + |1 - 1|, each weighted 1/4
    assert expected_calibration_error(probs, labels) == pytest.approx((0.5 + 0.7 + 0.25 + 0.0) / 4)


def test_glue_metrics_equal_what_evaluates_glue_metric_computes():
    """evaluate's `glue` metric: accuracy as the mean of matches, sklearn's f1_score and matthews_corrcoef,
    scipy's pearsonr and spearmanr; random predictions with ties."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(500, 2)), rng.integers(0, 2, 500)
    m = glue_metrics(logits, labels, ["accuracy", "f1", "matthews_correlation"])
    preds = logits.argmax(1)
    assert m["accuracy"] == pytest.approx((preds == labels).mean(), abs=1e-15)
    assert m["f1"] == pytest.approx(f1_score(labels, preds), abs=1e-15)
    assert m["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-15)
    scores, gold = rng.integers(0, 6, (500, 1)).astype(float), rng.integers(0, 6, 500).astype(float)  # ties
    m = glue_metrics(scores, gold, ["pearson", "spearmanr"])
    assert m["pearson"] == pytest.approx(pearsonr(scores[:, 0], gold)[0], abs=1e-12)
    assert m["spearmanr"] == pytest.approx(spearmanr(scores[:, 0], gold)[0], abs=1e-12)


def test_ece_equals_torchmetrics_procedure():
    """torchmetrics' multiclass calibration error (l1, 10 bins) re-derived: the top probability's bin by
    bucketize over 11 equal boundaries, then sum over bins of |accuracy - confidence| x the bin's share."""
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(1000, 3)) * 2, rng.integers(0, 3, 1000)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    confidence, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    bins = np.clip(np.searchsorted(np.linspace(0, 1, 11), confidence, side="right") - 1, 0, 9)
    expected = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
                   for b in range(10) if (bins == b).any())
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-15)
