"""Dataset registry, sources, stable keys, fingerprints, holdouts, corrupt images and prompt files."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import FOLDER_CLASSES, build_hf_dataset, tiny_image, write_image_folder

from zeroshot_adapt.config import RunConfig, apply_mapping
from zeroshot_adapt.data import (
    UNKNOWN_LABEL,
    CorruptImageError,
    DatasetSpec,
    dataset_names,
    get_spec,
    load_split,
    scan_images,
    sources,
)
from zeroshot_adapt.data.sources import ClassSpace, holdout_positions, read_idx
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.resources import prompts_dir

EUROSAT_FOLDERS = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def key_to_label(table) -> dict[str, int]:
    return dict(zip(table.keys, (int(x) for x in table.labels), strict=True))


# ------------------------------------------------------------------------------------- registry


def test_registry_has_every_dataset_with_its_quirks():
    expected = {
        "eurosat", "mnist", "cifar10", "cifar100", "food101", "dtd", "gtsrb", "flowers102", "imagenet",
        "imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-a", "digits",
    }  # fmt: skip
    assert expected <= set(dataset_names())
    assert get_spec("cifar10").image_column == "img"
    assert (get_spec("cifar100").image_column, get_spec("cifar100").label_column) == ("img", "fine_label")
    assert get_spec("food101").test_split == "validation"
    assert get_spec("flowers102").hf_id == "dpdl-benchmark/oxford_flowers102"
    assert get_spec("eurosat").hf_id == "tanganke/eurosat"
    assert get_spec("imagenet").hf_id == "ILSVRC/imagenet-1k" and get_spec("imagenet").gated
    for name in ("imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch"):
        assert get_spec(name).test_split is None, name  # test set only: train/test are a holdout of it
    for name in ("digits", "mnist", "gtsrb"):
        assert not get_spec(name).hflip, name


def test_specs_are_frozen_and_overrides_are_valid_config_keys():
    spec = get_spec("cifar10")
    with pytest.raises(AttributeError):
        spec.hf_id = "somewhere/else"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.overrides["data.image_size"] = 1  # type: ignore[index]
    for name in dataset_names():
        config = apply_mapping(RunConfig(), dict(get_spec(name).overrides))  # raises on an unknown key
        assert config.data.image_size >= 8
    assert apply_mapping(RunConfig(), dict(get_spec("cifar10").overrides)).data.image_size == 32


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(UserError) as info:
        load_split("cifar11", "train")
    assert "'cifar11'" in str(info.value) and "cifar10" in str(info.value) and "eurosat" in str(info.value)


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(UserError) as info:
        load_split("eurosat", "train", data_dir=str(missing))
    assert str(missing) in str(info.value) and "eurosat" in str(info.value)


def test_a_directory_without_images_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no images"):
        load_split("imagefolder", "train", data_dir=str(tmp_path))


def test_bad_holdout_fraction_and_unknown_source_split(image_folder_tree):
    with pytest.raises(UserError, match="holdout_fraction"):
        load_split("imagefolder", "train", data_dir=str(image_folder_tree), holdout_fraction=1.0)
    with pytest.raises(UserError, match="'validation'"):
        load_split("imagefolder", "validation", data_dir=str(image_folder_tree))


# --------------------------------------------------------------------------------- hub (offline)


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """Behave as on a machine without network and with empty caches: the probe fails, so datasets runs
    cache-only and finds nothing."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))


def test_offline_hub_is_a_user_error_naming_dataset_hub_id_and_the_alternative(hub_unreachable):
    with pytest.raises(UserError) as info:
        load_split("cifar10", "train")
    message = str(info.value)
    assert "'cifar10'" in message and "uoft-cs/cifar10" in message
    assert "--data-dir" in message and "save_to_disk" in message


def test_hub_offline_env_is_respected_and_gated_datasets_say_so(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: pytest.fail("probed the network offline"))
    with pytest.raises(UserError) as info:
        load_split("imagenet", "test")
    assert "ILSVRC/imagenet-1k" in str(info.value) and "gated" in str(info.value)
    assert "'validation'" in str(info.value)  # the test split of ImageNet is its validation split


def test_forced_offline_restores_the_flags():
    import datasets.config
    from huggingface_hub import constants

    before = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with sources.forced_offline(True):
        assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


# ---------------------------------------------------------------------------------- image folders


def test_image_folder_keys_labels_and_class_order(image_folder_tree):
    table = load_split("imagefolder", "test", data_dir=str(image_folder_tree), holdout_fraction=0)
    assert len(table) == len(FOLDER_CLASSES) * 4
    assert list(table.class_names) == sorted(FOLDER_CLASSES)
    for key, label in key_to_label(table).items():
        folder, file = key.split("/")
        assert file.startswith(folder) and table.class_names[label] == folder
    image = table.load_image(0)
    assert image.mode == "RGB" and image.size == (8, 8)


def test_image_folder_keys_survive_relisting_in_another_order(tmp_path):
    first = write_image_folder(tmp_path / "a")
    second = tmp_path / "b"
    for class_dir in sorted(first.iterdir(), reverse=True):  # create folders and files in reverse order
        (second / class_dir.name).mkdir(parents=True)
        for file in sorted(class_dir.iterdir(), reverse=True):
            shutil.copyfile(file, second / class_dir.name / file.name)
    a = load_split("imagefolder", "train", data_dir=str(first))
    b = load_split("imagefolder", "train", data_dir=str(second))
    assert key_to_label(a) == key_to_label(b)
    assert a.fingerprint == load_split("imagefolder", "train", data_dir=str(first)).fingerprint
    # content ids: by stat (size, mtime, inode) a copy is other files; by content hash it is the same data
    assert a.fingerprint != b.fingerprint
    a, b = (load_split("imagefolder", "train", data_dir=str(root), fingerprint="content") for root in (first, second))
    assert a.fingerprint == b.fingerprint and a.content_ids == b.content_ids


def test_fingerprint_changes_when_samples_are_added_removed_or_changed(tmp_path):
    root = write_image_folder(tmp_path / "images")
    base = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0).fingerprint
    extra = root / "cat" / "cat_new.png"
    tiny_image(999).save(extra)
    added = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0)
    assert added.fingerprint != base and "cat/cat_new.png" in added.keys
    extra.unlink()
    assert load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0).fingerprint == base
    tiny_image(7, side=16).save(root / "dog" / "dog_0.png")  # same name, new content (new size)
    assert load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0).fingerprint != base


def test_split_layout_reads_train_and_test_folders(tmp_path):
    write_image_folder(tmp_path / "data" / "train", per_class=3, seed=1)
    write_image_folder(tmp_path / "data" / "test", per_class=2, seed=2)
    train = load_split("imagefolder", "train", data_dir=str(tmp_path / "data"))
    test = load_split("imagefolder", "test", data_dir=str(tmp_path / "data"))
    assert len(train) == 9 and len(test) == 6
    assert all(k.startswith("train/") for k in train.keys) and all(k.startswith("test/") for k in test.keys)
    assert train.class_names == test.class_names


def test_single_split_holdout_is_stratified_disjoint_deterministic_and_order_free(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=10)
    train = load_split("imagefolder", "train", data_dir=str(root), holdout_fraction=0.2, seed=3)
    test = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0.2, seed=3)
    assert not set(train.keys) & set(test.keys)
    assert len(train) + len(test) == 30
    assert np.bincount(test.labels).tolist() == [2, 2, 2]  # 20% of each class
    again = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0.2, seed=3)
    assert again.keys == test.keys and again.fingerprint == test.fingerprint
    other_seed = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0.2, seed=4)
    assert set(other_seed.keys) != set(test.keys)
    # the holdout depends on keys and labels only, not on their order
    keys, labels = list(train.keys) + list(test.keys), np.concatenate([train.labels, test.labels])
    order = np.random.default_rng(0).permutation(len(keys))
    _, shuffled_test = holdout_positions([keys[i] for i in order], labels[order], 0.2, 3)
    assert {keys[order[p]] for p in shuffled_test} == set(test.keys)
    # transductive: both splits are everything
    whole = load_split("imagefolder", "train", data_dir=str(root), holdout_fraction=0)
    assert sorted(whole.keys) == sorted(keys)


def test_loose_images_without_class_folders_are_unlabeled(tmp_path):
    root = tmp_path / "unlabeled"
    root.mkdir()
    for i in range(5):
        tiny_image(i).save(root / f"img_{i}.jpg")
    table = load_split("cifar10", "train", data_dir=str(root), holdout_fraction=0)
    assert len(table) == 5 and (table.labels == UNKNOWN_LABEL).all() and not table.has_labels
    assert table.class_names[0] == "airplane"  # class names still come from the prompt file


def test_original_eurosat_folder_names_map_to_the_prompt_file_order(tmp_path):
    reversed_subset = ["SeaLake", "Forest", "AnnualCrop"]
    root = write_image_folder(tmp_path / "eurosat", classes=reversed_subset, per_class=2)
    table = load_split("eurosat", "test", data_dir=str(root), holdout_fraction=0)
    prompts = json.loads((prompts_dir() / "eurosat.json").read_text())
    assert list(table.class_names) == prompts["classes"]
    for key, label in key_to_label(table).items():
        assert label == prompts["folder_names"].index(key.split("/")[0])
    assert {table.class_names[label] for label in table.labels} == {"lake or sea", "forest", "annual crop land"}


def test_numeric_folder_names_are_label_ids(tmp_path):
    root = write_image_folder(tmp_path / "v2", classes=["0", "2", "10"], per_class=1)
    table = load_split("imagenet-v2", "train", data_dir=str(root), holdout_fraction=0)
    assert {k.split("/")[0]: int(v) for k, v in key_to_label(table).items()} == {"0": 0, "2": 2, "10": 10}
    assert len(table.class_names) == 1000


def test_unknown_class_folders_are_a_user_error_naming_them(tmp_path):
    root = write_image_folder(tmp_path / "bad", classes=["AnnualCrop", "Moonscape"], per_class=1)
    with pytest.raises(UserError) as info:
        load_split("eurosat", "train", data_dir=str(root))
    assert "'Moonscape'" in str(info.value) and "AnnualCrop" not in str(info.value).split("expected")[0]


# -------------------------------------------------------------------------- saved Hugging Face data


def test_saved_dataset_dict_splits_and_labels(saved_hf_dataset):
    train = load_split("imagefolder", "train", data_dir=str(saved_hf_dataset))
    test = load_split("imagefolder", "test", data_dir=str(saved_hf_dataset))
    assert (len(train), len(test)) == (12, 6)
    assert list(train.class_names) == list(FOLDER_CLASSES)
    assert train.labels.tolist() == [i % 3 for i in range(12)]
    assert all(k.startswith(sources.CONTENT_KEY_PREFIX) for k in train.keys)  # no file paths: content hashes
    assert train.load_image(5).mode == "RGB"


def test_hf_keys_survive_shuffle_and_resave_and_duplicates_get_suffixes(tmp_path):
    from datasets import concatenate_datasets

    dataset = build_hf_dataset(10)
    dataset = concatenate_datasets([dataset, dataset.select([3, 3])])  # two exact duplicates of row 3
    dataset.save_to_disk(str(tmp_path / "a"))
    dataset.shuffle(seed=7).save_to_disk(str(tmp_path / "b"))
    a = load_split("imagefolder", "train", data_dir=str(tmp_path / "a"), holdout_fraction=0)
    b = load_split("imagefolder", "train", data_dir=str(tmp_path / "b"), holdout_fraction=0)
    assert len(set(a.keys)) == 12
    assert key_to_label(a) == key_to_label(b) and a.fingerprint == b.fingerprint
    assert sum("#" in key for key in a.keys) == 2
    assert np.asarray(a.load_image(a.keys.index(b.keys[0]))).tolist() == np.asarray(b.load_image(0)).tolist()


def test_hf_file_paths_are_keys_when_unique(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    root = write_image_folder(tmp_path / "files", per_class=2)
    files = sorted(str(p) for p in root.rglob("*.png"))
    labels = [FOLDER_CLASSES.index(Path(f).parent.name) for f in files]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(FOLDER_CLASSES))})
    Dataset.from_dict({"image": files, "label": labels}, features=features).save_to_disk(str(tmp_path / "ds"))
    table = load_split("imagefolder", "test", data_dir=str(tmp_path / "ds"), holdout_fraction=0)
    names = [Path(f).name for f in files]  # save_to_disk embeds the bytes and keeps the file name as path
    assert sorted(table.keys) == names
    assert key_to_label(table) == dict(zip(names, labels, strict=True))
    # file names that are not unique (cat/0.png, dog/0.png) fall back to content hashes
    clashing = tmp_path / "clash"
    for c, name in enumerate(FOLDER_CLASSES):
        (clashing / name).mkdir(parents=True)
        tiny_image(c).save(clashing / name / "0.png")
    rows = {"image": sorted(str(p) for p in clashing.rglob("*.png")), "label": [0, 1, 2]}
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds2"))
    table = load_split("imagefolder", "test", data_dir=str(tmp_path / "ds2"), holdout_fraction=0)
    assert all(k.startswith(sources.CONTENT_KEY_PREFIX) for k in table.keys) and len(set(table.keys)) == 3


def test_hf_class_label_names_are_matched_to_the_prompt_order(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    shuffled_names = list(reversed(EUROSAT_FOLDERS))  # label id 0 is 'SeaLake' in this copy
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=shuffled_names)})
    rows = {"image": [tiny_image(i) for i in range(10)], "label": list(range(10))}
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    table = load_split("eurosat", "test", data_dir=str(tmp_path / "ds"), holdout_fraction=0)
    assert table.labels.tolist() == list(range(9, -1, -1))
    assert table.class_names[int(table.labels[0])] == "lake or sea"


def test_hf_string_labels_map_through_folder_names(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    wnids = json.loads((prompts_dir() / "imagenet-r.json").read_text())["folder_names"]
    features = Features({"image": ImageFeature(), "wnid": Value("string")})
    rows = {"image": [tiny_image(i) for i in range(3)], "wnid": [wnids[5], wnids[0], wnids[199]]}
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "r"))
    table = load_split("imagenet-r", "test", data_dir=str(tmp_path / "r"), holdout_fraction=0)
    assert table.labels.tolist() == [5, 0, 199] and len(table.class_names) == 200


def test_class_space_matching_rules():
    space = ClassSpace(names=("aquarium fish", "lawn mower", "apple"), folder_names=None)
    assert space.map_names(["lawn_mower", "Aquarium_Fish", "apple"], what="t") == [1, 0, 2]
    assert space.map_names(["2", "0"], what="t") == [2, 0]  # numeric ids
    assert space.map_names(["pear"], what="t") is None


# ------------------------------------------------------------------------------------- IDX files


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_parsing_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "y-idx3-ubyte", images, compress=False)
    assert (read_idx(tmp_path / "x-idx3-ubyte.gz") == images).all()
    assert (read_idx(tmp_path / "y-idx3-ubyte") == images).all()
    (tmp_path / "cut-idx3-ubyte").write_bytes((tmp_path / "y-idx3-ubyte").read_bytes()[:-3])
    with pytest.raises(UserError, match="cut-idx3-ubyte"):
        read_idx(tmp_path / "cut-idx3-ubyte")
    (tmp_path / "bad-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(UserError, match="bad magic"):
        read_idx(tmp_path / "bad-idx3-ubyte")


def test_idx_folder_with_train_and_test(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), compress=True)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, compress=True)
    train, test = (
        load_split("mnist", "train", data_dir=str(tmp_path)),
        load_split("mnist", "test", data_dir=str(tmp_path)),
    )
    assert (len(train), len(test)) == (6, 4)
    assert test.labels.tolist() == [0, 1, 2, 3] and test.load_image(0).size == (28, 28)


# --------------------------------------------------------------------------------- corrupt images


def test_corrupt_and_truncated_images_raise_naming_the_path_and_scan_lists_them(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=2)
    good = root / "cat" / "cat_0.png"
    truncated = root / "cat" / "cat_1.png"
    tiny_image(5, side=64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = root / "dog" / "dog_0.png"
    garbage.write_bytes(b"this is not a png")
    table = load_split("imagefolder", "test", data_dir=str(root), holdout_fraction=0)
    position = {key: i for i, key in enumerate(table.keys)}
    for bad in (truncated, garbage):
        with pytest.raises(CorruptImageError) as info:
            table.load_image(position[bad.relative_to(root).as_posix()])
        assert info.value.path == str(bad) and str(bad) in str(info.value)
    table.load_image(position[good.relative_to(root).as_posix()])
    assert sorted(scan_images(table)) == sorted([str(truncated), str(garbage)])


def test_corrupt_image_inside_a_saved_hf_dataset_names_its_key(tmp_path):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(decode=False)})
    rows = {"image": [{"bytes": b"broken", "path": "broken.png"}, None]}
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError):  # neither a class list nor a label column
        load_split("imagefolder", "train", data_dir=str(tmp_path / "ds"))
    table = load_split("cifar10", "train", data_dir=str(tmp_path / "ds"), holdout_fraction=0)
    bad = scan_images(table)
    assert len(bad) == 2 and any("broken.png" in name for name in bad)
    for index, key in enumerate(table.keys):
        with pytest.raises(CorruptImageError) as info:
            table.load_image(index)
        assert key in info.value.path


# ------------------------------------------------------------------------------------ real data


def test_real_eurosat_subset(shared_data):
    root = shared_data / "eurosat_rgb_100"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    table = load_split("eurosat", "train", data_dir=str(root), holdout_fraction=0)
    prompts = json.loads((prompts_dir() / "eurosat.json").read_text())
    assert len(table) == 1000 and len(set(table.keys)) == 1000
    assert list(table.class_names) == prompts["classes"] and table.num_classes == 10
    assert np.bincount(table.labels, minlength=10).tolist() == [100] * 10
    for key, label in key_to_label(table).items():
        folder = key.split("/")[0]
        assert key.split("/")[1].startswith(folder + "_")
        assert label == EUROSAT_FOLDERS.index(folder)
    assert table.class_names[key_to_label(table)["SeaLake/SeaLake_1.jpg"]] == "lake or sea"
    assert table.load_image(0).size == (64, 64)
    train = load_split("eurosat", "train", data_dir=str(root))
    test = load_split("eurosat", "test", data_dir=str(root))
    assert (len(train), len(test)) == (800, 200) and np.bincount(test.labels).tolist() == [20] * 10


def test_real_mnist_idx_test_set(shared_data):
    root = shared_data / "mnist_test"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    table = load_split("mnist", "test", data_dir=str(root), source_split="test")
    assert len(table) == 10_000 and len(set(table.keys)) == 10_000
    assert np.bincount(table.labels).tolist() == MNIST_TEST_COUNTS
    assert table.labels[:5].tolist() == [7, 2, 1, 0, 4]
    image = table.load_image(0)
    assert image.size == (28, 28) and image.mode == "RGB"
    # only the test images ship: "train" and "test" are a stratified holdout of them
    train = load_split("mnist", "train", data_dir=str(root))
    test = load_split("mnist", "test", data_dir=str(root))
    assert len(train) + len(test) == 10_000 and not set(train.keys) & set(test.keys)


def test_digits_uses_the_demo_split():
    from zeroshot_adapt.demo.tiny_clip import digits_images, digits_split

    train, test = load_split("digits", "train"), load_split("digits", "test")
    train_idx, test_idx = digits_split()
    _, labels = digits_images()
    assert (len(train), len(test)) == (1437, 360)
    assert train.labels.tolist() == labels[train_idx].tolist() and test.labels.tolist() == labels[test_idx].tolist()
    assert not set(train.keys) & set(test.keys) and train.load_image(0).size == (8, 8)
    with pytest.raises(UserError, match="digits"):
        load_split("digits", "train", data_dir="/somewhere")


# ------------------------------------------------------------------------------------ prompt files


def _resolve(value):
    if isinstance(value, str) and value.startswith("open_clip:"):
        from open_clip import zero_shot_metadata

        value = getattr(zero_shot_metadata, value.split(":", 1)[1])
    return [v("{}") if callable(v) else v for v in value]


PROMPT_FILES = sorted(p.stem for p in prompts_dir().glob("*.json"))


@pytest.mark.parametrize("stem", PROMPT_FILES)
def test_prompt_file_format(stem):
    data = json.loads((prompts_dir() / f"{stem}.json").read_text(encoding="utf-8"))
    assert data["dataset"] == stem and data["provenance"].strip()
    assert set(data) <= {"dataset", "classes", "templates", "provenance", "folder_names"}
    classes, templates = _resolve(data["classes"]), _resolve(data["templates"])
    assert classes and templates and all(isinstance(c, str) and c for c in classes)
    assert len(set(classes)) == len(classes) or stem.startswith("imagenet")  # open_clip has 'missile' twice
    assert all("{}" in t for t in templates)
    if "folder_names" in data:
        assert len(data["folder_names"]) == len(classes) and len(set(data["folder_names"])) == len(classes)
    specs = [get_spec(name) for name in dataset_names() if get_spec(name).prompts == stem]
    assert specs, f"prompts/{stem}.json belongs to no registered dataset"
    for spec in specs:
        assert spec.num_classes == len(classes), spec.name


@pytest.mark.parametrize("name", [n for n in dataset_names() if get_spec(n).prompts])
def test_every_dataset_has_its_prompt_file(name):
    assert (prompts_dir() / f"{get_spec(name).prompts}.json").is_file()


@pytest.mark.parametrize("subset", ["imagenet-r", "imagenet-a"])
def test_imagenet_subsets_are_open_clip_names_of_their_wordnet_ids(subset):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    all_wnids = json.loads((prompts_dir() / "imagenet.json").read_text())["folder_names"]
    data = json.loads((prompts_dir() / f"{subset}.json").read_text())
    indices = [all_wnids.index(wnid) for wnid in data["folder_names"]]
    assert len(indices) == 200 and indices == sorted(indices)
    assert data["classes"] == [IMAGENET_CLASSNAMES[i] for i in indices]
    timm_info = Path(__import__("timm").data.__file__).parent / "_info"
    key = subset.split("-")[1]
    if (timm_info / f"imagenet_{key}_indices.txt").is_file():
        assert indices == [int(x) for x in (timm_info / f"imagenet_{key}_indices.txt").read_text().split()]
    assert data["folder_names"][0] == {"imagenet-r": "n01443537", "imagenet-a": "n01498041"}[subset]


def test_prompt_readme_lists_every_file():
    readme = (prompts_dir() / "README.md").read_text()
    for stem in PROMPT_FILES:
        assert f"{stem}.json" in readme, stem


def test_custom_spec_is_a_plain_dataclass():
    spec = DatasetSpec("mine", None, prompts=None, overrides={"data.image_size": 48})
    assert spec.single_split is False and spec.class_space() is None and spec.overrides["data.image_size"] == 48
