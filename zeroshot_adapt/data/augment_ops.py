"""One augmentation parameter sampler, two executors (REFERENCE.md section 1, Augmentation).

Every random choice of a view — crop box, flip, RandAugment op ids, magnitudes, signs, per-op coin flips,
Cutout box — is drawn by :func:`sample_view` into a :class:`ViewParams`, from a torch generator (by default
torch's global one, which ``data.sampling.SeededItems`` seeds with each item's augmentation seed, so the
parameters of every item are a pure function of (seed, step)). Two executors apply the same parameters:

- :func:`render_pil` — one PIL image at a time (PIL / torchvision ops), what DataLoader workers run in the
  CPU pipeline;
- :func:`render_batch` — uint8 tensor batches [B, 3, H, W] on any device (CPU or CUDA) with torchvision v2
  functional ops, one call per group of samples sharing an op and its argument (the device pipeline).

Given the same item seed both executors see identical parameters (tests/test_device_pipeline.py), so the
two pipelines agree in distribution by construction; pixels differ only by interpolation / rounding details.

Recipes (:func:`recipe_for`):

- ``imagenet`` (DebiasPL's ImageNet recipe, official ``data/randaugment.py`` ``RandAugment(n=2, m=10)``):
  weak = RandomResizedCrop(size) + horizontal flip; strong = weak + RandAugment with 2 ops drawn with
  replacement from the 16-op :data:`IMAGENET_POOL`, magnitude v drawn from 1..9 per op, EVERY drawn op
  applied (no coin flip: 1/16^2 = 0.4% of strong views are Identity twice), no Cutout.
- ``small`` (FixMatch's CIFAR recipe, ``RandAugmentMC(n=2, m=10)``): weak = flip + translate (reflect-pad
  12.5% of the side, random crop); strong = weak + RandAugment with 2 ops from FixMatch's 14-op
  :data:`FIXMATCH_POOL` (paper Table 12: no Invert, no SolarizeAdd, enhance factors 0.05..0.95), each
  drawn op applied with probability 0.5, then Cutout (a gray square of half the side).

Argument of op ``(max, bias)`` at magnitude v (official ``_float_parameter`` / ``_int_parameter``):
enhance factor ``v * max / 10 + bias``; Posterize ``int(v * 4 / 10) + 4`` bits; Rotate ``+-int(v * 30 / 10)``
degrees; Shear ``+-v * 0.3 / 10``; Translate ``int(+-v * max / 10 * side)`` pixels; Solarize threshold
``256 - int(v * 256 / 10)``; SolarizeAdd ``+-int(v * 110 / 10)`` added to every pixel, clipped, then solarized
at 128. Geometric ops use nearest-neighbour sampling and fill 0, as PIL's defaults in the official code.

Why not a library (checked: timm 1.0 ``rand_augment_transform``, torchvision 0.29 ``v2.RandAugment``):
- timm: its pool has no Identity (15 ops), magnitudes are fixed or continuous (``mstd`` > 100 draws
  uniformly from [0, m], never the integers 1..9), its SolarizeAdd adds only below the threshold, without a
  sign and without the final solarize; ``Posterize``/``Solarize`` need the ``Original``/``Increasing``
  variants to match; geometric ops pick bilinear or bicubic at random and fill gray; and it draws from
  Python's RNG inside PIL calls, so its parameters cannot be drawn once and replayed on a tensor batch.
- torchvision ``v2.RandAugment``: 14 ops without Invert and SolarizeAdd, ONE magnitude for every op of a
  call (no per-op draw), signed enhance factors ``1 +- 0.9 m / 30``, translate up to 150/331 of the side,
  and one set of parameters per call (a batch would share them).
Both apply to a whole call what we need per sample; we use torchvision's v2 functional ops as the
executor's building blocks instead.

Known differences from the official code, kept on purpose: Cutout's side is ``int(0.5 * size)`` (the
official code hard-codes 16 px, i.e. the same at CIFAR's 32 px); the small recipe's pad-and-crop and the
RandomResizedCrop use torchvision's samplers (the official code uses the same torchvision transforms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode

MAGNITUDE_SCALE = 10  # the official PARAMETER_MAX: op argument = v * max / 10 + bias
MIN_MAGNITUDE, MAX_MAGNITUDE = 1, 9  # np.random.randint(1, m) with m = 10: v in 1..9
NUM_OPS = 2  # RandAugment n
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop defaults (torchvision; the official code uses them)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params tries this often, then center-crops
SMALL_TRANSLATE_FRACTION = 0.125  # small recipe: reflect-pad 12.5% of the side, random crop (4 px at 32)
CUTOUT_FRACTION = 0.5  # small recipe: Cutout square side = half the image side (FixMatch: 16 px at 32)
CUTOUT_FILL = 127  # gray, as the official CutoutAbs
GEOMETRY_FILL = 0  # PIL's default fill for rotate / transform, which the official ops use
SOLARIZE_ADD_THRESHOLD = 128
FLIP_PROBABILITY = 0.5
SIGN_PROBABILITY = 0.5  # each signed op is negated with this probability
SMALL_OP_PROBABILITY = 0.5  # FixMatch's RandAugmentMC: each drawn op applied with probability 0.5
UINT8_MAX = 255


@dataclass(frozen=True)
class OpSpec:
    """One RandAugment op: argument = v * max_value / MAGNITUDE_SCALE + bias (None for ops without one)."""

    name: str
    max_value: float | None = None
    bias: float = 0.0


IMAGENET_POOL: tuple[OpSpec, ...] = (
    OpSpec("AutoContrast"),
    OpSpec("Brightness", 1.8, 0.1),
    OpSpec("Color", 1.8, 0.1),
    OpSpec("Contrast", 1.8, 0.1),
    OpSpec("Equalize"),
    OpSpec("Identity"),
    OpSpec("Invert"),
    OpSpec("Posterize", 4, 4),
    OpSpec("Rotate", 30, 0),
    OpSpec("Sharpness", 1.8, 0.1),
    OpSpec("ShearX", 0.3, 0),
    OpSpec("ShearY", 0.3, 0),
    OpSpec("Solarize", 256, 0),
    OpSpec("SolarizeAdd", 110, 0),
    OpSpec("TranslateX", 0.45, 0),
    OpSpec("TranslateY", 0.45, 0),
)
"""The official DebiasPL ImageNet pool (``imagenet_augment_pool``): 16 ops."""

FIXMATCH_POOL: tuple[OpSpec, ...] = (
    OpSpec("AutoContrast"),
    OpSpec("Brightness", 0.9, 0.05),
    OpSpec("Color", 0.9, 0.05),
    OpSpec("Contrast", 0.9, 0.05),
    OpSpec("Equalize"),
    OpSpec("Identity"),
    OpSpec("Posterize", 4, 4),
    OpSpec("Rotate", 30, 0),
    OpSpec("Sharpness", 0.9, 0.05),
    OpSpec("ShearX", 0.3, 0),
    OpSpec("ShearY", 0.3, 0),
    OpSpec("Solarize", 256, 0),
    OpSpec("TranslateX", 0.3, 0),
    OpSpec("TranslateY", 0.3, 0),
)
"""FixMatch's pool (paper Table 12; ``fixmatch_augment_pool`` of the official code): 14 ops."""

SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "SolarizeAdd"})


@dataclass(frozen=True)
class AugmentRecipe:
    """What the sampler draws and the executors apply. ``pool`` empty: no RandAugment (weak views only)."""

    name: str  # "imagenet" | "small"
    image_size: int
    hflip: bool = True
    pool: tuple[OpSpec, ...] = IMAGENET_POOL
    num_ops: int = NUM_OPS
    op_probability: float = 1.0
    cutout_fraction: float = 0.0

    @property
    def pad(self) -> int:
        """Small recipe: reflect padding (px) of the pad-and-crop translation."""
        return max(1, round(SMALL_TRANSLATE_FRACTION * self.image_size))

    @property
    def cutout_side(self) -> int:
        return int(self.cutout_fraction * self.image_size)


def recipe_for(name: str, image_size: int, *, hflip: bool = True) -> AugmentRecipe:
    """The ``imagenet`` or ``small`` recipe (see the module docstring) at ``image_size`` px."""
    if name == "imagenet":
        return AugmentRecipe("imagenet", image_size, hflip, IMAGENET_POOL, NUM_OPS, 1.0, 0.0)
    if name == "small":
        return AugmentRecipe("small", image_size, hflip, FIXMATCH_POOL, NUM_OPS, SMALL_OP_PROBABILITY, CUTOUT_FRACTION)
    raise ValueError(f"unknown recipe {name!r}; valid: imagenet, small")


# ------------------------------------------------------------------------------------------ op arguments


def op_argument(spec: OpSpec, magnitude: int, sign: int, side: int) -> float | int | None:
    """The concrete argument of op ``spec`` at magnitude ``magnitude`` (1..9) with ``sign`` (+1 / -1) on an image
    of ``side`` px, as the official code computes it (``_float_parameter`` / ``_int_parameter``).

    Brightness/Color/Contrast/Sharpness: enhance factor; Posterize: bits kept; Rotate: integer degrees;
    ShearX/Y: shear factor; TranslateX/Y: integer pixels; Solarize: threshold; SolarizeAdd: integer added;
    AutoContrast/Equalize/Identity/Invert: None. Unsigned ops ignore ``sign``."""
    if spec.max_value is None:
        return None
    level = magnitude * spec.max_value / MAGNITUDE_SCALE  # _float_parameter
    whole = int(magnitude * spec.max_value / MAGNITUDE_SCALE)  # _int_parameter
    name = spec.name
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return level + spec.bias
    if name == "Posterize":
        return whole + int(spec.bias)
    if name == "Solarize":
        return 256 - (whole + int(spec.bias))
    if name in ("Rotate", "SolarizeAdd"):
        return sign * (whole + int(spec.bias))
    if name in ("ShearX", "ShearY"):
        return sign * (level + spec.bias)
    if name in ("TranslateX", "TranslateY"):
        return int(sign * (level + spec.bias) * side)
    raise ValueError(f"op {name!r} has no argument rule")


# ------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view.

    crop:       (top, left, height, width) of the source region resized to the output (imagenet recipe);
                the whole image for the small recipe (it resizes and center-crops without randomness).
    flip:       horizontal flip.
    shift:      small recipe: (top, left) of the output window in the reflect-padded image; (0, 0) otherwise.
    ops:        RandAugment op ids (indices into the recipe's pool); () for weak views.
    magnitudes: v in 1..9 per op; signs: +1 / -1 per op; applied: the per-op coin flips.
    cutout:     (top, left, bottom, right) of the Cutout square, corners inclusive, or None.
    """

    crop: tuple[int, int, int, int]
    flip: bool
    shift: tuple[int, int] = (0, 0)
    ops: tuple[int, ...] = ()
    magnitudes: tuple[int, ...] = ()
    signs: tuple[int, ...] = ()
    applied: tuple[bool, ...] = ()
    cutout: tuple[int, int, int, int] | None = None


@dataclass
class BatchParams:
    """:class:`ViewParams` of B views as CPU tensors: crop [B, 4], flip [B], shift [B, 2], ops / magnitudes /
    signs / applied [B, n] (n = 0 for weak views), cutout [B, 4], has_cutout [B]."""

    crop: Tensor
    flip: Tensor
    shift: Tensor
    ops: Tensor
    magnitudes: Tensor
    signs: Tensor
    applied: Tensor
    cutout: Tensor
    has_cutout: Tensor

    def __len__(self) -> int:
        return int(self.crop.shape[0])

    @classmethod
    def stack(cls, views: Sequence[ViewParams]) -> BatchParams:
        n = len(views[0].ops) if views else 0
        if any(len(v.ops) != n for v in views):
            raise ValueError("views of one batch must draw the same number of ops")

        def ints(rows, width):
            return torch.tensor(rows, dtype=torch.int64).reshape(len(views), width)

        return cls(
            crop=ints([v.crop for v in views], 4),
            flip=torch.tensor([v.flip for v in views], dtype=torch.bool),
            shift=ints([v.shift for v in views], 2),
            ops=ints([v.ops for v in views], n),
            magnitudes=ints([v.magnitudes for v in views], n),
            signs=ints([v.signs for v in views], n),
            applied=torch.tensor([v.applied for v in views], dtype=torch.bool).reshape(len(views), n),
            cutout=ints([v.cutout or (0, 0, -1, -1) for v in views], 4),
            has_cutout=torch.tensor([v.cutout is not None for v in views], dtype=torch.bool),
        )

    def row(self, i: int) -> ViewParams:
        return ViewParams(
            crop=tuple(int(x) for x in self.crop[i]),  # type: ignore[arg-type]
            flip=bool(self.flip[i]),
            shift=tuple(int(x) for x in self.shift[i]),  # type: ignore[arg-type]
            ops=tuple(int(x) for x in self.ops[i]),
            magnitudes=tuple(int(x) for x in self.magnitudes[i]),
            signs=tuple(int(x) for x in self.signs[i]),
            applied=tuple(bool(x) for x in self.applied[i]),
            cutout=tuple(int(x) for x in self.cutout[i]) if bool(self.has_cutout[i]) else None,  # type: ignore[arg-type]
        )


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator).item())


def _randint(low: int, high_exclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(low, high_exclusive, size=(1,), generator=generator).item())


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator).item())


def resized_crop_box(
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a RandomResizedCrop of an image of ``height`` x ``width``.

    The algorithm and the RNG calls of ``torchvision.transforms.RandomResizedCrop.get_params`` (area fraction
    uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, up to 10 attempts, then a center crop),
    with an explicit generator: with the global one it draws exactly what torchvision draws (a test checks)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(0, height - h + 1, generator)
            left = _randint(0, width - w + 1, generator)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(
    recipe: AugmentRecipe, height: int, width: int, *, strong: bool, generator: torch.Generator | None = None
) -> ViewParams:
    """Draw one view's parameters for a source image of ``height`` x ``width`` px.

    Draw order (fixed, so a seed gives the same view in either pipeline): imagenet: crop box, flip; small:
    flip, pad-crop offset; then for strong views the RandAugment ops, magnitudes, signs and coin flips
    (always drawn, even where ``op_probability`` is 1), then the Cutout center."""
    side = recipe.image_size
    if recipe.name == "imagenet":
        crop = resized_crop_box(height, width, generator)
        flip = recipe.hflip and _rand(generator) < FLIP_PROBABILITY
        shift = (0, 0)
    else:
        crop = (0, 0, height, width)
        flip = recipe.hflip and _rand(generator) < FLIP_PROBABILITY
        padded = side + 2 * recipe.pad  # torchvision RandomCrop(padding=pad): offsets in 0..2*pad
        shift = (_randint(0, padded - side + 1, generator), _randint(0, padded - side + 1, generator))
    if not strong or not recipe.pool:
        return ViewParams(crop=crop, flip=flip, shift=shift)
    n = recipe.num_ops
    ops = torch.randint(0, len(recipe.pool), (n,), generator=generator).tolist()
    magnitudes = torch.randint(MIN_MAGNITUDE, MAX_MAGNITUDE + 1, (n,), generator=generator).tolist()
    signs = [-1 if negate else 1 for negate in (torch.rand(n, generator=generator) < SIGN_PROBABILITY).tolist()]
    applied = (torch.rand(n, generator=generator) < recipe.op_probability).tolist()
    cutout = None
    if recipe.cutout_fraction > 0:
        cutout = cutout_box(side, side, recipe.cutout_side, torch.rand(2, generator=generator).tolist())
    return ViewParams(
        crop=crop, flip=flip, shift=shift, ops=tuple(ops), magnitudes=tuple(magnitudes), signs=tuple(signs),
        applied=tuple(bool(a) for a in applied), cutout=cutout,
    )


def cutout_box(height: int, width: int, side: int, uniforms: Sequence[float]) -> tuple[int, int, int, int]:
    """The official ``CutoutAbs`` box for a center at ``uniforms`` (fractions of the width and height):
    ``x0 = int(max(0, cx - side / 2))``, ``x1 = int(min(width, x0 + side))`` and the same for y; PIL's
    rectangle paints both corners, so rows y0..y1 and columns x0..x1 inclusive (clipped to the image).
    Returns (top, left, bottom, right), inclusive."""
    center_x, center_y = uniforms[0] * width, uniforms[1] * height
    left = int(max(0.0, center_x - side / 2))
    top = int(max(0.0, center_y - side / 2))
    right = int(min(width, left + side))
    bottom = int(min(height, top + side))
    return top, left, min(bottom, height - 1), min(right, width - 1)


# ------------------------------------------------------------------------------------------ PIL executor


def _pil_enhance(enhancer: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, factor: enhancer(image).enhance(factor)


def _pil_affine(matrix: Callable[[float], tuple[float, ...]]) -> Callable[[Image.Image, float], Image.Image]:
    # PIL's defaults (nearest, fill 0), as the official ops call it
    return lambda image, value: image.transform(image.size, Image.Transform.AFFINE, matrix(value))


def _pil_solarize_add(image: Image.Image, add: int) -> Image.Image:
    shifted = np.clip(np.asarray(image, dtype=np.int16) + add, 0, UINT8_MAX).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(shifted), SOLARIZE_ADD_THRESHOLD)


PIL_OPS: dict[str, Callable[[Image.Image, object], Image.Image]] = {
    "AutoContrast": lambda image, _: ImageOps.autocontrast(image),
    "Brightness": _pil_enhance(ImageEnhance.Brightness),
    "Color": _pil_enhance(ImageEnhance.Color),
    "Contrast": _pil_enhance(ImageEnhance.Contrast),
    "Equalize": lambda image, _: ImageOps.equalize(image),
    "Identity": lambda image, _: image,
    "Invert": lambda image, _: ImageOps.invert(image),
    "Posterize": lambda image, bits: ImageOps.posterize(image, bits),
    "Rotate": lambda image, degrees: image.rotate(degrees),
    "Sharpness": _pil_enhance(ImageEnhance.Sharpness),
    "ShearX": _pil_affine(lambda s: (1, s, 0, 0, 1, 0)),
    "ShearY": _pil_affine(lambda s: (1, 0, 0, s, 1, 0)),
    "Solarize": lambda image, threshold: ImageOps.solarize(image, threshold),
    "SolarizeAdd": _pil_solarize_add,
    "TranslateX": _pil_affine(lambda px: (1, 0, px, 0, 1, 0)),
    "TranslateY": _pil_affine(lambda px: (1, 0, 0, 0, 1, px)),
}  # type: ignore[dict-item]
"""name -> (RGB PIL image, argument from :func:`op_argument`) -> PIL image."""


def render_pil(image: Image.Image, params: ViewParams, recipe: AugmentRecipe) -> Image.Image:
    """Apply one view's parameters to an RGB PIL image; returns an RGB PIL image of the recipe's size."""
    side = recipe.image_size
    if recipe.name == "imagenet":
        top, left, height, width = params.crop
        image = TF.resized_crop(image, top, left, height, width, [side, side], InterpolationMode.BILINEAR)
        if params.flip:
            image = TF.horizontal_flip(image)
    else:
        image = TF.center_crop(TF.resize(image, [side], InterpolationMode.BILINEAR), [side, side])
        if params.flip:
            image = TF.horizontal_flip(image)
        image = TF.pad(image, [recipe.pad], padding_mode="reflect")
        image = TF.crop(image, params.shift[0], params.shift[1], side, side)
    for op, magnitude, sign, applied in zip(params.ops, params.magnitudes, params.signs, params.applied, strict=True):
        if applied:
            spec = recipe.pool[op]
            image = PIL_OPS[spec.name](image, op_argument(spec, magnitude, sign, side))
    if params.cutout is not None:
        top, left, bottom, right = params.cutout
        image = image.copy()
        ImageDraw.Draw(image).rectangle((left, top, right, bottom), fill=(CUTOUT_FILL,) * 3)
    return image


# ------------------------------------------------------------------------------------------ tensor executor


def _shear_degrees(factor: float) -> float:
    return math.degrees(math.atan(factor))


# PIL's affine matrix acts about the image's top-left corner: torchvision's affine with center (0, 0)
# reproduces PIL's nearest-neighbour shear and translate exactly (tests/test_device_pipeline.py).
_PIL_ORIGIN = [0.0, 0.0]


def _tensor_affine(images: Tensor, *, translate=(0.0, 0.0), shear=(0.0, 0.0)) -> Tensor:
    return TF.affine(
        images, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
        interpolation=InterpolationMode.NEAREST, fill=GEOMETRY_FILL, center=_PIL_ORIGIN,
    )


def _tensor_solarize_add(images: Tensor, add: int) -> Tensor:
    shifted = (images.to(torch.int16) + add).clamp_(0, UINT8_MAX).to(torch.uint8)
    return TF.solarize(shifted, SOLARIZE_ADD_THRESHOLD)


TENSOR_OPS: dict[str, Callable[[Tensor, object], Tensor]] = {
    "AutoContrast": lambda x, _: TF.autocontrast(x),
    "Brightness": lambda x, f: TF.adjust_brightness(x, f),
    "Color": lambda x, f: TF.adjust_saturation(x, f),
    "Contrast": lambda x, f: TF.adjust_contrast(x, f),
    "Equalize": lambda x, _: TF.equalize(x),
    "Identity": lambda x, _: x,
    "Invert": lambda x, _: TF.invert(x),
    "Posterize": lambda x, bits: TF.posterize(x, bits),
    "Rotate": lambda x, deg: TF.rotate(x, float(deg), InterpolationMode.NEAREST, fill=GEOMETRY_FILL),
    "Sharpness": lambda x, f: TF.adjust_sharpness(x, f),
    "ShearX": lambda x, s: _tensor_affine(x, shear=(_shear_degrees(s), 0.0)),
    "ShearY": lambda x, s: _tensor_affine(x, shear=(0.0, _shear_degrees(s))),
    "Solarize": lambda x, threshold: TF.solarize(x, threshold),
    "SolarizeAdd": _tensor_solarize_add,
    "TranslateX": lambda x, px: _tensor_affine(x, translate=(-px, 0.0)),  # PIL's +px moves content left
    "TranslateY": lambda x, px: _tensor_affine(x, translate=(0.0, -px)),
}  # type: ignore[dict-item]
"""name -> (uint8 [b, 3, H, W] batch, argument from :func:`op_argument`) -> uint8 [b, 3, H, W]."""


def _geometry(images: Sequence[Tensor] | Tensor, params: BatchParams, recipe: AugmentRecipe) -> Tensor:
    """Crop / resize / flip / translate: uint8 [B, 3, S, S] on the images' device."""
    side = recipe.image_size
    if recipe.name == "imagenet":
        out = torch.stack([
            TF.resized_crop(image, *(int(v) for v in params.crop[i]), [side, side], InterpolationMode.BILINEAR)
            for i, image in enumerate(images)
        ])
        return _flip(out, params.flip)
    # small: resize + center-crop (one call per source size), flip, reflect-pad, per-sample window
    fitted = _fit_by_size(images, side)
    fitted = _flip(fitted, params.flip)
    padded = TF.pad(fitted, [recipe.pad], padding_mode="reflect")
    return torch.stack([
        padded[i, :, int(top) : int(top) + side, int(left) : int(left) + side]
        for i, (top, left) in enumerate(params.shift.tolist())
    ])


def _fit_by_size(images: Sequence[Tensor] | Tensor, side: int) -> Tensor:
    """Resize the shorter side to ``side`` and center-crop, grouping images of equal size into one call."""
    if isinstance(images, Tensor):
        return TF.center_crop(TF.resize(images, [side], InterpolationMode.BILINEAR), [side, side])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    out = images[0].new_empty((len(images), 3, side, side))
    for members in groups.values():
        batch = torch.stack([images[i] for i in members])
        fitted = TF.center_crop(TF.resize(batch, [side], InterpolationMode.BILINEAR), [side, side])
        out[torch.as_tensor(members, device=out.device)] = fitted
    return out


def _flip(images: Tensor, flip: Tensor) -> Tensor:
    chosen = torch.nonzero(flip).flatten()
    if len(chosen):
        index = chosen.to(images.device)
        images = images.clone()
        images[index] = TF.horizontal_flip(images[index])
    return images


def _randaugment(images: Tensor, params: BatchParams, recipe: AugmentRecipe) -> Tensor:
    """Apply each op slot to the samples that drew it, one call per (op, argument) group."""
    side = recipe.image_size
    for slot in range(params.ops.shape[1]):
        groups: dict[tuple[int, object], list[int]] = {}
        for i, (op, magnitude, sign, applied) in enumerate(zip(
            params.ops[:, slot].tolist(), params.magnitudes[:, slot].tolist(), params.signs[:, slot].tolist(),
            params.applied[:, slot].tolist(), strict=True,
        )):
            spec = recipe.pool[op]
            if applied and spec.name != "Identity":
                groups.setdefault((op, op_argument(spec, magnitude, sign, side)), []).append(i)
        for (op, argument), members in groups.items():
            index = torch.as_tensor(members, device=images.device)
            images[index] = TENSOR_OPS[recipe.pool[op].name](images[index], argument)
    return images


def _cutout(images: Tensor, params: BatchParams) -> Tensor:
    if not bool(params.has_cutout.any()):
        return images
    boxes = params.cutout.to(images.device)
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    inside_rows = (rows[None, :] >= boxes[:, 0:1]) & (rows[None, :] <= boxes[:, 2:3])  # [B, H]
    inside_cols = (cols[None, :] >= boxes[:, 1:2]) & (cols[None, :] <= boxes[:, 3:4])  # [B, W]
    mask = inside_rows[:, :, None] & inside_cols[:, None, :] & params.has_cutout.to(images.device)[:, None, None]
    return images.masked_fill(mask[:, None], CUTOUT_FILL)


def render_batch(images: Sequence[Tensor] | Tensor, params: BatchParams, recipe: AugmentRecipe) -> Tensor:
    """Apply B views' parameters to B uint8 RGB images ([3, H_i, W_i] each, or one [B, 3, H, W] tensor) on
    their device; returns uint8 [B, 3, S, S] (S = recipe.image_size) on the same device."""
    if len(images) != len(params):
        raise ValueError(f"{len(images)} images but parameters for {len(params)} views")
    out = _geometry(images, params, recipe)
    if params.ops.shape[1]:
        out = _randaugment(out, params, recipe)
    return _cutout(out, params)


def normalize_batch(
    images: Tensor, mean: Sequence[float], std: Sequence[float], *, channels_last: bool = False
) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W] scaled to [0, 1] and normalized (ToTensor + Normalize)."""
    out = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(mean), list(std))
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
