"""Label-free diagnostics: what can be said about a classifier on images nobody labeled.

Pure functions on prediction arrays (numpy, no model, no I/O), so each is tested on hand-made arrays.

- ``agreement(a, b)``: the share of samples where two classifiers predict the same class. Here: the
  student (or its EMA teacher) against CLIP's zero-shot prediction on the same images. High agreement
  says the student learned what CLIP said, not that either is right.
- ``prediction_distribution``: how the predictions spread over the classes: imbalance ratio
  (``max / min`` count, None when a class is never predicted), the classes never predicted, and the
  normalised entropy ``H(p) / log C`` of the predicted-class shares (1 = uniform, 0 = one class).
- ``average_confidence``: the accuracy estimate reported here, **Average Confidence (AC)**: the mean
  over samples of the maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting
  Misclassified and Out-of-Distribution Examples in Neural Networks", ICLR 2017; used as the AC baseline
  of accuracy estimation in Garg et al., "Leveraging Unlabeled Data to Predict Out-of-Distribution
  Performance", ICLR 2022, Sec. 2). It equals the expected accuracy exactly when the model is calibrated
  (P(correct | confidence = c) = c). Assumption and its limit: self-training on pseudo-labels
  (FixMatch / DebiasPL) pushes the student towards confident predictions, so AC usually OVERestimates
  its accuracy, the more so on images unlike the training data. Treat it as an upper-leaning guess;
  where labels exist the report puts it next to the true top-1 so the gap can be seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from zeroshot_adapt.reports.metrics import class_imbalance_ratio

ESTIMATE_NAME = "average_confidence"
ESTIMATE_CITATION = "Average Confidence (Hendrycks & Gimpel, ICLR 2017); assumes a calibrated model"


def _class_ids(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N]; got shape {tuple(array.shape)}")
    return array.astype(np.int64)


def agreement(predictions: Any, reference: Any) -> float | None:
    """Share of samples where ``predictions`` [N] equals ``reference`` [N] (None when N = 0)."""
    a, b = _class_ids(predictions, "predictions"), _class_ids(reference, "reference")
    if len(a) != len(b):
        raise ValueError(f"predictions ({len(a)}) and reference ({len(b)}) differ in length")
    return None if len(a) == 0 else float((a == b).mean())


def normalized_entropy(counts: Any) -> float | None:
    """``H(counts / sum) / log C`` in [0, 1] for C >= 2 classes (None when there is nothing to count or C < 2)."""
    values = np.asarray(counts, dtype=np.float64)
    total = values.sum()
    if values.size < 2 or total <= 0:
        return None
    shares = values[values > 0] / total
    return max(0.0, float(-(shares * np.log(shares)).sum() / math.log(values.size)))  # no -0.0


def prediction_distribution(predictions: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """counts [C], imbalance ratio (max/min; None when some class is never predicted), the classes never
    predicted (names) and the normalised entropy of the predicted-class shares."""
    ids = _class_ids(predictions, "predictions")
    num_classes = len(class_names)
    if len(ids) and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"predictions must be class ids in [0, {num_classes})")
    counts = np.bincount(ids, minlength=num_classes)
    empty = [str(class_names[c]) for c in np.flatnonzero(counts == 0)]
    return {
        "prediction_counts": counts.tolist(),
        "imbalance_ratio": None if empty else class_imbalance_ratio(counts),  # null when a class is empty
        "num_empty_classes": len(empty),
        "empty_classes": empty,
        "normalized_entropy": normalized_entropy(counts),
    }


def average_confidence(confidence: Any) -> float | None:
    """AC (Hendrycks & Gimpel 2017): mean max-softmax probability [N] -> the estimated accuracy (None if N = 0)."""
    values = np.asarray(confidence, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"confidence must be 1-D [N]; got shape {tuple(values.shape)}")
    if len(values) and (values.min() < 0 or values.max() > 1):
        raise ValueError("confidence must be probabilities in [0, 1]")
    return None if len(values) == 0 else float(values.mean())


def label_free_diagnostics(
    predictions: Any,
    confidence: Any,
    class_names: Sequence[str],
    *,
    reference: Any | None = None,
    true_accuracy: float | None = None,
) -> dict[str, Any]:
    """Everything above for one classifier on one set.

    predictions [N] class ids, confidence [N] max softmax probability, reference [N]: CLIP's predictions
    on the same samples (None: no agreement). true_accuracy: the top-1 where labels exist, reported next
    to the estimate with their gap (estimate - truth), so a reader sees how far to trust the estimate.
    """
    estimate = average_confidence(confidence)
    out: dict[str, Any] = {
        "num_samples": int(len(np.asarray(predictions))),
        "agreement_with_clip": None if reference is None else agreement(predictions, reference),
        **prediction_distribution(predictions, class_names),
        "mean_confidence": estimate,
        "estimated_accuracy": {"method": ESTIMATE_NAME, "value": estimate, "citation": ESTIMATE_CITATION},
    }
    if true_accuracy is not None:
        out["estimated_accuracy"]["true_top1"] = true_accuracy
        out["estimated_accuracy"]["gap"] = None if estimate is None else estimate - true_accuracy
    return out
