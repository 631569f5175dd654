"""Which samples are human-labeled, and long-tailed subsets: pure, seeded functions over label arrays.

Every function returns positions (int64, sorted ascending) into the ``labels`` array it was given, so
``table.subset(indices)`` gives the split. With ``keys`` (the table's stable sample keys) the choice
inside each class depends only on the keys and the seed, not on where each sample sits in the list:
re-listing or re-ordering the source picks the same samples. Without ``keys`` it depends on the order of
``labels`` and the seed (same array and seed -> same indices).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zeroshot_adapt.errors import UserError

_FLOOR_GUARD = 1e-9
"""Relative slack before flooring a float count, so 5000 * 100**-1 = 49.999... still floors to 50."""


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise UserError(f"labels must be a 1-d array of class ids, got shape {array.shape}")
    array = array.astype(np.int64, copy=False)
    if len(array) and array.min() < 0:
        raise UserError(
            f"{int((array < 0).sum())} of {len(array)} labels are unknown (-1); a labeled or long-tailed "
            "subset needs ground truth for every sample"
        )
    return array


def _check_keys(keys: Sequence[str] | None, num_samples: int) -> None:
    if keys is not None and len(keys) != num_samples:
        raise UserError(f"got {len(keys)} keys for {num_samples} labels; they must match one to one")


def _within_class_order(
    members: np.ndarray, *, keys: Sequence[str] | None, rng: np.random.Generator, seed: int
) -> np.ndarray:
    """`members` (positions of one class) in a seeded random order.

    With keys: ranked by sha256(seed, key) (order-free); without: a permutation drawn from `rng`.
    """
    if keys is None:
        return members[rng.permutation(len(members))]
    ranks = [hashlib.sha256(f"{seed}\0{keys[i]}".encode()).digest() for i in members]
    return members[np.array(sorted(range(len(members)), key=ranks.__getitem__), dtype=np.int64)]


def _pick_per_class(
    labels: np.ndarray, counts: dict[int, int], *, keys: Sequence[str] | None, seed: int
) -> np.ndarray:
    """Take `counts[c]` samples of each class c (in class-id order, one shared seeded generator)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in sorted(counts):
        members = np.flatnonzero(labels == cls)
        if counts[cls] > len(members):
            raise UserError(f"class {cls} has {len(members)} samples; cannot take {counts[cls]} of them")
        chosen.append(_within_class_order(members, keys=keys, rng=rng, seed=seed)[: counts[cls]])
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_counts(class_sizes: dict[int, int], fraction: float) -> dict[int, int]:
    """How many samples of each class a `fraction` labeled split takes.

    Largest-remainder rounding: the total is ``floor(fraction * N + 0.5)`` (N = all samples); each class
    first gets ``floor(fraction * n_c)``, then the leftover units go one each to the classes with the
    largest fractional parts (ties: lower class id first). Finally every class gets at least 1 (which
    can lift the total above the rounded target when many classes are tiny) and at most ``n_c``.
    Example: sizes {0: 10, 1: 7, 2: 3}, fraction 0.25 -> quotas 2.5, 1.75, 0.75; floors 2, 1, 0;
    total round(5.0) = 5, so the 2 leftovers go to classes 1 and 2 -> {0: 2, 1: 2, 2: 1}.
    """
    total = sum(class_sizes.values())
    target = math.floor(fraction * total + 0.5)
    quotas = {c: fraction * n for c, n in class_sizes.items()}
    counts = {c: math.floor(q + _FLOOR_GUARD * max(q, 1.0)) for c, q in quotas.items()}
    leftover = target - sum(counts.values())
    by_remainder = sorted(class_sizes, key=lambda c: (-(quotas[c] - counts[c]), c))
    for cls in by_remainder[: max(leftover, 0)]:
        counts[cls] += 1
    return {c: min(max(counts[c], 1), class_sizes[c]) for c in class_sizes}


def ceil_counts(class_sizes: dict[int, int], fraction: float) -> dict[int, int]:
    """Per-class ``ceil(fraction * n_c)`` (at most ``n_c``): how CReST (Wei et al. 2021) labels a fraction of a
    long-tailed training set, class by class. Example: CIFAR-10-LT at gamma 100 (5000 down to 50 per class)
    gives 1244 labels at 10% and 3726 at 30%."""
    counts = {}
    for cls, size in class_sizes.items():
        quota = fraction * size
        counts[cls] = min(size, math.ceil(quota - _FLOOR_GUARD * max(quota, 1.0)))  # 0.1 * 5000 must stay 500
    return counts


ROUNDINGS = ("largest_remainder", "ceil")


def _read_key_file(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"labeled-keys file {str(path)!r} is a directory, not a text file of sample keys")
    if not path.is_file():
        raise UserError(f"labeled-keys file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"labeled-keys file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def labeled_subset(
    labels: Sequence[int] | np.ndarray,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    keys_file: str | Path | None = None,
    keys: Sequence[str] | None = None,
    seed: int = 0,
    rounding: str = "largest_remainder",
) -> np.ndarray:
    """Positions (int64 [K], sorted) of the human-labeled subset of a training split.

    Give exactly one of:
      fraction:  e.g. 0.01 / 0.002 for ImageNet 1% / 0.2%; stratified per class. `rounding`:
                 "largest_remainder" (default; total = round(fraction * N), at least one sample per class,
                 see `stratified_counts`) or "ceil" (per-class ceil, the CReST long-tail protocol, see
                 `ceil_counts`).
      per_class: e.g. 4 for CIFAR-10 with 40 labels; every class present in `labels` gets exactly that
                 many (a class with fewer samples is a UserError).
      keys_file: a text file with one sample key per line (blank lines and `#` comments skipped); needs
                 `keys`. An unknown key is a UserError naming it.
    `labels`: int [N] ground truth (no -1; not needed for `keys_file`). `keys`: the table's [N] sample keys;
    with `fraction` / `per_class` they make the choice independent of the sample order (module docstring).
    """
    given = [name for name, value in (("fraction", fraction), ("per_class", per_class),
                                      ("keys_file", keys_file)) if value is not None]
    if len(given) != 1:
        raise UserError(
            "give exactly one of fraction, per_class or keys_file for the labeled subset; got "
            + (", ".join(given) if given else "none")
        )
    if keys_file is not None:
        if keys is None:
            raise UserError("keys_file needs the table's sample keys (keys=...) to look them up")
        _check_keys(keys, len(np.asarray(labels)))
        position = {key: i for i, key in enumerate(keys)}
        wanted = _read_key_file(keys_file)
        unknown = [key for key in wanted if key not in position]
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            example = f" (keys of this split look like {keys[0]!r})" if len(keys) else ""
            raise UserError(f"{len(unknown)} key(s) in {str(keys_file)!r} are not in this split: {shown}{example}")
        return np.unique(np.array([position[key] for key in wanted], dtype=np.int64))

    array = _as_labels(labels)
    _check_keys(keys, len(array))
    classes, sizes = np.unique(array, return_counts=True)
    class_sizes = {int(c): int(n) for c, n in zip(classes, sizes, strict=True)}
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"fraction={fraction!r} must be in (0, 1]")
        if rounding not in ROUNDINGS:
            raise UserError(f"rounding={rounding!r} must be one of {', '.join(ROUNDINGS)}")
        counts = ceil_counts(class_sizes, fraction) if rounding == "ceil" else stratified_counts(class_sizes, fraction)
    else:
        if int(per_class) != per_class or per_class < 1:
            raise UserError(f"per_class={per_class!r} must be a positive integer")
        counts = dict.fromkeys(class_sizes, int(per_class))
    return _pick_per_class(array, counts, keys=keys, seed=seed)


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class sizes of a CIFAR-LT style split (Cui et al. 2019; CReST's CIFAR-10-LT).

    ``n_c = floor(n_max * gamma ** (-c / (C - 1)))`` for c = 0..C-1: class 0 keeps `n_max`, the last
    class ``floor(n_max / gamma)``. gamma = `imbalance_ratio` >= 1 (1: balanced).
    Example: n_max 5000, C 10, gamma 100 -> 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.
    """
    if not imbalance_ratio >= 1.0:
        raise UserError(f"imbalance_ratio={imbalance_ratio!r} must be >= 1 (n_max / n_min)")
    if num_classes < 1:
        raise UserError(f"num_classes={num_classes!r} must be >= 1")
    if n_max < 1:
        raise UserError(f"n_max={n_max!r} must be >= 1")
    if num_classes == 1:
        return [int(n_max)]
    counts = []
    for cls in range(num_classes):
        exact = n_max * imbalance_ratio ** (-cls / (num_classes - 1))
        counts.append(math.floor(exact * (1.0 + _FLOOR_GUARD)))
    return counts


def long_tailed_subset(
    labels: Sequence[int] | np.ndarray,
    imbalance_ratio: float,
    *,
    n_max: int | None = None,
    num_classes: int | None = None,
    keys: Sequence[str] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Positions (int64, sorted) of a long-tailed subset: class c keeps ``long_tailed_counts(...)[c]``.

    Class ids order the head to the tail (class 0 most frequent). `n_max` defaults to the smallest class
    size, so every class can fill its count (5000 on CIFAR-10's train split). `num_classes` defaults to
    ``max(labels) + 1``. Which samples of a class are kept: seeded, see the module docstring.
    """
    array = _as_labels(labels)
    _check_keys(keys, len(array))
    num_classes = int(array.max()) + 1 if num_classes is None else num_classes
    sizes = np.bincount(array, minlength=num_classes)
    if len(sizes) > num_classes:
        raise UserError(f"labels go up to {len(sizes) - 1} but num_classes={num_classes}")
    if n_max is None:
        n_max = int(sizes.min())
        if n_max == 0:
            empty = int(np.flatnonzero(sizes == 0)[0])
            raise UserError(f"class {empty} has no samples; give n_max or drop the class")
    targets = long_tailed_counts(n_max, num_classes, imbalance_ratio)
    return _pick_per_class(array, dict(enumerate(targets)), keys=keys, seed=seed)
