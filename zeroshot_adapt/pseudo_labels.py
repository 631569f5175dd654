"""The CLIP confidence filter of transductive zero-shot DebiasPL, and statistics of what it keeps.

REFERENCE.md section 2, steps 3-4 (DebiasPL, Wang et al. CVPR 2022, Sec. 4.3 and Table 9): images whose
cached CLIP confidence (max softmax probability) is >= ``tau_clip`` form the "labeled" set, with CLIP's
argmax as their label; every image stays in the unlabeled set. A higher ``tau_clip`` gives higher
precision but a *more* class-imbalanced selection (paper Fig. 11), so reports give per-class counts,
precision and recall.

Definitions (per class ``c``, over samples whose true label is known):

- ``kept[c]``: kept samples (confidence >= tau_clip) that CLIP predicts as ``c`` (the labeled set's class
  histogram).
- ``precision[c]`` = kept samples predicted ``c`` whose true label is ``c`` / kept samples predicted ``c``.
  ``None`` when nothing is kept for ``c``.
- ``recall[c]`` = kept samples predicted ``c`` whose true label is ``c`` / **all** samples whose true label
  is ``c`` (kept or not). It is the share of class ``c`` that reaches the labeled set with the right
  label, so a high threshold lowers it. ``None`` when no sample has true label ``c``.
- Imbalance ratio: ``max / min`` of ``kept`` over the classes with at least one kept sample; the empty
  classes are counted and named separately (their ratio would be infinite). Note that
  :func:`zeroshot_adapt.reports.metrics.classification_report`'s ``imbalance_ratio`` runs over *all* classes
  (None when one is never predicted), as a test-set metric should.

Class-balanced selection (GRIP, Menghini, Delworth, Bach, "Enhancing CLIP with CLIP: exploring
pseudolabeling for limited-label prompt tuning", NeurIPS 2023): instead of one global threshold (CLIP is
miscalibrated, and 0.95 leaves classes empty), keep the K most confident samples of each *predicted*
class (:func:`select_top_k_per_class`); a class CLIP never predicts stays empty under any rule.
:func:`rule_summary` gives what each rule keeps and leaves empty, for side-by-side reports.

Labels are optional (a real unlabeled dataset has none): pass ``None``; negative entries (the data
layer's ``UNKNOWN_LABEL = -1``) mark samples without a label and are left out of the label statistics.
All functions are pure numpy and return JSON-serializable results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.reports.metrics import (
    as_class_ids,
    as_numpy,
    class_imbalance_ratio,
    finite_or_none,
    safe_ratio,
)

__all__ = [
    "DEFAULT_SWEEP_THRESHOLDS",
    "SELECTION_RULES",
    "class_imbalance_ratio",
    "rule_summary",
    "select_confident",
    "select_top_k_per_class",
    "selection_report",
    "threshold_sweep",
    "validate_tau_clip",
]

DEFAULT_SWEEP_THRESHOLDS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)  # the tau_clip values of the paper's Table 9
SELECTION_RULES = ("threshold", "topk")


def validate_tau_clip(tau_clip: Any, name: str = "tau_clip") -> float:
    """``tau_clip`` as a float, or UserError unless 0 < tau_clip <= 1 (NaN and non-numbers included)."""
    try:
        value = float(tau_clip)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(tau_clip, bool) or not 0.0 < value <= 1.0:  # NaN fails the comparison too
        raise UserError(
            f"{name} must be a CLIP confidence threshold in (0, 1] (e.g. 0.95, the default); got {tau_clip!r}"
        )
    return value


def _as_confidence(confidence: Any) -> np.ndarray:
    values = as_numpy(confidence)
    if values.ndim != 1:
        raise ValueError(f"confidence must be 1-D [N]; got shape {tuple(values.shape)}")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    return values


def _as_class_ids(array: Any, name: str, num_samples: int, num_classes: int, allow_unknown: bool) -> np.ndarray:
    values = as_class_ids(array, name, num_classes, allow_unknown=allow_unknown)
    if len(values) != num_samples:
        raise ValueError(f"{name} must have shape [{num_samples}] like confidence; got [{len(values)}]")
    return values


def _mask_at(confidence: np.ndarray, threshold: float) -> np.ndarray:
    # Compare in the confidence's own precision, so a float32 confidence that equals the float32 value of
    # the threshold is kept (0.95 has no exact float32 or float64 form; mixing the two would drop it).
    return confidence >= np.asarray(threshold, dtype=confidence.dtype)


def select_confident(confidence: Any, prediction: Any, tau_clip: float) -> np.ndarray:
    """[N] bool: ``confidence >= tau_clip`` (a confidence equal to the threshold is kept).

    confidence: [N] CLIP's max softmax probability per sample; prediction: [N] CLIP's argmax (checked for
    a matching length; the kept samples are labeled with it). NaN confidences are never kept.
    Raises UserError unless 0 < tau_clip <= 1.
    """
    tau_clip = validate_tau_clip(tau_clip)
    confidence = _as_confidence(confidence)
    prediction = as_numpy(prediction)
    if prediction.shape != confidence.shape:
        raise ValueError(
            f"prediction shape {tuple(prediction.shape)} does not match confidence shape {tuple(confidence.shape)}"
        )
    return _mask_at(confidence, tau_clip)


def select_top_k_per_class(
    confidence: Any,
    prediction: Any,
    num_classes: int,
    *,
    per_class: int | None = None,
    fraction: float | None = None,
) -> np.ndarray:
    """[N] bool: per predicted class c, its ``per_class`` most confident samples, or ``ceil(fraction * n_c)``
    of its n_c predicted samples (GRIP). Exactly one of per_class / fraction. A class with fewer
    predictions keeps them all; one never predicted keeps none. Ties: the earlier sample wins. NaN
    confidences are never kept.

    confidence: [N]; prediction: [N] class ids in [0, C). Raises UserError for a bad per_class / fraction.
    """
    if (per_class is None) == (fraction is None):
        raise UserError("class-balanced selection needs exactly one of per_class (K per class) and fraction")
    if per_class is not None and (isinstance(per_class, bool) or int(per_class) != per_class or per_class < 1):
        raise UserError(f"per_class={per_class!r} must be a whole number >= 1 (samples kept per predicted class)")
    if fraction is not None and not 0.0 < float(fraction) <= 1.0:
        raise UserError(f"per_class_fraction={fraction!r} must be in (0, 1] (share of each predicted class kept)")
    confidence = _as_confidence(confidence)
    prediction = _as_class_ids(prediction, "prediction", len(confidence), num_classes, allow_unknown=False)
    usable = ~np.isnan(confidence)
    # one stable sort: by class, then by confidence descending, then by position
    order = np.lexsort((np.arange(len(confidence)), -np.where(usable, confidence, -np.inf), prediction))
    order = order[usable[order]]
    classes = prediction[order]
    starts = np.searchsorted(classes, np.arange(num_classes), side="left")
    sizes = _bincount(classes, num_classes)
    if per_class is not None:
        quota = np.minimum(sizes, int(per_class))
    else:
        quota = np.ceil(float(fraction) * sizes).astype(np.int64)
    rank = np.arange(len(order)) - starts[classes]
    mask = np.zeros(len(confidence), dtype=bool)
    mask[order[rank < quota[classes]]] = True
    return mask


def rule_summary(
    selected: Any,
    prediction: Any,
    labels: Any | None,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What one selection rule keeps: ``kept``, ``kept_fraction``, ``kept_counts`` [C], ``imbalance_ratio``
    (over non-empty classes), ``num_empty_classes``, ``empty_classes`` (names) and, with labels,
    ``precision`` (None without). selected: [N] bool; prediction: [N]; labels: [N] (negative = unknown) or None."""
    selected = np.asarray(selected, dtype=bool)
    prediction = _as_class_ids(prediction, "prediction", len(selected), num_classes, allow_unknown=False)
    names = class_name_list(class_names, num_classes)
    counts = _bincount(prediction[selected], num_classes)
    precision = None
    if labels is not None:
        label_array = _as_class_ids(labels, "labels", len(selected), num_classes, allow_unknown=True)
        known = selected & (label_array >= 0)
        precision = safe_ratio(int((prediction[known] == label_array[known]).sum()), int(known.sum()))
    return {
        "kept": int(counts.sum()),
        "kept_fraction": safe_ratio(counts.sum(), len(selected)),
        "kept_counts": counts.tolist(),
        "imbalance_ratio": finite_or_none(class_imbalance_ratio(counts, nonempty_only=True)),
        "num_empty_classes": int((counts == 0).sum()),
        "empty_classes": [names[c] for c in np.flatnonzero(counts == 0)],
        "precision": precision,
    }


def _bincount(values: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(values, minlength=num_classes).astype(np.int64)


def _set_statistics(
    in_set: np.ndarray, prediction: np.ndarray, labels: np.ndarray | None, num_classes: int
) -> dict[str, Any]:
    """Per-class counts of ``prediction[in_set]`` and, with labels, correct counts and label totals."""
    stats: dict[str, Any] = {"counts": _bincount(prediction[in_set], num_classes)}
    if labels is not None:
        known = labels >= 0
        correct = known & (prediction == labels)
        stats["labeled"] = _bincount(prediction[in_set & known], num_classes)  # precision denominators
        stats["correct"] = _bincount(prediction[in_set & correct], num_classes)
    return stats


def _rates(numerators: np.ndarray, denominators: np.ndarray) -> list[float | None]:
    return [safe_ratio(n, d) for n, d in zip(numerators, denominators, strict=True)]


def _prepare(
    confidence: Any, prediction: Any, labels: Any | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    confidence = _as_confidence(confidence)
    prediction = _as_class_ids(prediction, "prediction", len(confidence), num_classes, allow_unknown=False)
    label_array = None
    if labels is not None:
        label_array = _as_class_ids(labels, "labels", len(confidence), num_classes, allow_unknown=True)
        if not (label_array >= 0).any():
            label_array = None  # no sample has a label: report as unlabeled
    return confidence, prediction, label_array


def class_name_list(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The names as strings, or '0'..'C-1' when None; raises ValueError on a count mismatch."""
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    return names


def selection_report(
    confidence: Any,
    prediction: Any,
    labels: Any | None,
    num_classes: int,
    tau_clip: float,
    class_names: Sequence[str] | None = None,
    *,
    selected: Any | None = None,
) -> dict[str, Any]:
    """What the ``tau_clip`` filter keeps: sizes, class balance and (with labels) its quality.

    confidence: [N] float; prediction: [N] CLIP argmax in [0, C); labels: [N] true ids (negative =
    unknown) or None; class_names: C names (default "0".."C-1"). selected: [N] bool, the kept set of
    another rule (e.g. :func:`select_top_k_per_class`) reported instead of ``confidence >= tau_clip``.

    Keys: ``tau_clip``, ``total`` (N), ``num_classes``, ``kept`` (samples with confidence >= tau_clip),
    ``kept_fraction``, ``kept_counts`` (length C, by CLIP label), ``imbalance_ratio`` (max/min of
    ``kept_counts`` over classes with >= 1 kept sample; None when nothing is kept), ``num_empty_classes``,
    ``empty_classes`` (names), ``has_labels``, ``num_with_labels``, ``accuracy_all`` (CLIP accuracy over
    every labeled sample), ``precision`` (accuracy of the kept set), ``rejected_accuracy`` (accuracy of
    the samples not kept), ``kept_mean_recall`` (mean of the defined per-class recalls), and
    ``per_class``: one dict per class with ``index``, ``name``, ``kept``, ``kept_correct``, ``true_count``,
    ``precision``, ``recall``, ``rejected``, ``rejected_precision``. Label-based values are None without
    labels (and wherever undefined).
    """
    tau_clip = validate_tau_clip(tau_clip)
    confidence, prediction, labels = _prepare(confidence, prediction, labels, num_classes)
    names = class_name_list(class_names, num_classes)
    if selected is None:
        kept_mask = _mask_at(confidence, tau_clip)
    else:
        kept_mask = np.asarray(selected, dtype=bool)
        if kept_mask.shape != confidence.shape:
            raise ValueError(f"selected must have shape [{len(confidence)}]; got {tuple(kept_mask.shape)}")
    kept = _set_statistics(kept_mask, prediction, labels, num_classes)
    rejected = _set_statistics(~kept_mask, prediction, labels, num_classes)
    counts = kept["counts"]
    empty = np.flatnonzero(counts == 0)
    total = len(confidence)

    none_list: list[Any] = [None] * num_classes
    if labels is not None:
        true_counts = _bincount(labels[labels >= 0], num_classes)
        precision = _rates(kept["correct"], kept["labeled"])
        recall = _rates(kept["correct"], true_counts)
        rejected_precision = _rates(rejected["correct"], rejected["labeled"])
        defined_recall = [r for r in recall if r is not None]
        quality: dict[str, Any] = {
            "num_with_labels": int(true_counts.sum()),
            "accuracy_all": safe_ratio(kept["correct"].sum() + rejected["correct"].sum(), true_counts.sum()),
            "precision": safe_ratio(kept["correct"].sum(), kept["labeled"].sum()),
            "rejected_accuracy": safe_ratio(rejected["correct"].sum(), rejected["labeled"].sum()),
            "kept_mean_recall": float(np.mean(defined_recall)) if defined_recall else None,
        }
        kept_correct: list[Any] = kept["correct"].tolist()
        true_count_list: list[Any] = true_counts.tolist()
    else:
        precision = recall = rejected_precision = kept_correct = true_count_list = none_list
        quality = {
            "num_with_labels": 0,
            "accuracy_all": None,
            "precision": None,
            "rejected_accuracy": None,
            "kept_mean_recall": None,
        }

    return {
        "tau_clip": tau_clip,
        "total": total,
        "num_classes": num_classes,
        "kept": int(counts.sum()),
        "kept_fraction": safe_ratio(counts.sum(), total),
        "kept_counts": counts.tolist(),
        "imbalance_ratio": finite_or_none(class_imbalance_ratio(counts, nonempty_only=True)),
        "num_empty_classes": len(empty),
        "empty_classes": [names[c] for c in empty],
        "has_labels": labels is not None,
        **quality,
        "per_class": [
            {
                "index": c,
                "name": names[c],
                "kept": int(counts[c]),
                "kept_correct": kept_correct[c],
                "true_count": true_count_list[c],
                "precision": precision[c],
                "recall": recall[c],
                "rejected": int(rejected["counts"][c]),
                "rejected_precision": rejected_precision[c],
            }
            for c in range(num_classes)
        ],
    }


def threshold_sweep(
    confidence: Any,
    prediction: Any,
    labels: Any | None,
    num_classes: int,
    thresholds: Sequence[float] = DEFAULT_SWEEP_THRESHOLDS,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per threshold, the kept set's per-class counts/precision/recall with classes ranked by count.

    The data behind DebiasPL Fig. 11. One dict per threshold, in the given order, with keys
    ``threshold``, ``kept``, ``kept_fraction``, ``precision`` (of the whole kept set), ``imbalance_ratio``
    (over non-empty classes), ``num_empty_classes``, ``ranked_classes`` (class ids by kept count,
    descending; ties by class id), ``ranked_counts``, ``ranked_precision`` and ``ranked_recall``
    (aligned with ``ranked_classes``; per-class definitions as in the module docstring; the whole field
    is None without labels) and, when ``class_names`` is given, ``ranked_class_names``.
    Raises UserError unless every threshold is in (0, 1].
    """
    if len(thresholds) == 0:
        raise UserError("thresholds is empty; give at least one value in (0, 1], e.g. 0.95")
    values = [validate_tau_clip(t, name="threshold") for t in thresholds]
    confidence, prediction, labels = _prepare(confidence, prediction, labels, num_classes)
    names = None if class_names is None else class_name_list(class_names, num_classes)
    true_counts = None if labels is None else _bincount(labels[labels >= 0], num_classes)

    sweep = []
    for threshold in values:
        stats = _set_statistics(_mask_at(confidence, threshold), prediction, labels, num_classes)
        counts = stats["counts"]
        order = np.argsort(-counts, kind="stable")
        entry: dict[str, Any] = {
            "threshold": threshold,
            "kept": int(counts.sum()),
            "kept_fraction": safe_ratio(counts.sum(), len(confidence)),
            "precision": None,
            "imbalance_ratio": finite_or_none(class_imbalance_ratio(counts, nonempty_only=True)),
            "num_empty_classes": int((counts == 0).sum()),
            "ranked_classes": order.tolist(),
            "ranked_counts": counts[order].tolist(),
            "ranked_precision": None,
            "ranked_recall": None,
        }
        if labels is not None and true_counts is not None:
            entry["precision"] = safe_ratio(stats["correct"].sum(), stats["labeled"].sum())
            entry["ranked_precision"] = _rates(stats["correct"][order], stats["labeled"][order])
            entry["ranked_recall"] = _rates(stats["correct"][order], true_counts[order])
        if names is not None:
            entry["ranked_class_names"] = [names[c] for c in order]
        sweep.append(entry)
    return sweep


HISTOGRAM_BINS = 10  # confidence bins of width 0.1 in the empty-labeled-set message
SUGGESTED_KEEP_FRACTION = 0.1  # the suggested tau_clip keeps at least this share of the images


def confidence_histogram(confidence: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """int64 [bins]: how many confidences fall in each of `bins` equal bins of [0, 1] (1.0 in the last)."""
    values = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    return np.histogram(values, bins=bins, range=(0.0, 1.0))[0].astype(np.int64)


def confidence_histogram_text(confidence: np.ndarray, bins: int = HISTOGRAM_BINS, width: int = 40) -> str:
    """The histogram as text lines, `  [0.90, 1.00]   12 ###`, for an error message."""
    counts = confidence_histogram(confidence, bins)
    top = max(1, int(counts.max()) if len(counts) else 1)
    lines = []
    for i, count in enumerate(counts):
        low, high = i / bins, (i + 1) / bins
        bracket = "]" if i == bins - 1 else ")"
        bar = "#" * int(round(width * count / top))
        lines.append(f"  [{low:.2f}, {high:.2f}{bracket} {int(count):6d} {bar}".rstrip())
    return "\n".join(lines)


def suggest_tau_clip(confidence: np.ndarray, keep_fraction: float = SUGGESTED_KEEP_FRACTION) -> float | None:
    """A tau_clip (rounded down to 0.01) that keeps at least ``ceil(keep_fraction * N)`` images (>= 1);
    None when there are no images or it would be 0 (tau_clip must be > 0)."""
    values = np.sort(np.asarray(confidence, dtype=np.float64))[::-1]
    if len(values) == 0:
        return None
    keep = max(1, int(np.ceil(keep_fraction * len(values))))
    tau = np.floor(values[keep - 1] * 100) / 100
    return float(tau) if tau > 0 else None
