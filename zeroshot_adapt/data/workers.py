"""How many DataLoader workers each training stream gets, from measured per-item costs.

The labeled and the unlabeled stream each have their own loader. The slower stream sets the step time,
so ``data.num_workers`` is split to minimise the largest per-worker load: a worker goes, one at a time, to
the stream whose load per worker (items per step x seconds per item / workers) is largest. The seconds per
item are measured on a few items in the main process before the loaders start (the same code the workers
run: decoding and augmentation in the CPU pipeline, a file read and a header parse in the device pipeline).
Worker counts never change results: every item carries its own augmentation seed (data/sampling.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from torch.utils.data import Dataset

from zeroshot_adapt.data.sampling import SeededItems

log = logging.getLogger(__name__)

MEASURED_ITEMS = 2  # timed items per stream (after one untimed warm-up item)
PROBE_SEED = 0  # augmentation seed of the probe items (SeededItems restores the caller's RNG states)


def split_workers(total: int, loads: Sequence[float]) -> list[int]:
    """Split ``total`` workers between streams with per-step work ``loads`` (seconds; 0: no work).

    Greedy min-max, one worker at a time: first every stream with work gets one, most loaded first (a
    stream without a worker loads in the main process, which also runs the model, so it is served first);
    then each further worker goes to the stream with the largest load per worker. With fewer workers than
    streams the least loaded streams stay in the main process. The counts sum to ``total`` (all 0 when no
    stream has work)."""
    if total < 0:
        raise ValueError(f"worker count must be >= 0, got {total}")
    counts = [0] * len(loads)
    if not any(load > 0 for load in loads):
        return counts
    for _ in range(total):
        best = max(
            range(len(loads)),
            key=lambda i: (loads[i] > 0 and counts[i] == 0, loads[i] / max(1, counts[i]), -i),
        )
        counts[best] += 1
    return counts


def seconds_per_item(dataset: Dataset | None, items: int = MEASURED_ITEMS) -> float:
    """Mean seconds to produce one item of ``dataset`` in this process (after one warm-up item); 0 for an
    empty or missing dataset. The caller's RNG states are left untouched (SeededItems restores them)."""
    if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
        return 0.0
    seeded = SeededItems(dataset)
    positions = [i % len(dataset) for i in range(items + 1)]  # type: ignore[arg-type]
    seeded[(positions[0], PROBE_SEED)]
    start = time.perf_counter()
    for position in positions[1:]:
        seeded[(position, PROBE_SEED)]
    return (time.perf_counter() - start) / items


def plan_stream_workers(total: int, streams: Sequence[tuple[Dataset | None, int]]) -> list[int]:
    """Worker counts for streams given as (dataset, items per micro-step), from measured per-item costs.
    ``total`` 0: every stream loads in the main process (nothing is measured)."""
    if total == 0:
        return [0] * len(streams)
    costs = [seconds_per_item(dataset) for dataset, _ in streams]
    loads = [cost * per_step for cost, (_, per_step) in zip(costs, streams, strict=True)]
    counts = split_workers(total, loads)
    log.info(
        "data workers: %s (measured ms per item %s, items per step %s)",
        counts, [round(1e3 * c, 2) for c in costs], [per_step for _, per_step in streams],
    )
    return counts
