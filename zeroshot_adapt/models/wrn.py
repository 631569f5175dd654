"""Wide ResNet for 32x32 images (Zagoruyko & Komodakis 2016), as used by FixMatch (Sohn et al. 2020).

WRN-28-2 is the standard CIFAR-10 / SVHN backbone of semi-supervised learning (~1.47M parameters for
10 classes), WRN-28-8 the CIFAR-100 one. Importing this module registers both with timm, so
``timm.create_model("wrn28_2", num_classes=10)`` works everywhere a timm name is accepted
(``student.arch``).

Layout, depth d = 6n + 4 (n = 4 blocks per group for d = 28), widen factor k:
  3x3 conv, 16 channels -> group 1 (16k, stride 1) -> group 2 (32k, stride 2) -> group 3 (64k, stride 2)
  -> BN -> leaky ReLU -> global average pool -> linear.
Each block is pre-activation: BN -> leaky ReLU -> 3x3 conv (stride) -> BN -> leaky ReLU -> [dropout] ->
3x3 conv, plus a shortcut (identity, or a 1x1 conv with the stride when the width changes). As in the
FixMatch reference implementation the shortcut takes the raw block input, except for the very first block
(`activate_before_residual`) whose shortcut takes the pre-activated input (the stem conv has no BN).
FixMatch's choices: BatchNorm momentum 0.001 (TensorFlow decay 0.999), leaky ReLU slope 0.1, no dropout.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from timm.models import load_pretrained, register_model, resolve_pretrained_cfg
from timm.models._registry import generate_default_cfgs
from torch import Tensor, nn

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.models.registration import has_weight_source

BN_MOMENTUM = 0.001  # PyTorch convention; equals TensorFlow's decay 0.999 used by FixMatch
LEAKY_RELU_SLOPE = 0.1
STEM_CHANNELS = 16
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True)


class WideBasicBlock(nn.Module):
    """Pre-activation residual block of a wide ResNet (see the module docstring)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, drop_rate: float, activate_before_residual: bool
    ) -> None:
        super().__init__()
        self.bn1, self.act1 = _bn(in_channels), _act()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.act2 = _bn(out_channels), _act()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.activate_before_residual = activate_before_residual
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if needs_projection else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.act1(self.bn1(x))
        residual_input = activated if self.activate_before_residual else x
        out = self.act2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.shortcut(residual_input) + self.conv2(out)


class WideResNet(nn.Module):
    """WRN-d-k for small images. x: [B, in_chans, H, W] -> logits [B, num_classes].

    drop_rate is the dropout inside each block (the WRN paper's), 0 for FixMatch.
    Offers timm's model interface: `forward_features`, `forward_head`, `get_classifier`,
    `reset_classifier`, `num_features`, `pretrained_cfg`.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise UserError(f"WideResNet depth={depth} must be 6n + 4 with n >= 1 (e.g. 28)")
        if global_pool != "avg":
            raise UserError(f"WideResNet global_pool={global_pool!r}; only 'avg' is supported")
        blocks_per_group = (depth - 4) // 6
        widths = [STEM_CHANNELS * widen_factor * 2**g for g in range(3)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = widths[-1]

        self.conv_stem = nn.Conv2d(in_chans, STEM_CHANNELS, 3, stride=1, padding=1, bias=False)
        groups = []
        in_channels = STEM_CHANNELS
        for group, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_group):
                first = b == 0
                blocks.append(
                    WideBasicBlock(
                        in_channels if first else width,
                        width,
                        stride=(1 if group == 0 else 2) if first else 1,
                        drop_rate=drop_rate,
                        activate_before_residual=first and group == 0,
                    )
                )
            groups.append(nn.Sequential(*blocks))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.bn_final, self.act_final = _bn(widths[-1]), _act()
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """FixMatch's init: He (fan_out, leaky ReLU) convs, unit BN, Xavier-normal linear, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise UserError(f"WideResNet global_pool={global_pool!r}; only 'avg' is supported")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.fc, nn.Linear):
            nn.init.xavier_normal_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> [B, 64k, H/4, W/4] (after the final BN and activation)."""
        return self.act_final(self.bn_final(self.groups(self.conv_stem(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(mean: tuple[float, ...], std: tuple[float, ...], num_classes: int) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": mean,
        "std": std,
        "first_conv": "conv_stem",
        "classifier": "fc",
    }


default_cfgs = generate_default_cfgs(
    {
        "wrn28_2": _cfg(CIFAR10_MEAN, CIFAR10_STD, 10),
        "wrn28_8": _cfg(CIFAR100_MEAN, CIFAR100_STD, 100),
    }
)

__all__ = ["WideBasicBlock", "WideResNet", "count_parameters"]  # timm's register_model appends the entrypoints

_TIMM_PASSTHROUGH = ("pretrained_cfg_overlay", "cache_dir", "drop_path_rate")


def _create(name: str, widen_factor: int, default_classes: int, pretrained: bool, **kwargs: Any) -> WideResNet:
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    if pretrained and not has_weight_source(pretrained_cfg):
        raise UserError(
            f"there are no pretrained weights for {name}; use pretrained=False (train from scratch) "
            "or load your own checkpoint"
        )
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    kwargs.pop("pretrained_model_args", None)  # a config.json's model_args, already merged into kwargs by timm
    for key in _TIMM_PASSTHROUGH:
        value = kwargs.pop(key, None)
        if key == "drop_path_rate" and value:
            raise UserError(f"{name} has no stochastic depth; drop_path_rate must be 0, got {value}")
    num_classes = kwargs.pop("num_classes", default_classes)
    model = WideResNet(depth=28, widen_factor=widen_factor, num_classes=num_classes, **kwargs)
    resolved = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg if pretrained_cfg else None)
    model.pretrained_cfg = model.default_cfg = {**resolved.to_dict(), "num_classes": model.num_classes}
    if pretrained:  # a `zsa export` folder (local-dir: / hf-hub:): its weights, strictly
        load_pretrained(model, pretrained_cfg=model.pretrained_cfg, num_classes=model.num_classes,
                        in_chans=kwargs.get("in_chans", 3))
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


@register_model
def wrn28_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-2 (FixMatch's CIFAR-10 / SVHN backbone), 10 classes by default."""
    return _create("wrn28_2", 2, 10, pretrained, **kwargs)


@register_model
def wrn28_8(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-8 (FixMatch's CIFAR-100 backbone), 100 classes by default."""
    return _create("wrn28_8", 8, 100, pretrained, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

