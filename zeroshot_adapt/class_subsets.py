"""Evaluate a model on a dataset whose classes are a subset of the model's outputs (pure numpy).

The standard protocol for ImageNet-R and ImageNet-A (Hendrycks et al. 2021): a 1000-way ImageNet model
is scored on a 200-class subset by keeping only the logits of those 200 classes, then taking the argmax
among them. ImageNetV2 and ImageNet-Sketch use all 1000 classes (the identity map).

Which output column a dataset class lands in comes from data, never from a retyped table: the prompt
files' `folder_names` (WordNet ids for ImageNet, -R, -A and -Sketch) first, then identical class lists
(ImageNetV2 names its folders '0'..'999' but lists the same class names as ImageNet), then unique class
names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zeroshot_adapt.data.sources import normalize_name
from zeroshot_adapt.errors import UserError

MATCH_BY_IDS = "ids"  # folder names / WordNet ids
MATCH_IDENTICAL = "identical class lists"
MATCH_BY_NAMES = "class names"


@dataclass(frozen=True)
class ColumnMap:
    """columns[i]: the model output column of dataset class i. matched_by: which rule matched them."""

    columns: np.ndarray  # int64 [C_dataset], distinct, each in [0, C_model)
    num_model_classes: int
    matched_by: str

    @property
    def is_identity(self) -> bool:
        return len(self.columns) == self.num_model_classes and bool(
            (self.columns == np.arange(self.num_model_classes)).all()
        )


def _unique_positions(values: Sequence[str]) -> dict[str, int]:
    """value -> position for values that occur exactly once."""
    positions: dict[str, int] = {}
    repeated: set[str] = set()
    for position, value in enumerate(values):
        if value in positions:
            repeated.add(value)
        positions[value] = position
    return {value: position for value, position in positions.items() if value not in repeated}


def class_columns(
    dataset_classes: Sequence[str],
    model_classes: Sequence[str],
    *,
    dataset_ids: Sequence[str] | None = None,
    model_ids: Sequence[str] | None = None,
    dataset: str = "the dataset",
) -> ColumnMap:
    """Map each dataset class onto one model output column.

    dataset_ids / model_ids: per-class ids in class order (the prompt files' `folder_names`, e.g. WordNet
    ids); used when every dataset id occurs exactly once among the model's ids. Otherwise identical class
    lists give the identity; otherwise each dataset class name must match exactly one model class name
    (case-, space- and underscore-insensitive). Raises UserError naming the classes that match nothing.
    """
    if len(dataset_classes) == 0:
        raise UserError(f"{dataset} has no classes")
    if dataset_ids is not None and model_ids is not None:
        by_id = _unique_positions([str(i) for i in model_ids])
        found = [by_id.get(str(i)) for i in dataset_ids]
        if all(column is not None for column in found):
            return ColumnMap(np.asarray(found, np.int64), len(model_classes), MATCH_BY_IDS)
    if list(dataset_classes) == list(model_classes):
        return ColumnMap(np.arange(len(model_classes), dtype=np.int64), len(model_classes), MATCH_IDENTICAL)
    by_name = _unique_positions([normalize_name(name) for name in model_classes])
    found = [by_name.get(normalize_name(name)) for name in dataset_classes]
    missing = [name for name, column in zip(dataset_classes, found, strict=True) if column is None]
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise UserError(
            f"{len(missing)} classes of {dataset} match no output of the model ({len(model_classes)} classes) by id "
            f"or by a unique class name: {shown}; give the dataset a prompt file whose folder_names are the "
            "model's class ids (e.g. WordNet ids)"
        )
    columns = np.asarray(found, np.int64)
    if len(np.unique(columns)) != len(columns):
        raise UserError(f"several classes of {dataset} map onto the same model output; check its class names")
    return ColumnMap(columns, len(model_classes), MATCH_BY_NAMES)


def restrict_logits(logits: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """logits [N, C_model] -> [N, C_dataset]: column i is the model's logit for dataset class i (columns[i]).

    The argmax of the result is the prediction among the dataset's classes only (the -R / -A protocol)."""
    logits = np.asarray(logits)
    columns = np.asarray(columns, np.int64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C]; got shape {logits.shape}")
    if columns.size and (columns.min() < 0 or columns.max() >= logits.shape[1]):
        raise ValueError(f"columns run from {columns.min()} to {columns.max()}; logits have {logits.shape[1]}")
    return logits[:, columns]


def all_outputs_top1(logits: np.ndarray, labels: np.ndarray, columns: np.ndarray) -> float | None:
    """Top-1 accuracy when the model may predict any of its outputs (no masking): a sample is correct when
    its argmax over all C_model columns is its class's column. None without samples."""
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return None
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(columns, np.int64)[labels]).mean())
