"""The one in-memory description of a dataset split that every stage shares."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

UNKNOWN_LABEL = -1


@dataclass(frozen=True)
class SampleTable:
    """One split of one dataset.

    keys:        stable, unique per-sample keys (survive re-listing and re-ordering of the source);
                 the prediction cache and pseudo-label files are keyed by them.
    labels:      int64 [N] ground truth, ``UNKNOWN_LABEL`` (-1) where there is none.
    class_names: the dataset's class names in label order (for reports; prompts come from prompts/).
    load_image:  index -> RGB PIL image (decoding happens here, in DataLoader workers).
    fingerprint: hex digest over the ``key<TAB>content id`` lines: changes whenever a sample is added,
                 removed, or its content id changes (see ``data.sources`` for what a content id holds).
    content_ids: per-sample content id, parallel to ``keys`` ("" where the key is the content itself, e.g.
                 ``sha256:`` keys); the prediction cache reuses a sample's prediction only while its
                 (key, content id) pair is unchanged. Empty: every content id is "".
    """

    dataset: str
    split: str
    keys: Sequence[str]
    labels: np.ndarray
    class_names: Sequence[str]
    load_image: Callable[[int], Image.Image] = field(repr=False, compare=False)
    fingerprint: str = ""
    content_ids: Sequence[str] = ()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((np.asarray(self.labels) >= 0).all())

    def content_id(self, index: int) -> str:
        """The content id of sample `index` ("" when the table carries none)."""
        return self.content_ids[index] if self.content_ids else ""

    def all_content_ids(self) -> list[str]:
        """Content ids of every sample, in key order ("" for each when the table carries none)."""
        return list(self.content_ids) if self.content_ids else [""] * len(self.keys)

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> SampleTable:
        """A table over `indices` of this one (same loader); fingerprint recomputed from the kept keys and
        their content ids."""
        idx = np.asarray(indices, dtype=np.int64)
        keys = [self.keys[i] for i in idx]
        content_ids = [self.content_id(int(i)) for i in idx] if self.content_ids else []
        lines = [f"{key}\t{content}" for key, content in zip(keys, content_ids or [""] * len(keys), strict=True)]
        return SampleTable(
            dataset=self.dataset,
            split=split or self.split,
            keys=keys,
            labels=np.asarray(self.labels)[idx],
            class_names=self.class_names,
            load_image=IndexedLoader(self.load_image, idx),
            fingerprint=fingerprint_of([self.fingerprint, *lines]),
            content_ids=content_ids,
        )


class IndexedLoader:
    """Picklable `index -> parent(positions[index])`."""

    def __init__(self, parent: Callable[[int], Image.Image], positions: np.ndarray) -> None:
        self.parent = parent
        self.positions = positions

    def __call__(self, index: int) -> Image.Image:
        return self.parent(int(self.positions[index]))


def fingerprint_of(parts: Sequence[str]) -> str:
    """sha256 over a sequence of strings (order-sensitive; sort first if order must not matter)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
