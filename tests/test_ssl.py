"""Labeled-subset selection and long-tailed subsampling: hand-computed counts, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.ssl import labeled_subset, long_tailed_counts, long_tailed_subset, stratified_counts


def _balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def _per_class(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels[indices], minlength=num_classes).tolist()


def test_per_class_counts_are_exact_and_indices_valid():
    labels = _balanced_labels(10, 50)
    indices = labeled_subset(labels, per_class=4, seed=0)
    assert _per_class(labels, indices, 10) == [4] * 10
    assert len(np.unique(indices)) == 40 and indices.dtype == np.int64
    assert (np.diff(indices) > 0).all()


def test_per_class_more_than_a_class_has_is_a_user_error():
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(UserError, match="class 1 has 2 samples"):
        labeled_subset(labels, per_class=3)


def test_fraction_uses_largest_remainder_rounding():
    # quotas 2.5, 1.75, 0.75 -> floors 2, 1, 0; target round(0.25 * 20) = 5; leftovers to classes 1, 2.
    assert stratified_counts({0: 10, 1: 7, 2: 3}, 0.25) == {0: 2, 1: 2, 2: 1}
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    assert _per_class(labels, labeled_subset(labels, fraction=0.25), 3) == [2, 2, 1]


def test_fraction_gives_every_class_at_least_one():
    # 1% of {0: 1000, 1: 20, 2: 5}: quotas 10, 0.2, 0.05; target round(10.25) = 10 -> floors only,
    # then classes 1 and 2 are lifted to 1 each.
    labels = np.array([0] * 1000 + [1] * 20 + [2] * 5)
    assert _per_class(labels, labeled_subset(labels, fraction=0.01), 3) == [10, 1, 1]


def test_fraction_float_noise_does_not_lose_a_sample():
    # 0.29 * 100 = 28.999999999999996 in floating point; the class must still get 29.
    assert stratified_counts({0: 100}, 0.29) == {0: 29}


def test_same_seed_same_subset_and_different_seeds_differ():
    labels = _balanced_labels(10, 100)
    first = labeled_subset(labels, per_class=4, seed=3)
    assert np.array_equal(first, labeled_subset(labels, per_class=4, seed=3))
    assert not np.array_equal(first, labeled_subset(labels, per_class=4, seed=4))
    fraction = labeled_subset(labels, fraction=0.1, seed=3)
    assert not np.array_equal(fraction, labeled_subset(labels, fraction=0.1, seed=4))


def test_with_keys_the_choice_survives_reordering():
    labels = _balanced_labels(5, 40)
    keys = [f"img_{i:04d}" for i in range(len(labels))]
    chosen = {keys[i] for i in labeled_subset(labels, per_class=3, keys=keys, seed=1)}
    order = np.random.default_rng(9).permutation(len(labels))
    shuffled_keys = [keys[i] for i in order]
    again = {shuffled_keys[i] for i in labeled_subset(labels[order], per_class=3, keys=shuffled_keys, seed=1)}
    assert chosen == again and len(chosen) == 15


def test_keys_file_selects_those_keys(tmp_path):
    keys = ["a", "b", "c", "d"]
    path = tmp_path / "labeled.txt"
    path.write_text("# human-labeled\nc\n\na\n")
    assert labeled_subset([0, 1, 0, 1], keys_file=path, keys=keys).tolist() == [0, 2]


def test_keys_file_with_unknown_key_names_it(tmp_path):
    path = tmp_path / "labeled.txt"
    path.write_text("a\nzebra_017\n")
    with pytest.raises(UserError, match="zebra_017"):
        labeled_subset([0, 1], keys_file=path, keys=["a", "b"])


@pytest.mark.parametrize(
    "options",
    [{}, {"fraction": 0.1, "per_class": 2}, {"per_class": 2, "keys_file": "x.txt"}],
)
def test_options_are_mutually_exclusive(options):
    with pytest.raises(UserError, match="exactly one of"):
        labeled_subset(_balanced_labels(2, 10), keys=[str(i) for i in range(20)], **options)


def test_invalid_fraction_and_unknown_labels_are_user_errors():
    with pytest.raises(UserError, match="fraction"):
        labeled_subset([0, 1], fraction=1.5)
    with pytest.raises(UserError, match="unknown"):
        labeled_subset([0, -1], per_class=1)


def test_long_tailed_counts_cifar10_lt_gamma_100():
    counts = long_tailed_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert counts[0] == 5000 and counts[-1] == 50
    assert all(a > b for a, b in zip(counts, counts[1:], strict=False))


def test_long_tailed_counts_edge_cases():
    assert long_tailed_counts(100, 4, 1) == [100] * 4
    assert long_tailed_counts(7, 1, 10) == [7]
    with pytest.raises(UserError, match="imbalance_ratio"):
        long_tailed_counts(100, 10, 0.5)


def test_long_tailed_subset_matches_formula_and_is_deterministic():
    labels = _balanced_labels(10, 120)
    indices = long_tailed_subset(labels, 10, n_max=100, seed=0)
    expected = long_tailed_counts(100, 10, 10)
    assert expected[0] == 100 and expected[-1] == 10
    assert _per_class(labels, indices, 10) == expected
    assert np.array_equal(indices, long_tailed_subset(labels, 10, n_max=100, seed=0))
    assert not np.array_equal(indices, long_tailed_subset(labels, 10, n_max=100, seed=1))


def test_long_tailed_subset_default_n_max_is_smallest_class():
    labels = np.array([0] * 30 + [1] * 20 + [2] * 25)
    indices = long_tailed_subset(labels, 4)
    assert _per_class(labels, indices, 3) == long_tailed_counts(20, 3, 4) == [20, 10, 5]


# --- CReST's long-tailed labeled splits: per-class ceil (issue 8) ----------------------------------------


def test_crest_cifar10_lt_labels_round_up_per_class():
    # CIFAR-10-LT at gamma 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 images per class
    sizes = dict(enumerate(long_tailed_counts(5000, 10, 100)))
    assert sum(sizes.values()) == 12406
    from zeroshot_adapt.ssl import ceil_counts

    ten, thirty = ceil_counts(sizes, 0.1), ceil_counts(sizes, 0.3)
    assert list(ten.values()) == [500, 300, 180, 108, 65, 39, 24, 14, 9, 5]
    assert sum(ten.values()) == 1244  # CReST's 10% split
    assert sum(thirty.values()) == 3726  # CReST's 30% split
    # largest-remainder rounding would give round(0.1 * 12406) = 1241: the two protocols differ
    assert sum(stratified_counts(sizes, 0.1).values()) == 1241
    labels = np.repeat(np.arange(10), list(sizes.values()))
    chosen = labeled_subset(labels, fraction=0.1, rounding="ceil", seed=1)
    assert _per_class(labels, chosen, 10) == list(ten.values())
    with pytest.raises(UserError, match="rounding='floor'"):
        labeled_subset(labels, fraction=0.1, rounding="floor")
