"""Deterministic, resumable batch sampling: the batch of step t depends only on (seed, stream, t).

Each stream (labeled, unlabeled) is an endless concatenation of seeded permutations of its samples;
step t takes the next `global_batch` positions. Every item also gets its own augmentation seed, so
a run resumed at step t sees exactly the images and augmentations an uninterrupted run would, for
any number of DataLoader workers. In multi-process runs each process takes a strided share.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

_MAX_SEED = 2**31 - 1


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for steps `start_step .. total_steps-1`, this process's items: (position, aug_seed)."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int,
        stream: int,
        total_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample batches from an empty set")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.stream = seed, stream
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self._cycle, self._perm = -1, np.empty(0, np.int64)

    def _permutation(self, cycle: int) -> np.ndarray:
        if cycle != self._cycle:
            rng = np.random.default_rng([self.seed, self.stream, cycle])
            self._cycle, self._perm = cycle, rng.permutation(self.num_samples)
        return self._perm

    def global_positions(self, step: int) -> np.ndarray:
        start = step * self.global_batch
        out = np.empty(self.global_batch, np.int64)
        for j in range(self.global_batch):
            cycle, offset = divmod(start + j, self.num_samples)
            out[j] = self._permutation(cycle)[offset]
        return out

    def aug_seeds(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream, 1_000_003, step])
        return rng.integers(0, _MAX_SEED, size=self.global_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            positions, seeds = self.global_positions(step), self.aug_seeds(step)
            mine = slice(self.rank, None, self.world_size)
            yield [(int(p), int(s)) for p, s in zip(positions[mine], seeds[mine], strict=True)]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


class SeededItems(Dataset):
    """Wraps a dataset so item (position, aug_seed) is produced with the torch, numpy and python RNGs
    seeded by aug_seed.

    In DataLoader workers the RNGs are the worker's own; in the main process (num_workers=0) the
    caller's RNG states are restored afterwards. Seeding uses `torch.default_generator` directly:
    `torch.manual_seed` also seeds every CUDA device and costs ~0.75 ms per call on CUDA builds."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        position, aug_seed = item
        if get_worker_info() is not None:
            _seed_all(aug_seed)
            return self.dataset[position]
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        _seed_all(aug_seed)
        try:
            return self.dataset[position]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
