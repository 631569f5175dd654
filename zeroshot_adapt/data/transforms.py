"""Weak / strong / eval views for FixMatch-style training (REFERENCE.md section 1, Augmentation).

Two recipes (details, op ranges and the library comparison: ``data/augment_ops.py``):
- "imagenet" (ImageNet-scale images; DebiasPL's official recipe): weak = RandomResizedCrop(size) + horizontal
  flip; strong = weak + RandAugment (2 ops drawn with replacement from the 16-op pool, magnitude 1..9 drawn
  per op, every drawn op applied), no Cutout; eval = resize the shorter side to size / 0.875, center crop.
- "small" (<= 64 px, FixMatch's CIFAR recipe): weak = flip + translate (reflect-pad 12.5% and random crop);
  strong = weak + FixMatch's RandAugment (14-op pool, each drawn op applied with probability 0.5) + Cutout
  (a gray square half the image side); eval = resize + center crop.
"auto" picks "small" for image_size <= SMALL_IMAGE_MAX.

`hflip=False` removes every horizontal flip, for data whose labels are not mirror-symmetric (digits,
traffic signs): `DatasetSpec.hflip` says which. All views end in ToTensor + ImageNet mean/std normalization.

Every view draws its parameters with ``augment_ops.sample_view`` from torch's global RNG, so
``torch.manual_seed`` (and ``SeededItems``' per-item seeding) makes the views reproducible, and renders
them with the PIL executor. The device pipeline (``data/device.py``) draws the same parameters from the same
seeds and renders them batched on the accelerator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision import transforms as T

from zeroshot_adapt.data.augment_ops import (
    CUTOUT_FILL,
    FIXMATCH_POOL,
    IMAGENET_POOL,
    PIL_OPS,
    AugmentRecipe,
    BatchParams,
    OpSpec,
    ViewParams,
    cutout_box,
    op_argument,
    recipe_for,
    render_pil,
    sample_view,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # "auto" uses the small-image recipe up to this size (px)
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize to size / 0.875, then center crop

__all__ = [
    "CUTOUT_FILL",
    "EVAL_CROP_FRACTION",
    "FIXMATCH_POOL",
    "IMAGENET_MEAN",
    "IMAGENET_POOL",
    "IMAGENET_STD",
    "SMALL_IMAGE_MAX",
    "AugmentRecipe",
    "BatchParams",
    "Cutout",
    "RandAugment",
    "Transforms",
    "View",
    "ViewParams",
    "build_transforms",
    "resolve_recipe",
]


class View:
    """One training view: RGB PIL image -> normalized float tensor [3, S, S] (parameters drawn per call)."""

    def __init__(self, recipe: AugmentRecipe, *, strong: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.recipe, self.strong = recipe, strong
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def params(self, image: Image.Image) -> ViewParams:
        return sample_view(self.recipe, image.height, image.width, strong=self.strong)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(render_pil(image, self.params(image), self.recipe))

    def __repr__(self) -> str:
        return f"View({self.recipe.name}, {'strong' if self.strong else 'weak'}, size={self.recipe.image_size})"


class RandAugment:
    """RandAugment alone on a PIL image (no crop or flip): ``num_ops`` ops drawn with replacement from
    ``pool``, magnitude 1..9 per op, each applied with probability ``op_probability`` (1: the official
    ImageNet RandAugment; 0.5: FixMatch's RandAugmentMC)."""

    def __init__(self, pool: tuple[OpSpec, ...] = IMAGENET_POOL, num_ops: int = 2, op_probability: float = 1.0):
        self.recipe = AugmentRecipe("imagenet", 0, False, pool, num_ops, op_probability)

    def __call__(self, image: Image.Image) -> Image.Image:
        params = sample_view(self.recipe, image.height, image.width, strong=True)
        side = image.width
        for op, magnitude, sign, applied in zip(params.ops, params.magnitudes, params.signs, params.applied,
                                                strict=True):
            if applied:
                spec = self.recipe.pool[op]
                image = PIL_OPS[spec.name](image, op_argument(spec, magnitude, sign, side))
        return image

    def __repr__(self) -> str:
        r = self.recipe
        return f"RandAugment(num_ops={r.num_ops}, magnitude=1..9, op_probability={r.op_probability}, ops={len(r.pool)})"


class Cutout:
    """FixMatch's Cutout (the official ``CutoutAbs``): a gray square of side ``int(fraction * min(w, h))``
    at a uniformly random center. PIL in, PIL out."""

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def __call__(self, image: Image.Image) -> Image.Image:
        from PIL import ImageDraw

        side = int(self.fraction * min(image.size))
        top, left, bottom, right = cutout_box(image.height, image.width, side, torch.rand(2).tolist())
        image = image.copy()
        ImageDraw.Draw(image).rectangle((left, top, right, bottom), fill=(CUTOUT_FILL,) * 3)
        return image

    def __repr__(self) -> str:
        return f"Cutout(fraction={self.fraction})"


@dataclass(frozen=True)
class Transforms:
    """PIL RGB image -> normalized float tensor [3, size, size], for each view; `spec` is what the views
    draw and apply (the device pipeline renders the same recipe on tensor batches)."""

    weak: Callable[[Image.Image], torch.Tensor]
    strong: Callable[[Image.Image], torch.Tensor]
    eval: Callable[[Image.Image], torch.Tensor]
    recipe: str
    image_size: int
    spec: AugmentRecipe
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


Recipe = Literal["imagenet", "small", "auto"]


def resolve_recipe(image_size: int, recipe: Recipe = "auto") -> str:
    if recipe == "auto":
        return "small" if image_size <= SMALL_IMAGE_MAX else "imagenet"
    if recipe not in ("imagenet", "small"):
        raise ValueError(f"unknown recipe {recipe!r}; valid: imagenet, small, auto")
    return recipe


def build_transforms(
    image_size: int,
    *,
    recipe: Recipe = "auto",
    hflip: bool = True,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Transforms:
    """Weak, strong and eval transforms for square inputs of `image_size` px (see the module docstring)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    name = resolve_recipe(image_size, recipe)
    spec = recipe_for(name, image_size, hflip=hflip)
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    if name == "imagenet":
        eval_ = T.Compose([T.Resize(round(image_size / EVAL_CROP_FRACTION)), T.CenterCrop(image_size), *finish])
    else:
        eval_ = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), *finish])
    return Transforms(
        weak=View(spec, strong=False, mean=mean, std=std), strong=View(spec, strong=True, mean=mean, std=std),
        eval=eval_, recipe=name, image_size=image_size, spec=spec, mean=mean, std=std,
    )
