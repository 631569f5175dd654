"""The dataset registry (one frozen `DatasetSpec` per dataset) and `load_split`, the one entry point that
turns a dataset name (+ optional local directory) into a `SampleTable`.

Sources, chosen by `data_dir`:
- None: the Hugging Face hub (`datasets.load_dataset(spec.hf_id, spec.hf_config)`, cached by `datasets`);
- a directory written by `save_to_disk` (a DatasetDict with splits, or a single Dataset);
- an MNIST-style IDX folder (`t10k-images-idx3-ubyte.gz` ...);
- an image-folder tree, `root/<class>/<file>` or `root/<split>/<class>/<file>`.
`digits` always reads scikit-learn's bundled handwritten digits (the offline demo).

Splits: "train" / "test" map to the source's own names (`spec.train_split` / `spec.test_split`, then the
usual spellings: train/training, test/testing/validation/val/valid). A source with a single split (an
IDX test set, a flat class-folder tree, a dataset that only ships a test set such as the ImageNet
variants) is divided by a deterministic stratified holdout: `holdout_fraction` of each class goes to
"test", chosen by a hash of (seed, key), so it does not depend on file order. `holdout_fraction=0` is the
transductive setting: "train" and "test" are both the whole split.

Class order is the prompt file's (`prompts/<spec.prompts>.json`): folder names and label names are
matched to it through the file's `folder_names` (e.g. EuroSAT's "AnnualCrop"), the class names, or numeric
ids; see `sources.ClassSpace`. Keys, fingerprints and corrupt-image handling: see `sources`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from zeroshot_adapt.data.base import SampleTable
from zeroshot_adapt.data.sources import (
    TEST_SPLIT_NAMES,
    TRAIN_SPLIT_NAMES,
    ArraySource,
    ClassSpace,
    HFDiskSource,
    HubSource,
    IdxSource,
    ImageFolderSource,
    Source,
    holdout_positions,
    is_idx_folder,
    is_image_folder,
    is_saved_hf_dataset,
    pick_split,
)
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.registry import Registry
from zeroshot_adapt.resources import prompts_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one dataset.

    train_split / test_split: the source's own split names ("validation" for Food-101's test split);
        test_split is None when the dataset ships a single split (then train/test are a holdout of it).
    image_column / label_column: Hugging Face column names (label_column None: unlabeled).
    prompts: stem of the prompt file in prompts/ that fixes class names, class order and templates.
    overrides: dotted config overrides the dataset recommends (e.g. {"data.image_size": 32}); apply with
        `config.apply_mapping(config, dict(spec.overrides))`.
    hflip: whether horizontal flips are label-preserving (False for digits and traffic signs); the default of
        `data.hflip`.
    imagenet_classes: its classes are ImageNet-1k classes (ImageNet and its variants): a student initialised
        from weights trained with ImageNet labels would leak labels into a zero-shot result.
    num_classes: expected class count (None: whatever the data has, for `imagefolder`).
    gated: the hub copy needs accepted terms and a login.
    notes: quirks and anything unverified about the hub copy.
    """

    name: str
    hf_id: str | None
    hf_config: str | None = None
    train_split: str | None = "train"
    test_split: str | None = "test"
    image_column: str = "image"
    label_column: str | None = "label"
    prompts: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict, hash=False)
    hflip: bool = True
    imagenet_classes: bool = False
    num_classes: int | None = None
    gated: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    @property
    def single_split(self) -> bool:
        return self.test_split is None

    def class_space(self) -> ClassSpace | None:
        """Class names (and folder aliases) from the spec's prompt file; None if it has none."""
        if self.prompts is None or not (prompts_dir() / f"{self.prompts}.json").is_file():
            return None
        from zeroshot_adapt.teacher.prompts import load_prompts

        prompt_set = load_prompts(self.prompts)
        return ClassSpace(
            names=tuple(prompt_set.classes),
            folder_names=tuple(prompt_set.folder_names) if prompt_set.folder_names else None,
            source=f"prompts/{self.prompts}.json",
        )


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS.add(spec.name, spec)
    return spec


# ---- Ecosystem names (CLIP_benchmark's `--dataset` spellings) accepted as aliases of registered datasets.
# An alias names the dataset, not CLIP_benchmark's split protocol: our own protocol (the registered
# spec's splits, or the holdout of a single-split source) applies and is recorded in every suite record.
DATASET_ALIASES: Mapping[str, str] = MappingProxyType({
    "imagenet1k": "imagenet",
    "imagenet-1k": "imagenet",
    "imagenetv2": "imagenet-v2",
    "imagenet_sketch": "imagenet-sketch",
    "imagenet_a": "imagenet-a",
    "imagenet_r": "imagenet-r",
    "flowers": "flowers102",
    "food-101": "food101",
})
ALIAS_PREFIXES = ("wds/", "vtab/")  # CLIP_benchmark's webdataset and VTAB namespaces: `vtab/eurosat` -> eurosat


def canonical_dataset_name(name: str) -> str:
    """The registered name for `name`: itself, an alias (`imagenet1k`), or a CLIP_benchmark namespaced name
    (`vtab/flowers`, `wds/imagenetv2`); a UserError listing registered names and aliases otherwise."""
    candidate = str(name).strip()
    for prefix in ALIAS_PREFIXES:  # `wds/vtab/dtd` strips both
        if candidate.startswith(prefix):
            candidate = candidate[len(prefix):]
    candidate = DATASET_ALIASES.get(candidate, candidate)
    if candidate in DATASETS:
        return candidate
    aliases = ", ".join(f"{alias} -> {target}" for alias, target in sorted(DATASET_ALIASES.items()))
    raise UserError(
        f"unknown dataset {name!r}; valid: {', '.join(DATASETS.names())} "
        f"(aliases: {aliases}; a 'vtab/' or 'wds/' prefix is accepted)"
    )


def get_spec(name: str) -> DatasetSpec:
    """The spec registered as `name` (or as the dataset an alias names); a UserError listing the valid names
    otherwise."""
    return DATASETS.get(canonical_dataset_name(name))


def dataset_names() -> list[str]:
    return DATASETS.names()


def dataset_aliases(name: str) -> list[str]:
    """The aliases that resolve to the registered dataset `name` (for listings)."""
    return sorted(alias for alias, target in DATASET_ALIASES.items() if target == name)


# View presets (issue 8): the transform recipe is an explicit config value, never inferred from the size.
# REFERENCE.md section 1: ImageNet-scale views are RandomResizedCrop(224) (+ flip) / + RandAugment; the paper's
# appendix runs EuroSAT, MNIST, DTD, GTSRB and Flowers102 "following the training recipe of ImageNet-1K" (224 px).
IMAGENET_VIEWS = {"data.image_size": 224, "data.augment": "imagenet"}
# The FixMatch CIFAR recipe (pad-and-crop, RandAugment + Cutout) at 32 px: the CIFAR SSL benchmarks.
SMALL_IMAGES = {"data.image_size": 32, "data.augment": "small"}
# The offline demo (`zsa adapt --dataset digits`): the bundled tiny CLIP teacher, a small CNN student on
# 16 px inputs (the scans are 8x8), 300 steps of FixMatch-style training: minutes on 2 CPU cores.
# Short runs need a fast EMA teacher: at 0.99 (half-life ~70 steps) 37% of the teacher is still its random
# init after 100 steps and it never reaches the confidence threshold; 0.9 (half-life ~7 steps) tracks the student.
DIGITS_DEMO = {
    "data.image_size": 16,
    "data.augment": "small",
    "teacher.model": "zsa-tiny-digits",
    "teacher.pretrained": "bundled",
    "teacher.batch_size": 512,
    "student.arch": "zsa_cnn_small",
    "student.ema_momentum": 0.9,
    "algorithm.threshold": 0.95,
    "algorithm.tau": 0.5,
    "algorithm.prior_momentum": 0.99,
    "algorithm.lambda_u": 1.0,
    "optim.batch_size": 32,
    "optim.mu": 4,
    "optim.lr": 0.03,
    "optim.weight_decay": 5e-4,
    "optim.nesterov": True,
    "optim.epochs": 6,
    "optim.steps_per_epoch": 50,
    "optim.warmup_epochs": 0.5,
    "checkpoint_every_steps": 50,
}

for _spec in (
    DatasetSpec(
        "eurosat",
        "tanganke/eurosat",
        prompts="eurosat",
        num_classes=10,
        overrides=IMAGENET_VIEWS,
        notes="64x64 Sentinel-2 RGB tiles; ClassLabel names are the CLIP-style names (0 = 'annual crop land'). "
        "Protocols differ (27k / 5.4k / 8.1k test images): this one is tanganke's train/test split.",
    ),
    DatasetSpec(
        "mnist",
        "ylecun/mnist",
        prompts="mnist",
        num_classes=10,
        overrides=IMAGENET_VIEWS,
        hflip=False,
        notes="28x28 grayscale (converted to RGB); 60k train / 10k test.",
    ),
    DatasetSpec(
        "cifar10",
        "uoft-cs/cifar10",
        image_column="img",
        prompts="cifar10",
        num_classes=10,
        overrides=SMALL_IMAGES,
        notes="image column is 'img'.",
    ),
    DatasetSpec(
        "cifar100",
        "uoft-cs/cifar100",
        image_column="img",
        label_column="fine_label",
        prompts="cifar100",
        num_classes=100,
        overrides=SMALL_IMAGES,
        notes="columns 'img' and 'fine_label' (also has 'coarse_label').",
    ),
    DatasetSpec(
        "food101",
        "ethz/food101",
        test_split="validation",
        prompts="food101",
        num_classes=101,
        overrides=IMAGENET_VIEWS,
        notes="its 25,250-image test split is named 'validation'.",
    ),
    DatasetSpec("dtd", "tanganke/dtd", prompts="dtd", num_classes=47, overrides=IMAGENET_VIEWS),
    DatasetSpec(
        "gtsrb",
        "tanganke/gtsrb",
        prompts="gtsrb",
        num_classes=43,
        overrides=IMAGENET_VIEWS,
        hflip=False,
        notes="no flips: several signs differ only by direction (left/right curve, keep left/right).",
    ),
    DatasetSpec(
        "flowers102",
        "dpdl-benchmark/oxford_flowers102",
        prompts="flowers102",
        num_classes=102,
        overrides=IMAGENET_VIEWS,
        notes="splits train 1,020 / validation 1,020 / test 6,149; not nelorth/oxford-flowers (its label "
        "names are strings in lexicographic order).",
    ),
    DatasetSpec(
        "imagenet",
        "ILSVRC/imagenet-1k",
        test_split="validation",
        prompts="imagenet",
        num_classes=1000,
        overrides=IMAGENET_VIEWS,
        imagenet_classes=True,
        gated=True,
        notes="gated on the hub; its 'test' split has no labels, so test = 'validation' (50k).",
    ),
    DatasetSpec(
        # CLIP_benchmark's webdataset conversion: split 'test', columns 'webp' (image) and 'cls' (ImageNet label
        # id), as two independent public projects read it (`load_dataset("clip-benchmark/wds_imagenetv2")
        # ["test"]`, then item["webp"] / item["cls"]). Not loaded from here (no network): `pytest -m network`.
        "imagenet-v2",
        "clip-benchmark/wds_imagenetv2",
        train_split="test",
        test_split=None,
        image_column="webp",
        label_column="cls",
        prompts="imagenet-v2",
        overrides=IMAGENET_VIEWS,
        imagenet_classes=True,
        num_classes=1000,
        notes="matched-frequency, 10k images, test set only; local folders are named '0'..'999'.",
    ),
    DatasetSpec(
        # Hub copy checked against its dataset card (parquet: image, wnid, class_name); both its config and its
        # split are named 'test' (REFERENCE.md section 4).
        "imagenet-r",
        "axiong/imagenet-r",
        hf_config="test",
        train_split="test",
        test_split=None,
        label_column="wnid",
        prompts="imagenet-r",
        overrides=IMAGENET_VIEWS,
        imagenet_classes=True,
        num_classes=200,
        notes="30k renditions of 200 ImageNet classes; labels are WordNet ids mapped to prompts/imagenet-r.json.",
    ),
    DatasetSpec(
        # Hub copy checked against its viewer (parquet: image, label ClassLabel named by WordNet id; one
        # split called 'train').
        "imagenet-a",
        "barkermrl/imagenet-a",
        train_split="train",
        test_split=None,
        prompts="imagenet-a",
        overrides=IMAGENET_VIEWS,
        imagenet_classes=True,
        num_classes=200,
        notes="7.5k natural adversarial images of 200 ImageNet classes; test set only.",
    ),
    DatasetSpec(
        # CLIP_benchmark's webdataset conversion: split 'test', columns 'jpg' (image; not 'webp' as in its
        # ImageNetV2 copy) and 'cls' (ImageNet label id) (REFERENCE.md section 4).
        "imagenet-sketch",
        "clip-benchmark/wds_imagenet_sketch",
        train_split="test",
        test_split=None,
        image_column="jpg",
        label_column="cls",
        prompts="imagenet-sketch",
        overrides=IMAGENET_VIEWS,
        imagenet_classes=True,
        num_classes=1000,
        notes="50,889 sketches of the 1000 ImageNet classes; test set only (songweig/imagenet_sketch is a "
        "loading script, which datasets>=4 no longer runs).",
    ),
    DatasetSpec(
        "digits",
        None,
        prompts="digits",
        num_classes=10,
        overrides=DIGITS_DEMO,
        hflip=False,
        notes="scikit-learn's 1,797 8x8 handwritten digits (offline demo); split = demo.tiny_clip.digits_split().",
    ),
    DatasetSpec(
        "imagefolder",
        None,
        label_column=None,
        overrides=IMAGENET_VIEWS,
        notes="your own data: pass data_dir; classes are the sorted class-folder names.",
    ),
):
    register_dataset(_spec)


def _digits_source(classes: ClassSpace | None) -> Source:
    from zeroshot_adapt.demo.tiny_clip import digits_images, digits_split

    images, labels = digits_images()
    train_idx, test_idx = digits_split()
    return ArraySource(
        np.asarray(images, dtype=np.uint8),
        np.asarray(labels, dtype=np.int64),
        {"train": np.asarray(train_idx), "test": np.asarray(test_idx)},
        classes,
        "scikit-learn digits",
    )


def open_source(
    spec: DatasetSpec,
    data_dir: str | None,
    classes: ClassSpace | None,
    *,
    hf_id: str | None = None,
    hf_revision: str | None = None,
    fingerprint: str = "stat",
    unlabeled: bool = False,
) -> Source:
    """The Source that `data_dir` (or the hub, or the bundled digits) describes, making content ids by
    `fingerprint` ("stat" or "content", see `sources`). unlabeled: an image folder is read as one
    unlabeled pool, its subfolders being organisation, not classes (`ImageFolderSource`).

    hf_id / hf_revision: read another hub repository (or a branch / tag / commit of it, such as the
    parquet export ``refs/convert/parquet``) instead of the spec's; only without `data_dir`."""
    return _open_source(spec, data_dir, classes, hf_id=hf_id, hf_revision=hf_revision,
                        unlabeled=unlabeled).with_fingerprint(fingerprint)


def _open_source(
    spec: DatasetSpec, data_dir: str | None, classes: ClassSpace | None, *, hf_id: str | None, hf_revision: str | None,
    unlabeled: bool = False,
) -> Source:
    if spec.name == "digits":
        if data_dir is not None:
            raise UserError(f"dataset 'digits' is bundled with scikit-learn; do not pass data_dir={data_dir!r}")
        return _digits_source(classes)
    if data_dir is None:
        if (hf_id or spec.hf_id) is None:
            raise UserError(f"dataset {spec.name!r} has no hub copy: pass --data-dir (data.data_dir) with its files")
        return HubSource(
            dataset=spec.name,
            hf_id=hf_id or spec.hf_id,
            revision=hf_revision,
            hf_config=spec.hf_config,
            split_names=[spec.train_split or "", spec.test_split or ""],
            image_column=spec.image_column,
            label_column=spec.label_column,
            classes=classes,
            gated=spec.gated,
        )
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"data_dir {data_dir!r} for dataset {spec.name!r} does not exist")
    if not path.is_dir():
        raise UserError(f"data_dir {data_dir!r} for dataset {spec.name!r} is not a directory")
    if is_saved_hf_dataset(path):
        return HFDiskSource(path, image_column=spec.image_column, label_column=spec.label_column, classes=classes)
    if is_idx_folder(path):
        return IdxSource(path, classes)
    if is_image_folder(path):
        return ImageFolderSource(path, classes, unlabeled=unlabeled)
    raise UserError(
        f"data_dir {data_dir!r} holds no images: expected an image folder (root/<class>/<image> or "
        "root/<split>/<class>/<image>), a save_to_disk directory, or MNIST IDX files"
    )


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    source_split: str | None = None,
    hf_id: str | None = None,
    hf_revision: str | None = None,
    fingerprint: str = "stat",
    unlabeled: bool = False,
) -> SampleTable:
    """Load the "train" or "test" split of a registered dataset as a SampleTable.

    split: "train" or "test" (mapped to the source's own split names), or the name of one of the source's
        splits (e.g. "validation"), which is then read as-is, like `source_split`.
    source_split: read this split of the source as-is instead of the spec's default (e.g. "validation").
    holdout_fraction / seed: the stratified holdout used when the source has a single split (0: train and
        test are both the whole split).
    hf_id / hf_revision: another hub repository / revision than the spec's (see `open_source`).
    fingerprint: how per-sample content ids (and so the split's fingerprint) are made: "stat" (size,
        modification time and inode of each file) or "content" (sha256 of each file's bytes); see `sources`.
    unlabeled: read an image folder as one unlabeled pool (see `open_source`).
    """
    spec = get_spec(dataset)
    if split not in SPLITS and source_split is None:
        source_split = split
    if not 0.0 <= holdout_fraction < 1.0:
        raise UserError(f"holdout_fraction={holdout_fraction!r} must be in [0, 1)")
    classes = spec.class_space()
    if classes is not None and spec.num_classes is not None and len(classes) != spec.num_classes:
        raise UserError(f"{classes.source} lists {len(classes)} classes; dataset {spec.name!r} has {spec.num_classes}")
    source = open_source(spec, data_dir, classes, hf_id=hf_id, hf_revision=hf_revision, fingerprint=fingerprint,
                         unlabeled=unlabeled)
    names = source.split_names()

    if source_split is not None:
        chosen = source.resolve_split(source_split)
        if chosen is None:
            raise UserError(
                f"{source.description} has no split {source_split!r}; ask for {' or '.join(SPLITS)}, "
                f"or one of its own splits: {', '.join(names)}"
            )
        table = source.read(chosen).to_table(spec.name, split)
        log.info("%s/%s: %d samples from split %r of %s", spec.name, split, len(table), chosen, source.description)
        return table

    train_name = pick_split(names, [spec.train_split, *TRAIN_SPLIT_NAMES])
    test_name = pick_split(names, [spec.test_split, *TEST_SPLIT_NAMES])
    if train_name is not None and test_name is not None and train_name != test_name:
        chosen = train_name if split == "train" else test_name
        table = source.read(chosen).to_table(spec.name, split)
        log.info("%s/%s: %d samples from split %r of %s", spec.name, split, len(table), chosen, source.description)
        return table

    single = train_name or test_name or (names[0] if len(names) == 1 else None)
    if single is None:
        raise UserError(
            f"{source.description}: cannot tell which split is {split!r}; it has {', '.join(names)} "
            "(pass source_split / data.train_split / data.test_split)"
        )
    whole = source.read(single)
    train_positions, test_positions = holdout_positions(whole.keys, whole.labels, holdout_fraction, seed)
    positions = train_positions if split == "train" else test_positions
    if len(positions) == 0:
        raise UserError(
            f"the {split} split of {spec.name} is empty: a {100 * holdout_fraction:.0f}% holdout of "
            f"{len(whole.keys)} image(s) of {source.description} leaves none for it; add images, or set "
            "data.holdout_fraction=0 to use them all for both (the transductive setting)"
        )
    table = whole.to_table(spec.name, split, positions)
    log.info(
        "%s/%s: %d of %d samples of split %r of %s (stratified holdout %.0f%%, seed %d)",
        spec.name,
        split,
        len(table),
        len(whole.keys),
        single,
        source.description,
        100 * holdout_fraction,
        seed,
    )
    return table
