"""Metrics on hand-made predictions, and the JSON writer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from zeroshot_adapt.reports.metrics import (
    class_imbalance_ratio,
    classification_report,
    confusion_matrix,
    mean_per_class_recall,
    top_k_accuracy,
    write_json,
)

NAMES = ["a", "b", "c"]
# 6 samples, 3 classes; class "c" is never predicted.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDICTIONS = np.array([0, 1, 1, 1, 0, 0])


def _strict_loads(text: str):
    def reject(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_confusion_matrix_rows_are_true_labels():
    expected = [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    assert confusion_matrix(PREDICTIONS, LABELS, 3).tolist() == expected


def test_classification_report_hand_computed():
    scores = np.eye(3)[PREDICTIONS]  # C = 3 < 5: no top-5
    report = classification_report(scores, PREDICTIONS, LABELS, NAMES)

    assert report["num_samples"] == 6 and report["num_classes"] == 3
    assert report["top1"] == pytest.approx(3 / 6)
    assert report["top5"] is None
    # recall: a 1/2, b 2/2, c 0/2
    assert report["mean_per_class_recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    per_class = {row["name"]: row for row in report["per_class"]}
    assert per_class["a"]["precision"] == pytest.approx(1 / 3)  # predicted a: samples 0, 4, 5
    assert per_class["b"]["precision"] == pytest.approx(2 / 3)  # predicted b: samples 1, 2, 3
    assert per_class["c"]["precision"] is None  # never predicted: undefined, not 0
    assert [per_class[n]["recall"] for n in NAMES] == pytest.approx([0.5, 1.0, 0.0])
    assert [per_class[n]["support"] for n in NAMES] == [2, 2, 2]
    assert [per_class[n]["correct"] for n in NAMES] == [1, 2, 0]
    assert report["prediction_counts"] == [3, 3, 0]
    assert report["confusion"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    # one class never predicted: the all-class ratio is infinite -> null, with the count beside it
    assert report["imbalance_ratio"] is None
    assert report["imbalance_ratio_nonempty_classes"] == pytest.approx(1.0)
    assert report["num_classes_never_predicted"] == 1
    assert report["classes_never_predicted"] == ["c"]
    # plain JSON already (no numpy scalars, no NaN)
    assert _strict_loads(json.dumps(report, allow_nan=False)) == report


def test_classification_report_imbalance_and_top5_with_torch_inputs():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    predictions = torch.tensor([0, 0, 0, 0, 1, 2])  # counts 4, 1, 1, 0, 0, 0
    scores = torch.zeros(6, 6)
    scores[:, 5] = -1.0  # class 5 is always ranked last: only sample 5 misses the top 5
    scores[torch.arange(6), predictions] = 5.0
    report = classification_report(scores, predictions, labels, [str(i) for i in range(6)])
    assert report["top1"] == pytest.approx(1 / 6)
    assert report["top5"] == pytest.approx(5 / 6)
    assert report["prediction_counts"] == [4, 1, 1, 0, 0, 0]
    assert report["imbalance_ratio_nonempty_classes"] == pytest.approx(4.0)
    assert report["num_classes_never_predicted"] == 3

    balanced = classification_report(None, [0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 2], NAMES)
    assert balanced["imbalance_ratio"] == pytest.approx(3.0)
    assert balanced["top5"] is None and balanced["top1"] == 1.0


def test_top_k_accuracy_hand_computed_and_ties():
    scores = np.array(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: rank 1
            [0.1, 0.2, 0.3, 0.4],  # label 1: rank 3
            [0.5, 0.5, 0.0, 0.0],  # label 1: tied for first -> counts as top-1
        ]
    )
    labels = np.array([0, 1, 1])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must be in"):
        top_k_accuracy(scores, labels, 5)


def test_mean_per_class_recall_skips_classes_without_samples():
    # class 2 has no sample: mean over classes 0 (1/2) and 1 (1/1)
    assert mean_per_class_recall([0, 1, 1], [0, 0, 1], 3) == pytest.approx(0.75)


def test_class_imbalance_ratio():
    assert class_imbalance_ratio([8, 2, 4]) == pytest.approx(4.0)
    assert class_imbalance_ratio([8, 0, 4]) == math.inf
    assert class_imbalance_ratio([8, 0, 4], nonempty_only=True) == pytest.approx(2.0)
    assert math.isnan(class_imbalance_ratio([0, 0]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        classification_report(None, [0, 3], [0, 1], NAMES)
    with pytest.raises(ValueError, match="same length"):
        classification_report(None, [0, 1, 2], [0, 1], NAMES)
    with pytest.raises(ValueError, match="columns"):
        classification_report(np.zeros((2, 4)), [0, 1], [0, 1], NAMES)


def test_write_json_round_trips_numpy_and_nulls_non_finite(tmp_path):
    path = tmp_path / "deep" / "report.json"
    obj = {
        "int": np.int64(3),
        "float": np.float32(0.5),
        "nan": np.nan,
        "list": [np.inf, -np.inf, 1.5, float("nan")],
        "array": np.arange(3, dtype=np.int32),
        "float_array": np.array([0.25, np.nan]),
        "tuple": (1, np.int16(2)),
        "bool": np.bool_(True),
        "tensor": torch.tensor([1.0, float("inf")]),
        np.int64(7): "numpy key",
    }
    assert write_json(obj, path) == path
    loaded = _strict_loads(path.read_text())
    assert loaded == {
        "int": 3,
        "float": 0.5,
        "nan": None,
        "list": [None, None, 1.5, None],
        "array": [0, 1, 2],
        "float_array": [0.25, None],
        "tuple": [1, 2],
        "bool": True,
        "tensor": [1.0, None],
        "7": "numpy key",
    }
    assert isinstance(loaded["int"], int)
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left behind


def test_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    write_json({"version": 1}, path)
    with pytest.raises(TypeError, match="object"):
        write_json({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_classification_report_without_labels_keeps_prediction_counts():
    report = classification_report(np.eye(3)[PREDICTIONS], PREDICTIONS, None, NAMES)
    assert report["has_labels"] is False
    assert report["prediction_counts"] == [3, 3, 0]
    assert report["classes_never_predicted"] == ["c"] and report["imbalance_ratio"] is None
    assert report["top1"] is None and report["mean_per_class_recall"] is None and report["confusion"] is None
    assert all(row["precision"] is None and row["support"] is None for row in report["per_class"])
    assert [row["predicted"] for row in report["per_class"]] == [3, 3, 0]
