"""Small synthetic worlds for training-loop tests: learnable colour-coded images, a tiny BN CNN."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from zeroshot_adapt.algorithms import ALGORITHMS
from zeroshot_adapt.config import AlgorithmConfig
from zeroshot_adapt.data.base import SampleTable, fingerprint_of
from zeroshot_adapt.data.datasets import LabeledViews, UnlabeledViews
from zeroshot_adapt.models.student import EmanTeacher
from zeroshot_adapt.train import LoopSettings

NUM_CLASSES = 4
COLOURS = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [20, 20, 20]], np.float32)


def colour_table(n: int = 48, seed: int = 0, size: int = 12) -> SampleTable:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    images = [
        np.clip(COLOURS[y] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8) for y in labels
    ]
    keys = [f"img{i:03d}" for i in range(n)]
    return SampleTable(
        dataset="colours",
        split="train",
        keys=keys,
        labels=labels.astype(np.int64),
        class_names=["red", "green", "blue", "black"],
        load_image=lambda i: Image.fromarray(images[i]),
        fingerprint=fingerprint_of(keys),
    )


def weak(image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
    return torch.flip(x, dims=[2]) if torch.rand(()) < 0.5 else x


def strong(image: Image.Image) -> torch.Tensor:
    x = weak(image)
    return x + 0.1 * torch.randn_like(x)


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def world(algorithm: str = "debiaspl", n: int = 48, table_seed: int = 0, **algo_kwargs):
    """(student, ema, algorithm, labeled, unlabeled); labels = ground truth on the first half (all classes)."""
    torch.manual_seed(0)
    table = colour_table(n, seed=table_seed)
    student = TinyNet()
    ema = EmanTeacher(student)
    config = AlgorithmConfig(name=algorithm, threshold=0.3, lambda_u=1.0, tau=0.5, prior_momentum=0.9, **algo_kwargs)
    algo = ALGORITHMS.get(algorithm)(NUM_CLASSES, config)
    chosen = np.arange(n // 2)  # the first half: every class
    labeled = LabeledViews(table, chosen, np.asarray(table.labels)[chosen], weak)
    unlabeled = UnlabeledViews(table, np.arange(n), weak, strong)
    return student, ema, algo, labeled, unlabeled


def settings(**overrides) -> LoopSettings:
    base = dict(total_steps=6, steps_per_epoch=3, warmup_steps=1, batch_size=4, mu=2, lr=0.05,
                num_workers=0, seed=1, checkpoint_every_steps=2, ema_momentum=0.9)
    base.update(overrides)
    return LoopSettings(**base)
