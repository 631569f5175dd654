"""Weak / strong / eval transforms, the two RandAugment recipes and their parameter ranges.

The RandAugment statistics are judged from the drawn parameters (op ids, magnitudes, signs, coin flips),
not from pixels: ``augment_ops.sample_view`` is what both pipelines draw from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from zeroshot_adapt.data import augment_ops as ops
from zeroshot_adapt.data import transforms as zt
from zeroshot_adapt.data.augment_ops import (
    FIXMATCH_POOL,
    IMAGENET_POOL,
    PIL_OPS,
    OpSpec,
    op_argument,
    recipe_for,
    sample_view,
)
from zeroshot_adapt.data.transforms import Cutout, RandAugment, build_transforms

IMAGENET_NAMES = {
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize", "Rotate",
    "Sharpness", "ShearX", "ShearY", "Solarize", "SolarizeAdd", "TranslateX", "TranslateY", "Invert",
}  # fmt: skip
FIXMATCH_NAMES = IMAGENET_NAMES - {"Invert", "SolarizeAdd"}  # FixMatch paper Table 12
DRAWS = 10_000
OFFICIAL_UNTOUCHED = 1 / 256  # Identity twice: (1/16)^2, about 0.4%


def photo(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """A colourful, noisy, mid-range image (values 40..200) on which every op except Identity acts."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([40 + 160 * x / width, 40 + 160 * y / height, 120 + 0 * x], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 40, 200).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def strong_draws(recipe, n: int = DRAWS, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [sample_view(recipe, 300, 400, strong=True, generator=generator) for _ in range(n)]


@pytest.mark.parametrize(("size", "recipe"), [(224, "imagenet"), (32, "small"), (64, "small"), (96, "imagenet")])
def test_shapes_and_auto_recipe(size, recipe):
    views = build_transforms(size)
    assert views.recipe == recipe and views.spec.name == recipe
    image = photo(300, 200) if size > 64 else photo(20, 24)
    for view in (views.weak, views.strong, views.eval):
        out = view(image)
        assert out.shape == (3, size, size) and out.dtype == torch.float32


def test_recipe_can_be_forced_and_bad_values_fail():
    assert build_transforms(32, recipe="imagenet").recipe == "imagenet"
    assert build_transforms(224, recipe="small").weak(photo()).shape == (3, 224, 224)
    with pytest.raises(ValueError):
        build_transforms(32, recipe="cifar")  # type: ignore[arg-type]


def test_eval_is_deterministic_and_normalized_with_imagenet_statistics():
    views = build_transforms(32)
    gray = Image.new("RGB", (40, 40), (128, 128, 128))
    out = views.eval(gray)
    expected = (128 / 255 - torch.tensor(zt.IMAGENET_MEAN)) / torch.tensor(zt.IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.equal(views.eval(photo()), views.eval(photo()))


def test_imagenet_eval_is_resize_then_center_crop():
    views = build_transforms(224)
    image = photo(512, 256)
    manual = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(zt.IMAGENET_MEAN, zt.IMAGENET_STD)])
    assert torch.allclose(views.eval(image), manual(image))


@pytest.mark.parametrize("size", [32, 224])
def test_views_are_deterministic_under_a_torch_seed(size):
    views = build_transforms(size)
    image = photo(64, 64)
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        outputs.append((views.weak(image), views.strong(image)))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    torch.manual_seed(124)
    assert not torch.equal(views.strong(image), outputs[0][1])


def test_imagenet_weak_view_is_torchvisions_random_resized_crop_and_flip():
    """The crop sampler makes torchvision's RNG calls: under one seed the weak view equals
    RandomResizedCrop + RandomHorizontalFlip, i.e. the weak view did not change with the rewrite."""
    views = build_transforms(96)
    reference = T.Compose([T.RandomResizedCrop(96), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(zt.IMAGENET_MEAN, zt.IMAGENET_STD)])
    image = photo(150, 110)
    for seed in range(10):
        torch.manual_seed(seed)
        ours = views.weak(image)
        torch.manual_seed(seed)
        assert torch.allclose(ours, reference(image), atol=1e-6), seed


def test_strong_differs_from_weak_with_the_same_random_crop():
    """Weak and strong draw the same crop/flip from the same seed; strong then adds RandAugment (+Cutout).
    imagenet: every drawn op applied, so only Identity twice (1/256) leaves it equal to weak."""
    image = photo(64, 64)
    for size in (32, 96):
        views = build_transforms(size)
        differ = 0
        for seed in range(10):
            torch.manual_seed(seed)
            weak = views.weak(image)
            torch.manual_seed(seed)
            strong = views.strong(image)
            differ += int(not torch.equal(weak, strong))
        assert differ == 10, size


def test_hflip_option_removes_every_flip():
    for size in (32, 224):
        for hflip in (True, False):
            spec = build_transforms(size, hflip=hflip).spec
            flips = [p.flip for p in strong_draws(spec, 400)]
            assert (0.4 < np.mean(flips) < 0.6) if hflip else not any(flips), (size, hflip)


def test_small_weak_view_without_flip_only_translates():
    """hflip=False, small recipe: the weak view is a shifted copy, never a mirrored one."""
    image = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3)))  # dark->bright
    views = build_transforms(32, hflip=False)
    for seed in range(20):
        torch.manual_seed(seed)
        out = views.weak(image)[0]
        assert out[16, 20] > out[16, 10]  # still increasing left to right


def test_pools_hold_the_official_ops():
    assert {op.name for op in IMAGENET_POOL} == IMAGENET_NAMES and len(IMAGENET_POOL) == 16
    assert {op.name for op in FIXMATCH_POOL} == FIXMATCH_NAMES and len(FIXMATCH_POOL) == 14
    assert recipe_for("imagenet", 224).pool == IMAGENET_POOL and recipe_for("small", 32).pool == FIXMATCH_POOL
    assert "Cutout" not in {op.name for op in IMAGENET_POOL}


def test_every_pil_op_acts_except_identity():
    image = photo()
    for spec in IMAGENET_POOL:
        out = PIL_OPS[spec.name](image, op_argument(spec, 9, 1, image.width))
        assert out.size == image.size and out.mode == "RGB", spec.name
        changed = not np.array_equal(np.asarray(out), np.asarray(image))
        assert changed == (spec.name != "Identity"), spec.name


# (name, argument at v=1, argument at v=9), sign +1, side 224: the official value = v * max / 10 + bias
IMAGENET_RANGES = [
    ("Brightness", 0.28, 1.72), ("Color", 0.28, 1.72), ("Contrast", 0.28, 1.72), ("Sharpness", 0.28, 1.72),
    ("Posterize", 4, 7),  # int(v * 4 / 10) + 4 bits
    ("Rotate", 3, 27),  # int(v * 30 / 10) degrees
    ("ShearX", 0.03, 0.27), ("ShearY", 0.03, 0.27),
    ("TranslateX", 10, 90), ("TranslateY", 10, 90),  # int(v * 0.45 / 10 * 224) px
    ("Solarize", 231, 26),  # 256 - int(v * 256 / 10)
    ("SolarizeAdd", 11, 99),  # int(v * 110 / 10), then solarize at 128
    ("AutoContrast", None, None), ("Equalize", None, None), ("Identity", None, None), ("Invert", None, None),
]
SMALL_RANGES = [  # FixMatch: enhance 0.9 * v / 10 + 0.05; translate up to 0.3 of the side (32 px)
    ("Brightness", 0.14, 0.86), ("Color", 0.14, 0.86), ("Contrast", 0.14, 0.86), ("Sharpness", 0.14, 0.86),
    ("Posterize", 4, 7), ("Rotate", 3, 27), ("ShearX", 0.03, 0.27), ("Solarize", 231, 26),
    ("TranslateX", 0, 8),  # int(0.03 * 32) = 0: the official int() truncation makes v=1 a no-op at 32 px
]


@pytest.mark.parametrize(("pool", "side", "table"), [(IMAGENET_POOL, 224, IMAGENET_RANGES),
                                                     (FIXMATCH_POOL, 32, SMALL_RANGES)])
def test_op_arguments_at_magnitudes_1_and_9(pool, side, table):
    specs = {spec.name: spec for spec in pool}
    for name, at_1, at_9 in table:
        for magnitude, expected in ((1, at_1), (9, at_9)):
            value = op_argument(specs[name], magnitude, 1, side)
            assert value == (None if expected is None else pytest.approx(expected)), (name, magnitude, value)
            if name in ops.SIGNED_OPS:
                assert op_argument(specs[name], magnitude, -1, side) == pytest.approx(-expected), name
            elif expected is not None:
                assert op_argument(specs[name], magnitude, -1, side) == pytest.approx(expected), name


def test_imagenet_randaugment_applies_every_drawn_op_and_leaves_0_4_percent_untouched():
    draws = strong_draws(recipe_for("imagenet", 224))
    assert all(len(p.ops) == 2 and all(p.applied) for p in draws)  # n = 2, no coin flip
    identity = [spec.name for spec in IMAGENET_POOL].index("Identity")
    untouched = np.mean([all(op == identity for op in p.ops) for p in draws])
    assert abs(untouched - OFFICIAL_UNTOUCHED) < 0.01, untouched  # within 1 percentage point of 0.4%
    assert untouched < 0.02  # the old per-op coin flip left ~28% untouched


def test_op_choice_is_uniform_and_magnitudes_cover_1_to_9():
    for name in ("imagenet", "small"):
        recipe = recipe_for(name, 224)
        draws = strong_draws(recipe)
        chosen = np.array([op for p in draws for op in p.ops])
        counts = np.bincount(chosen, minlength=len(recipe.pool))
        expected = len(chosen) / len(recipe.pool)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 37.7, (name, counts)  # chi-square, 15 degrees of freedom, p = 0.001 (fixed seed)
        magnitudes = np.array([m for p in draws for m in p.magnitudes])
        assert set(magnitudes.tolist()) == set(range(1, 10))
        assert np.abs(np.bincount(magnitudes, minlength=10)[1:] / len(magnitudes) - 1 / 9).max() < 0.01
        signs = np.array([s for p in draws for s in p.signs])
        assert set(signs.tolist()) == {-1, 1} and abs((signs > 0).mean() - 0.5) < 0.02


def test_small_recipe_applies_each_op_with_probability_half_and_always_cuts_out():
    recipe = recipe_for("small", 32)
    draws = strong_draws(recipe)
    applied = np.array([p.applied for p in draws])  # [N, 2]
    assert abs(applied.mean() - 0.5) < 0.02
    assert abs(np.corrcoef(applied[:, 0], applied[:, 1])[0, 1]) < 0.05  # independent coin flips
    identity = [spec.name for spec in FIXMATCH_POOL].index("Identity")
    no_op = np.mean([all(not a or op == identity for op, a in zip(p.ops, p.applied, strict=True)) for p in draws])
    assert abs(no_op - (0.5 + 0.5 / 14) ** 2) < 0.02  # RandAugment alone leaves ~29% unchanged ...
    assert all(p.cutout is not None for p in draws)  # ... but Cutout is always applied
    assert all(p.cutout is None for p in strong_draws(recipe_for("imagenet", 32), 200))  # imagenet: no Cutout


def test_randaugment_alone_is_deterministic_and_follows_the_probability():
    image = photo(32, 32)
    torch.manual_seed(0)
    first = np.asarray(RandAugment()(image))
    torch.manual_seed(0)
    assert np.array_equal(first, np.asarray(RandAugment()(image)))
    unchanged = 0
    torch.manual_seed(1)
    for _ in range(200):
        unchanged += int(np.array_equal(np.asarray(RandAugment(op_probability=0.0)(image)), np.asarray(image)))
    assert unchanged == 200
    assert "ops=16" in repr(RandAugment()) and isinstance(IMAGENET_POOL[0], OpSpec)


def test_cutout_paints_a_gray_square_of_half_the_side():
    """The official CutoutAbs: side int(0.5 * 32) = 16, drawn with PIL's inclusive rectangle (17 x 17 inside the
    image), shifted (not clipped) at the top/left border, clipped at the bottom/right border."""
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    torch.manual_seed(0)
    painted = [(np.asarray(Cutout()(image))[..., 0] == ops.CUTOUT_FILL) for _ in range(200)]
    areas = [int(mask.sum()) for mask in painted]
    assert max(areas) == 17 * 17 and min(areas) >= 8 * 8  # never empty
    for mask in painted:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one solid rectangle
