"""torch Datasets over a SampleTable: plain (one transform) and the views a training step needs, plus the
DataLoader plumbing every loader of the package shares (workers that survive a stop signal, worker
errors shown as the original message).

Corrupt images never stop a run:
- ``TableDataset`` (teacher cache, evaluation) yields a placeholder with ``ok=False``; the caller drops
  and counts it (the evaluator scores only ``ok`` items).
- The training views (``LabeledViews``, ``UnlabeledViews``) replace a corrupt item by the next readable
  position (``position + 1, + 2, ...`` modulo the set size) and report how many they skipped
  (``corrupt_skipped``). The replacement depends only on the position and the files, never on time,
  worker or process, so a resumed run sees exactly the batches an uninterrupted one does. The training
  loop counts each corrupt sample once and logs it once (see ``train.CorruptTally``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from zeroshot_adapt.data.base import SampleTable
from zeroshot_adapt.data.sources import CorruptImageError
from zeroshot_adapt.errors import UserError

log = logging.getLogger(__name__)

_PLACEHOLDER_SIZE = (32, 32)
CORRUPT_SKIPPED = "corrupt_skipped"  # item key: corrupt positions skipped before the one returned
POSITION = "position"  # item key: the position (in the view's index list) actually returned

_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 (DataLoader's worker_init_fn signature)
    """DataLoader `worker_init_fn`: workers ignore SIGINT / SIGTERM.

    Slurm's scancel, systemd and Ctrl-C signal the whole process group. A worker killed by it makes the
    main process die with "DataLoader worker ... killed by signal" before it can write its checkpoint; a
    worker that ignores it lets the main process finish the step, checkpoint and shut the workers down.
    Workers still end with the main process: the DataLoader stops them when its iterator is dropped, and
    each worker's watchdog exits when its parent is gone (even after a SIGKILL of the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_user_error(error: BaseException) -> UserError | None:
    """The original UserError behind an exception a DataLoader re-raised from a worker, or None.

    torch rebuilds a worker's exception as ``type(error)(text)``, where ``text`` is the worker's whole
    traceback, so e.g. a ``CorruptImageError`` would show the traceback as its "path". This returns a
    UserError with the worker's own message (which names the file) instead; other errors (bugs) return
    None so they propagate with their traceback."""
    text = str(error)
    if not isinstance(error, UserError) or _WORKER_TRACEBACK not in text:
        return None
    kind = type(error)
    for name in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        at = text.rfind(name)
        if at >= 0:
            return UserError(text[at + len(name):].strip())
    return UserError(text.rsplit("\n", 1)[-1].strip())


def unwrap_worker_errors(iterator: Iterator[Any]) -> Iterator[Any]:
    """Iterate a DataLoader; a UserError raised in a worker comes out as its original message."""
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except UserError as error:
            original = worker_user_error(error)
            if original is None:
                raise
            raise original from None
        yield item


def load_readable(table: SampleTable, indices: np.ndarray, position: int) -> tuple[int, Image.Image, int]:
    """(position actually read, its image, corrupt positions skipped): the image at `position` of
    `indices`, or, if it is corrupt, of the next readable position (cyclically). Deterministic."""
    count = len(indices)
    for skipped in range(count):
        actual = (position + skipped) % count
        try:
            return actual, table.load_image(int(indices[actual])), skipped
        except CorruptImageError:
            continue
    raise UserError(f"every one of the {count} images of this set of {table.dataset}/{table.split} is corrupt")


class TableDataset(Dataset):
    """Items {"position": int, "image": Tensor, "ok": bool} for `table[indices]`.

    A corrupt image does not stop the run: it becomes a black placeholder with ok=False (skip-and-count:
    the caller drops and counts it) and, with `warn`, a warning naming its path."""

    def __init__(
        self, table: SampleTable, transform: Callable, indices: np.ndarray | None = None, *, warn: bool = True
    ) -> None:
        self.table = table
        self.transform = transform
        self.indices = np.arange(len(table), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.warn = warn

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = int(self.indices[position])
        try:
            image, ok = self.table.load_image(index), True
        except CorruptImageError as error:
            if self.warn:
                log.warning("corrupt image skipped: %s", error)
            image, ok = Image.new("RGB", _PLACEHOLDER_SIZE), False
        return {"position": position, "image": self.transform(image), "ok": ok}


class LabeledViews(Dataset):
    """(weak image, target) for the pseudo-labeled / human-labeled set; targets are given explicitly
    (CLIP's labels for T-ZSL), never read from the table's ground truth. A corrupt image is replaced by
    the next readable one, with that one's target (see the module docstring)."""

    def __init__(self, table: SampleTable, indices: Sequence[int], targets: Sequence[int], weak: Callable) -> None:
        if len(indices) != len(targets):
            raise ValueError(f"{len(indices)} indices but {len(targets)} targets")
        self.table, self.weak = table, weak
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        actual, image, skipped = load_readable(self.table, self.indices, position)
        return {"image": self.weak(image), "target": int(self.targets[actual]), POSITION: actual,
                CORRUPT_SKIPPED: skipped}


def aligned_clip_outputs(
    n: int, clip_label: np.ndarray | None, clip_confidence: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(clip_label int64 [n], clip_confidence float32 [n]) for n unlabeled items: -1 / 0 where CLIP's outputs
    are not given; ValueError if a given array does not have n entries."""
    label = np.full(n, -1, np.int64) if clip_label is None else np.asarray(clip_label, np.int64)
    confidence = np.zeros(n, np.float32) if clip_confidence is None else np.asarray(clip_confidence, np.float32)
    if len(label) != n or len(confidence) != n:
        raise ValueError("clip_label / clip_confidence must align with indices")
    return label, confidence


class UnlabeledViews(Dataset):
    """Weak and strong views of every unlabeled sample, with its cached CLIP label and confidence.

    true_label is carried for metrics only (pseudo-label accuracy); no loss may read it. A corrupt image
    is replaced by the next readable one, with that one's labels (see the module docstring)."""

    def __init__(
        self,
        table: SampleTable,
        indices: Sequence[int],
        weak: Callable,
        strong: Callable,
        *,
        num_views: int = 1,
        clip_label: np.ndarray | None = None,
        clip_confidence: np.ndarray | None = None,
    ) -> None:
        self.table, self.weak, self.strong, self.num_views = table, weak, strong, num_views
        self.indices = np.asarray(indices, dtype=np.int64)
        self.clip_label, self.clip_confidence = aligned_clip_outputs(len(self.indices), clip_label, clip_confidence)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        actual, image, skipped = load_readable(self.table, self.indices, position)
        index = int(self.indices[actual])
        return {
            "weak": [self.weak(image) for _ in range(self.num_views)],
            "strong": [self.strong(image) for _ in range(self.num_views)],
            "index": actual,
            "true_label": int(np.asarray(self.table.labels)[index]),
            "clip_label": int(self.clip_label[actual]),
            "clip_confidence": float(self.clip_confidence[actual]),
            POSITION: actual,
            CORRUPT_SKIPPED: skipped,
        }
