"""Class-balanced (GRIP) top-K-per-class selection beside the global tau_clip threshold."""

from __future__ import annotations

import numpy as np
import pytest

from zeroshot_adapt import pipeline
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.pseudo_labels import rule_summary, select_top_k_per_class, selection_report

CONFIDENCE = np.array([0.9, 0.5, 0.8, 0.8, 0.3, 0.99, 0.6, np.nan])
PREDICTION = np.array([0, 0, 0, 1, 1, 1, 2, 2])


def test_top_k_per_class_by_hand():
    mask = select_top_k_per_class(CONFIDENCE, PREDICTION, 4, per_class=2)
    # class 0: 0.9, 0.8 (not 0.5); class 1: 0.99, 0.8; class 2: 0.6 (NaN never kept); class 3: never predicted
    assert np.flatnonzero(mask).tolist() == [0, 2, 3, 5, 6]
    everything = select_top_k_per_class(CONFIDENCE, PREDICTION, 4, per_class=100)
    assert np.flatnonzero(everything).tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_top_fraction_per_class_rounds_up_and_ties_keep_the_earlier_sample():
    mask = select_top_k_per_class(CONFIDENCE, PREDICTION, 4, fraction=0.34)
    # ceil(0.34 * 3) = 2 for classes 0 and 1; ceil(0.34 * 2) = 1 for class 2 (its usable sample)
    assert np.flatnonzero(mask).tolist() == [0, 2, 3, 5, 6]
    tied = select_top_k_per_class([0.5, 0.5, 0.5], [0, 0, 0], 1, per_class=2)
    assert tied.tolist() == [True, True, False]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of per_class"),
    ({"per_class": 2, "fraction": 0.5}, "exactly one of per_class"),
    ({"per_class": 0}, "per_class=0 must be a whole number >= 1"),
    ({"fraction": 1.5}, "per_class_fraction=1.5 must be in \\(0, 1\\]"),
])
def test_bad_selection_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        select_top_k_per_class(CONFIDENCE, PREDICTION, 4, **kwargs)


def test_rule_summary_names_the_empty_classes():
    labels = np.array([0, 1, 0, 1, 1, 1, 2, -1])
    summary = rule_summary(CONFIDENCE >= 0.85, PREDICTION, labels, 4, ["a", "b", "c", "d"])
    assert summary["kept"] == 2 and summary["kept_counts"] == [1, 1, 0, 0]
    assert summary["empty_classes"] == ["c", "d"] and summary["num_empty_classes"] == 2
    assert summary["precision"] == 1.0 and summary["imbalance_ratio"] == 1.0
    report = selection_report(np.nan_to_num(CONFIDENCE), PREDICTION, labels, 4, 0.95,
                              selected=select_top_k_per_class(CONFIDENCE, PREDICTION, 4, per_class=1))
    assert report["kept_counts"] == [1, 1, 1, 0] and report["empty_classes"] == ["3"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["pseudo.select=topk"], "needs exactly one of pseudo.per_class \\(--per-class\\)"),
    (["pseudo.select=topk", "pseudo.per_class=3", "pseudo.per_class_fraction=0.5"], "got per_class, per_class_frac"),
    (["pseudo.per_class=3"], "pseudo.per_class \\(--per-class\\) only applies with pseudo.select=topk"),
    (["pseudo.select=best"], "pseudo.select \\(--select\\)='best' must be one of threshold, topk"),
    (["pseudo.per_class_fraction=0", "pseudo.select=topk"], "per_class_fraction \\(--per-class-fraction\\)=0.0 must"),
])
def test_selection_config_rules(overrides, message):
    with pytest.raises(UserError, match=message):
        pipeline.resolve_config("digits", overrides=overrides)


def test_select_labeled_indices_threshold_is_the_old_rule_and_topk_stays_within_candidates():
    config = pipeline.resolve_config("digits", overrides=["pseudo.tau_clip=0.75"])
    candidates = np.array([0, 2, 3, 5, 6])
    confidence = np.nan_to_num(CONFIDENCE)
    chosen = pipeline.select_labeled_indices(config, confidence, PREDICTION, candidates, 4)
    assert chosen.tolist() == [0, 2, 3, 5]  # >= 0.75 among the candidates
    topk = pipeline.resolve_config("digits", overrides=["pseudo.select=topk", "pseudo.per_class=1"])
    chosen = pipeline.select_labeled_indices(topk, confidence, PREDICTION, np.array([1, 4, 6, 7]), 4)
    assert chosen.tolist() == [1, 4, 6]  # the best candidate per class, candidates only, sorted
