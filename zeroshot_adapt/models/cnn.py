"""A small CNN student for tiny images (the offline digits demo), registered with timm as `zsa_cnn_small`.

Five 3x3 conv-BN-ReLU layers (32, 32, 64, 64, 128 channels) with two 2x2 max-pools, global average
pooling and a linear head: ~0.14M parameters, ~7M multiply-adds per 16x16 image, so a FixMatch step
(32 labeled + 2 x 128 unlabeled views) runs in well under a second on 2 CPU cores.

Built through timm's `build_model_with_cfg`, so a folder written by `zsa export` (config.json +
model.safetensors) loads with ``timm.create_model("local-dir:DIR", pretrained=True)`` once this package is
imported (the import registers the name). Without such a weight source there are no pretrained weights.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.models.registration import has_weight_source


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, widths=(32, 64, 128)):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            *_block(in_chans, a), *_block(a, a), nn.MaxPool2d(2),
            *_block(a, b), *_block(b, b), nn.MaxPool2d(2),
            *_block(b, c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_classes = num_classes
        self.num_features = c
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(c, num_classes)
        self.pretrained_cfg = {"input_size": (3, 16, 16), "num_classes": num_classes, "classifier": "head"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:  # noqa: ARG002
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)


default_cfgs = generate_default_cfgs({
    "zsa_cnn_small": {
        "num_classes": 10, "input_size": (3, 16, 16), "pool_size": (4, 4), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.0", "classifier": "head",
    },
})


@register_model
def zsa_cnn_small(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """The demo CNN (10 classes by default). pretrained=True only with a weight source in ``pretrained_cfg``
    (``timm.create_model("local-dir:DIR" or "hf-hub:ID", pretrained=True)`` on a `zsa export` folder)."""
    if pretrained and not has_weight_source(kwargs.get("pretrained_cfg")):
        raise UserError("zsa_cnn_small has no pretrained weights; pass student.pretrained=none or a checkpoint path")
    return build_model_with_cfg(SmallCNN, "zsa_cnn_small", pretrained, **kwargs)
