import math

import numpy as np
import torch

from zeroshot_adapt.data.sampling import SeededItems, StepBatchSampler
from zeroshot_adapt.schedules import warmup_cosine


def test_warmup_then_cosine_hand_values():
    f = lambda s: warmup_cosine(s, total_steps=10, warmup_steps=2)  # noqa: E731
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0  # cosine starts at its top
    assert math.isclose(f(6), 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # = 0.5
    assert math.isclose(f(10), 0.0, abs_tol=1e-12)
    assert warmup_cosine(3, total_steps=10, warmup_steps=0) == 0.5 * (1 + math.cos(math.pi * 0.3))


def test_batches_depend_only_on_step_and_cover_each_epoch():
    sampler = StepBatchSampler(10, 4, seed=3, stream=1, total_steps=5)
    batches = list(sampler)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    positions = [p for b in batches for p, _ in b]
    assert sorted(positions[:10]) == list(range(10))  # the first 10 draws are one permutation
    resumed = list(StepBatchSampler(10, 4, seed=3, stream=1, total_steps=5, start_step=3))
    assert resumed == batches[3:]
    other = list(StepBatchSampler(10, 4, seed=4, stream=1, total_steps=5))
    assert other != batches


def test_processes_split_the_global_batch():
    whole = list(StepBatchSampler(12, 6, seed=0, stream=2, total_steps=3))
    shares = [list(StepBatchSampler(12, 6, seed=0, stream=2, total_steps=3, rank=r, world_size=2)) for r in (0, 1)]
    for step in range(3):
        assert sorted(shares[0][step] + shares[1][step]) == sorted(whole[step])
        assert not set(shares[0][step]) & set(shares[1][step])


class RandomItem(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.rand(1).item() + np.random.rand()


def test_seeded_items_are_reproducible_and_leave_the_caller_rng_alone():
    import random

    data = SeededItems(RandomItem())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert data[(1, 42)] == data[(1, 42)]
    assert data[(1, 42)] != data[(1, 43)]
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
