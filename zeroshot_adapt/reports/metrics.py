"""Classification metrics and JSON reports, computed from predictions (pure numpy).

Conventions used by every function here:

- ``confusion[i, j]`` counts samples whose **true** label is ``i`` and whose **predicted** label is ``j``
  (rows = truth, columns = prediction; the scikit-learn convention).
- Precision of class ``c`` = correct predictions of ``c`` / all predictions of ``c``. It is undefined
  (``None`` / JSON ``null``) when ``c`` is never predicted.
- Recall of class ``c`` = correct predictions of ``c`` / samples whose true label is ``c``. It is undefined
  (``None``) when no sample has true label ``c``.
- Mean per-class recall averages recall over the classes that have at least one sample (classes absent
  from the labels are left out rather than counted as 0 or 1).
- Class imbalance ratio of a count vector = ``max(counts) / min(counts)``: ``inf`` when some class has
  count 0, which reports show as ``null`` next to the number of empty classes (see
  :func:`class_imbalance_ratio`).

Inputs may be numpy arrays, lists or torch tensors (converted with ``.detach().cpu()``). Every report is
JSON-serializable; :func:`write_json` writes it atomically with NaN/inf turned into ``null``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zeroshot_adapt.fileio import atomic_write_text

TOP5 = 5
_CHUNK_ROWS = 8192  # rows of a score matrix compared at once in top_k_accuracy (bounds temporary memory)


# --------------------------------------------------------------------------------------------- inputs
def as_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array, list, or torch tensor (any device; bfloat16 is upcast to float32)."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # a torch tensor, without importing torch
        tensor = array.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # dtypes numpy lacks (bfloat16)
            return tensor.float().numpy()
    return np.asarray(array)


def as_class_ids(array: Any, name: str, num_classes: int | None = None, *, allow_unknown: bool = False) -> np.ndarray:
    """1-D int64 class ids, each in [0, num_classes) (or negative = unknown, with ``allow_unknown``).

    Float input is accepted only when it holds whole numbers. Raises ValueError naming ``name``.
    """
    values = as_numpy(array)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N]; got shape {tuple(values.shape)}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(values, np.round(values)):
            raise ValueError(f"{name} must hold integer class ids; got dtype {values.dtype}")
    values = values.astype(np.int64, copy=False)
    if num_classes is not None and values.size:
        low, high = int(values.min()), int(values.max())
        if high >= num_classes or (low < 0 and not allow_unknown):
            valid = f"[0, {num_classes})" + (" or negative for unknown" if allow_unknown else "")
            raise ValueError(f"{name} must lie in {valid}; got values from {low} to {high}")
    return values


def _as_scores(array: Any, num_samples: int | None = None) -> np.ndarray:
    scores = as_numpy(array)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, C]; got shape {tuple(scores.shape)}")
    if num_samples is not None and scores.shape[0] != num_samples:
        raise ValueError(f"scores have {scores.shape[0]} rows but there are {num_samples} labels")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length; got {lengths}")


def safe_ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is 0 (an undefined rate)."""
    return float(numerator) / float(denominator) if denominator else None


# -------------------------------------------------------------------------------------------- metrics
def confusion_matrix(predictions: Any, labels: Any, num_classes: int) -> np.ndarray:
    """[C, C] int64 counts; ``confusion[true, predicted]`` (rows = true label, columns = prediction)."""
    labels = as_class_ids(labels, "labels", num_classes)
    predictions = as_class_ids(predictions, "predictions", num_classes)
    _same_length(predictions=predictions, labels=labels)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def top_k_accuracy(scores: Any, labels: Any, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores ([N, C] logits or probs).

    A sample counts as correct when fewer than ``k`` classes score strictly higher than its true class,
    so ties are resolved in the true class's favour (deterministic, independent of sort order).
    Returns NaN for N = 0. Raises ValueError unless 1 <= k <= C.
    """
    scores = _as_scores(scores)
    labels = as_class_ids(labels, "labels", scores.shape[1])
    _same_length(scores=scores, labels=labels)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}] (the number of classes); got {k}")
    if len(labels) == 0:
        return math.nan
    correct = 0
    for start in range(0, len(labels), _CHUNK_ROWS):
        block = scores[start : start + _CHUNK_ROWS]
        rows = np.arange(len(block))
        true_scores = block[rows, labels[start : start + _CHUNK_ROWS]]
        num_higher = (block > true_scores[:, None]).sum(axis=1)
        correct += int((num_higher < k).sum())
    return correct / len(labels)


def per_class_precision_recall(
    confusion: np.ndarray,
) -> tuple[list[float | None], list[float | None]]:
    """Per-class precision (diag / column sum) and recall (diag / row sum); None where undefined."""
    confusion = np.asarray(confusion)
    correct = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = [safe_ratio(c, p) for c, p in zip(correct, predicted, strict=True)]
    recall = [safe_ratio(c, s) for c, s in zip(correct, support, strict=True)]
    return precision, recall


def mean_per_class_recall(predictions: Any, labels: Any, num_classes: int) -> float:
    """Recall averaged over the classes with at least one true sample (NaN when there are none)."""
    _, recall = per_class_precision_recall(confusion_matrix(predictions, labels, num_classes))
    defined = [r for r in recall if r is not None]
    return float(np.mean(defined)) if defined else math.nan


def class_imbalance_ratio(counts: Any, *, nonempty_only: bool = False) -> float:
    """``max(counts) / min(counts)`` over classes (DebiasPL's measure of pseudo-label imbalance).

    With ``nonempty_only=False`` the minimum runs over every class, so any empty class gives ``inf``.
    With ``nonempty_only=True`` it runs over classes with count >= 1 (a finite number that still says how
    skewed the populated classes are; report the empty ones separately). NaN when no class qualifies.
    """
    counts = as_numpy(counts).astype(np.float64).ravel()
    if nonempty_only:
        counts = counts[counts > 0]
    if counts.size == 0 or counts.max() <= 0:
        return math.nan
    smallest = counts.min()
    return math.inf if smallest == 0 else float(counts.max() / smallest)


def finite_or_none(value: float | None) -> float | None:
    """The value as a float, or None for None/NaN/inf (how reports spell an undefined number)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def classification_report(
    logits_or_probs: Any | None,
    predictions: Any,
    labels: Any | None,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, per-class statistics, confusion and imbalance of the predictions.

    logits_or_probs: [N, C] scores or None (then no top-5). Top-5 is also None when C < 5.
    predictions:     [N] predicted class ids (top-1 uses these, not the argmax of the scores, so a
                     debiased or otherwise post-processed prediction can be evaluated as given).
    labels:          [N] true class ids, all in [0, C); or None for an unlabeled split, which still
                     gets the prediction counts and imbalance (every label-based value is None).
    class_names:     C names in class-id order.

    Returns a JSON-serializable dict with keys ``num_samples``, ``num_classes``, ``has_labels``, ``top1``,
    ``top5``, ``mean_per_class_recall``, ``prediction_counts`` (length C), ``imbalance_ratio`` (max/min
    prediction count over all classes; None when some class is never predicted),
    ``imbalance_ratio_nonempty_classes`` (max/min over the classes predicted at least once),
    ``num_classes_never_predicted``, ``classes_never_predicted`` (names), ``per_class`` (one dict per
    class: ``index``, ``name``, ``support``, ``predicted``, ``correct``, ``precision``, ``recall``;
    precision None when the class is never predicted, recall None when it has no sample) and
    ``confusion`` (C x C list of lists, ``confusion[true][predicted]``; None without labels).
    Undefined numbers are None.
    """
    class_names = [str(name) for name in class_names]
    num_classes = len(class_names)
    if num_classes == 0:
        raise ValueError("class_names is empty")
    predictions = as_class_ids(predictions, "predictions", num_classes)
    num_samples = len(predictions)
    counts = np.bincount(predictions, minlength=num_classes).astype(np.int64)
    never_predicted = [class_names[c] for c in np.flatnonzero(counts == 0)]
    report: dict[str, Any] = {
        "num_samples": num_samples,
        "num_classes": num_classes,
        "has_labels": labels is not None,
        "top1": None,
        "top5": None,
        "mean_per_class_recall": None,
        "prediction_counts": counts.tolist(),
        "imbalance_ratio": finite_or_none(class_imbalance_ratio(counts)),
        "imbalance_ratio_nonempty_classes": finite_or_none(class_imbalance_ratio(counts, nonempty_only=True)),
        "num_classes_never_predicted": len(never_predicted),
        "classes_never_predicted": never_predicted,
        "per_class": [
            {
                "index": c,
                "name": class_names[c],
                "predicted": int(counts[c]),
                "support": None,
                "correct": None,
                "precision": None,
                "recall": None,
            }
            for c in range(num_classes)
        ],
        "confusion": None,
    }
    scores = None
    if logits_or_probs is not None:
        scores = _as_scores(logits_or_probs, num_samples)
        if scores.shape[1] != num_classes:
            raise ValueError(f"scores have {scores.shape[1]} columns but there are {num_classes} class names")
    if labels is None:
        return report

    labels = as_class_ids(labels, "labels", num_classes)
    _same_length(predictions=predictions, labels=labels)
    confusion = confusion_matrix(predictions, labels, num_classes)
    precision, recall = per_class_precision_recall(confusion)
    support = confusion.sum(axis=1)
    correct = np.diag(confusion)
    report["top1"] = finite_or_none(safe_ratio(correct.sum(), num_samples))
    if scores is not None and num_classes >= TOP5:
        report["top5"] = finite_or_none(top_k_accuracy(scores, labels, TOP5))
    defined = [r for r in recall if r is not None]  # classes with at least one sample
    report["mean_per_class_recall"] = float(np.mean(defined)) if defined else None
    for c, row in enumerate(report["per_class"]):
        row.update(support=int(support[c]), correct=int(correct[c]), precision=precision[c], recall=recall[c])
    report["confusion"] = confusion.tolist()
    return report


# ----------------------------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` made of plain JSON types.

    numpy scalars/arrays and torch tensors become Python numbers/lists, tuples become lists, paths
    become strings, dataclasses become dicts, and non-finite floats (NaN, inf) become None.
    Raises TypeError for anything else.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite_or_none(float(obj))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {_json_key(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, np.ndarray) or hasattr(obj, "detach"):
        array = as_numpy(obj)
        return to_jsonable(array.item() if array.ndim == 0 else array.tolist())
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON")


def _json_key(key: Any) -> str | int | float | bool | None:
    if isinstance(key, (np.integer, np.floating, np.bool_)):
        return key.item()
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    raise TypeError(f"cannot use a key of type {type(key).__name__} in JSON")


def write_json(obj: Any, path: str | os.PathLike[str], *, indent: int | None = 2) -> Path:
    """Write ``to_jsonable(obj)`` as strict JSON to ``path`` atomically (temp file + os.replace).

    Parent folders are created. A reader never sees a half-written file: it sees the old file or the
    new one. Returns the path.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")
