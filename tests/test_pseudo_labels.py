"""The CLIP confidence filter and its statistics, on hand-computed examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.pseudo_labels import (
    class_imbalance_ratio,
    select_confident,
    selection_report,
    threshold_sweep,
)

NAMES = ["zero", "one", "two", "three"]
# tau = 0.95 keeps samples 0 (exactly 0.95), 1, 3 and 5.
CONFIDENCE = np.array([0.95, 0.96, 0.50, 0.99, 0.94, 0.95])
PREDICTION = np.array([0, 0, 1, 1, 2, 0])
LABELS = np.array([0, 1, 1, 1, 2, 2])


def test_select_confident_keeps_the_boundary():
    mask = select_confident(CONFIDENCE, PREDICTION, 0.95)
    assert mask.dtype == bool
    assert mask.tolist() == [True, True, False, True, False, True]


def test_select_confident_boundary_in_float32_and_torch():
    confidence = torch.tensor([0.95, 0.9499999], dtype=torch.float32)
    assert select_confident(confidence, torch.tensor([0, 1]), 0.95).tolist() == [True, False]
    below = np.nextafter(np.float32(1.0), np.float32(0.0))
    assert select_confident(np.array([1.0, below], np.float32), [0, 0], 1.0).tolist() == [True, False]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "high", None])
def test_tau_clip_outside_unit_interval_raises_user_error(bad):
    with pytest.raises(UserError) as info:
        select_confident(CONFIDENCE, PREDICTION, bad)
    message = str(info.value)
    assert repr(bad) in message and "(0, 1]" in message and "tau_clip" in message
    with pytest.raises(UserError, match="tau_clip"):
        selection_report(CONFIDENCE, PREDICTION, LABELS, 4, bad)


def test_selection_report_hand_computed():
    report = selection_report(CONFIDENCE, PREDICTION, LABELS, 4, 0.95, NAMES)
    assert report["total"] == 6
    assert report["kept"] == 4
    assert report["kept_fraction"] == pytest.approx(4 / 6)
    assert report["kept_counts"] == [3, 1, 0, 0]
    assert report["num_empty_classes"] == 2
    assert report["empty_classes"] == ["two", "three"]
    assert report["imbalance_ratio"] == pytest.approx(3.0)  # over the non-empty classes: 3 / 1

    assert report["has_labels"] is True and report["num_with_labels"] == 6
    # kept: 0 (right), 1 (wrong), 3 (right), 5 (wrong)
    assert report["precision"] == pytest.approx(0.5)
    # rejected: 2 (pred 1, label 1) and 4 (pred 2, label 2): both right
    assert report["rejected_accuracy"] == pytest.approx(1.0)
    assert report["accuracy_all"] == pytest.approx(4 / 6)

    rows = report["per_class"]
    assert [r["name"] for r in rows] == NAMES
    assert [r["kept"] for r in rows] == [3, 1, 0, 0]
    assert [r["kept_correct"] for r in rows] == [1, 1, 0, 0]
    assert [r["true_count"] for r in rows] == [1, 3, 2, 0]
    assert [r["precision"] for r in rows] == pytest.approx([1 / 3, 1.0, None, None])
    # recall = kept & correct / every sample of the true class (kept or not)
    assert [r["recall"] for r in rows] == pytest.approx([1.0, 1 / 3, 0.0, None])
    assert [r["rejected"] for r in rows] == [0, 1, 1, 0]
    assert [r["rejected_precision"] for r in rows] == pytest.approx([None, 1.0, 1.0, None])
    assert report["kept_mean_recall"] == pytest.approx((1.0 + 1 / 3 + 0.0) / 3)
    json.dumps(report, allow_nan=False)


def test_selection_report_without_labels_and_with_unknown_labels():
    unlabeled = selection_report(CONFIDENCE, PREDICTION, None, 4, 0.95)
    assert unlabeled["has_labels"] is False
    assert unlabeled["kept_counts"] == [3, 1, 0, 0]
    assert unlabeled["empty_classes"] == ["2", "3"]  # default names are the class ids
    assert unlabeled["precision"] is None
    assert all(r["precision"] is None and r["recall"] is None for r in unlabeled["per_class"])

    all_unknown = selection_report(CONFIDENCE, PREDICTION, np.full(6, -1), 4, 0.95)
    assert all_unknown["has_labels"] is False

    # sample 1 (kept, wrong) loses its label: precision over the labeled kept ones = 2/3
    partial = selection_report(CONFIDENCE, PREDICTION, [0, -1, 1, 1, 2, 2], 4, 0.95)
    assert partial["num_with_labels"] == 5
    assert partial["precision"] == pytest.approx(2 / 3)
    assert partial["per_class"][1]["recall"] == pytest.approx(1 / 2)


def test_shape_and_range_errors():
    with pytest.raises(ValueError, match="prediction"):
        select_confident(CONFIDENCE, PREDICTION[:5], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        selection_report(CONFIDENCE, PREDICTION, None, 2, 0.5)
    with pytest.raises(ValueError, match="class names"):
        selection_report(CONFIDENCE, PREDICTION, None, 4, 0.5, ["a", "b"])


def _random_teacher(seed: int, num_samples: int = 3000, num_classes: int = 12):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_samples)
    logits = rng.normal(size=(num_samples, num_classes)) * 2.0
    logits[np.arange(num_samples), labels] += rng.uniform(0, 5, num_samples)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.max(axis=1), probs.argmax(axis=1), labels


def test_threshold_sweep_monotone_in_threshold():
    confidence, prediction, labels = _random_teacher(seed=0)
    thresholds = (0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)
    sweep = threshold_sweep(confidence, prediction, labels, 12, thresholds)
    assert [entry["threshold"] for entry in sweep] == list(thresholds)
    kept = [entry["kept"] for entry in sweep]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]

    per_class_counts, per_class_recall = [], []
    for entry in sweep:
        assert entry["ranked_counts"] == sorted(entry["ranked_counts"], reverse=True)
        assert sorted(entry["ranked_classes"]) == list(range(12))
        counts, recall = np.zeros(12), np.zeros(12)
        counts[entry["ranked_classes"]] = entry["ranked_counts"]
        recall[entry["ranked_classes"]] = entry["ranked_recall"]
        per_class_counts.append(counts)
        per_class_recall.append(recall)
    # every class shrinks (never grows) as the threshold rises, and so does its recall
    assert (np.diff(per_class_counts, axis=0) <= 0).all()
    assert (np.diff(per_class_recall, axis=0) <= 1e-12).all()


def test_threshold_sweep_agrees_with_selection_report():
    confidence, prediction, labels = _random_teacher(seed=1, num_classes=5)
    names = list("abcde")
    (entry,) = threshold_sweep(confidence, prediction, labels, 5, (0.8,), class_names=names)
    report = selection_report(confidence, prediction, labels, 5, 0.8, names)
    assert entry["kept"] == report["kept"]
    assert entry["precision"] == pytest.approx(report["precision"])
    assert entry["imbalance_ratio"] == pytest.approx(report["imbalance_ratio"])
    for rank, c in enumerate(entry["ranked_classes"]):
        row = report["per_class"][c]
        assert entry["ranked_class_names"][rank] == names[c]
        assert entry["ranked_counts"][rank] == row["kept"]
        assert entry["ranked_precision"][rank] == row["precision"]
        assert entry["ranked_recall"][rank] == row["recall"]


def test_threshold_sweep_without_labels_and_bad_thresholds():
    (entry,) = threshold_sweep(CONFIDENCE, PREDICTION, None, 4, (0.95,))
    assert entry["ranked_classes"] == [0, 1, 2, 3] and entry["ranked_counts"] == [3, 1, 0, 0]
    assert entry["ranked_precision"] is None and entry["ranked_recall"] is None
    assert entry["num_empty_classes"] == 2
    with pytest.raises(UserError, match=r"threshold.*1\.5"):
        threshold_sweep(CONFIDENCE, PREDICTION, None, 4, (0.5, 1.5))
    with pytest.raises(UserError, match="empty"):
        threshold_sweep(CONFIDENCE, PREDICTION, None, 4, ())


def test_class_imbalance_ratio_is_the_shared_helper():
    from zeroshot_adapt.reports import metrics as evaluate

    assert class_imbalance_ratio is evaluate.class_imbalance_ratio
    assert class_imbalance_ratio([148, 16, 40], nonempty_only=True) == pytest.approx(148 / 16)


def test_fractional_class_ids_are_rejected():
    with pytest.raises(ValueError, match="integer class ids"):
        selection_report(CONFIDENCE, PREDICTION + 0.5, None, 4, 0.5)
    report = selection_report(CONFIDENCE, PREDICTION.astype(float), LABELS.astype(float), 4, 0.95)
    assert report["kept_counts"] == [3, 1, 0, 0]


def test_nothing_kept_gives_undefined_rates_not_errors():
    report = selection_report(CONFIDENCE, PREDICTION, LABELS, 4, 1.0)  # max confidence is 0.99
    assert report["kept"] == 0 and report["kept_counts"] == [0, 0, 0, 0]
    assert report["imbalance_ratio"] is None and report["num_empty_classes"] == 4
    assert report["precision"] is None and report["rejected_accuracy"] == pytest.approx(4 / 6)
    assert [r["recall"] for r in report["per_class"]] == [0.0, 0.0, 0.0, None]
    json.dumps(report, allow_nan=False)
