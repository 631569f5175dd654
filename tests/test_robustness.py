"""Scoring a student on a dataset whose classes are a subset of its outputs (the ImageNet-R / -A protocol)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_image
from zeroshot_adapt import pipeline
from zeroshot_adapt.class_subsets import (
    MATCH_BY_IDS,
    MATCH_BY_NAMES,
    MATCH_IDENTICAL,
    all_outputs_top1,
    class_columns,
    restrict_logits,
)
from zeroshot_adapt.cli import main
from zeroshot_adapt.config import save_yaml
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.models.student import create_student
from zeroshot_adapt.teacher.prompts import load_prompts


def test_columns_come_from_ids_then_identical_lists_then_names():
    model = ["tench", "goldfish", "great white shark", "crane", "crane"]
    ids = ["n01", "n02", "n03", "n04", "n05"]
    by_ids = class_columns(["Crane (bird)", "goldfish"], model, dataset_ids=["n05", "n02"], model_ids=ids)
    assert by_ids.matched_by == MATCH_BY_IDS and by_ids.columns.tolist() == [4, 1]
    # ImageNetV2: folders '0'..'999' are not WordNet ids, but the class list is ImageNet's own
    same = class_columns(model, model, dataset_ids=["0", "1", "2", "3", "4"], model_ids=ids)
    assert same.matched_by == MATCH_IDENTICAL and same.is_identity
    by_names = class_columns(["Great_White  shark", "tench"], model)
    assert by_names.matched_by == MATCH_BY_NAMES and by_names.columns.tolist() == [2, 0]
    with pytest.raises(UserError, match="1 classes of .* match no output .* 'crane'"):
        class_columns(["crane"], model)  # two model classes are named crane: no unique match
    with pytest.raises(UserError, match="'zebra'"):
        class_columns(["zebra", "tench"], model)


def test_restricting_the_logits_keeps_the_subset_columns_in_dataset_order():
    logits = np.array([[9.0, 1.0, 2.0, 3.0], [0.0, 5.0, 4.0, 8.0]])  # 2 samples x 4 outputs
    sub = restrict_logits(logits, np.array([2, 1]))
    assert sub.tolist() == [[2.0, 1.0], [4.0, 5.0]]
    assert sub.argmax(1).tolist() == [0, 1]  # among the subset; the unrestricted argmax would be 0 and 3
    # unmasked: correct only when the argmax over all 4 outputs is the label's column
    assert all_outputs_top1(logits, np.array([0, 1]), np.array([2, 1])) == 0.0
    assert all_outputs_top1(logits, np.array([0, 1]), np.array([0, 3])) == 1.0
    with pytest.raises(ValueError, match="columns run from"):
        restrict_logits(logits, np.array([4]))


def test_imagenet_r_and_a_map_onto_imagenet_by_wordnet_id():
    imagenet = load_prompts("imagenet")
    for variant in ("imagenet-r", "imagenet-a"):
        prompts = load_prompts(variant)
        mapping = class_columns(prompts.classes, imagenet.classes, dataset_ids=prompts.folder_names,
                                model_ids=imagenet.folder_names)
        assert mapping.matched_by == MATCH_BY_IDS and len(mapping.columns) == 200
        assert [imagenet.folder_names[c] for c in mapping.columns] == list(prompts.folder_names)
        assert len(set(mapping.columns.tolist())) == 200
    for variant in ("imagenet-v2", "imagenet-sketch"):
        prompts = load_prompts(variant)
        assert class_columns(prompts.classes, imagenet.classes, dataset_ids=prompts.folder_names,
                             model_ids=imagenet.folder_names).is_identity


# -------------------------------------------------------------------- a hand-made 5-of-10-class world

WNIDS = [f"n0000{i:04d}" for i in range(10)]
BASE_ORDER = WNIDS[::-1]  # the model's output order is not the sorted order: column c is WNIDS[9 - c]
SUBSET = [WNIDS[i] for i in (3, 5, 7, 8, 9)]  # the variant's 5 classes, sorted (its folder / label order)
IMAGES_PER_CLASS = {WNIDS[3]: 2, WNIDS[5]: 2, WNIDS[7]: 3, WNIDS[8]: 2, WNIDS[9]: 2}  # 11 images


def _column(wnid: str) -> int:
    return BASE_ORDER.index(wnid)


@pytest.fixture
def subset_world(tmp_path):
    """A 'trained' run with a 10-output student whose logits are constant (zero head weights, a hand-set bias:
    highest at a class outside the subset, second at WNIDS[7]), and a variant image folder with 5 of its classes."""
    base_prompts = tmp_path / "base.json"
    base_prompts.write_text(json.dumps({"classes": [f"thing {w}" for w in BASE_ORDER], "templates": ["a {}."],
                                        "folder_names": BASE_ORDER}))
    variant_prompts = tmp_path / "variant.json"
    variant_prompts.write_text(json.dumps({"classes": [f"thing {w}" for w in SUBSET], "templates": ["a {c}."],
                                           "folder_names": SUBSET}))
    variant = tmp_path / "variant"
    for c, (wnid, count) in enumerate(IMAGES_PER_CLASS.items()):
        (variant / wnid).mkdir(parents=True)
        for i in range(count):
            tiny_image(7000 + 10 * c + i).save(variant / wnid / f"{i}.png")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = pipeline.resolve_config("imagefolder", overrides=[
        f"data.data_dir={variant}", f"teacher.prompts={base_prompts}", "teacher.model=zsa-tiny-digits",
        "teacher.pretrained=bundled", "student.arch=zsa_cnn_small", "data.image_size=16", "data.num_workers=0",
        f"teacher.cache_dir={tmp_path / 'cache'}"])
    save_yaml(config, run_dir / "config.yaml")
    student = create_student("zsa_cnn_small", 10, None)
    bias = torch.zeros(10)
    bias[_column(WNIDS[0])] = 100.0  # not in the subset: wins without masking
    bias[_column(WNIDS[7])] = 90.0  # the best of the subset's columns
    bias[_column(WNIDS[3])] = 80.0
    with torch.no_grad():
        student.head.weight.zero_()
        student.head.bias.copy_(bias)
    torch.save(student.state_dict(), run_dir / "student.pt")
    return run_dir, variant, variant_prompts


def test_student_on_a_5_of_10_subset_is_scored_on_its_5_columns(subset_world, capsys):
    run_dir, variant, variant_prompts = subset_world
    out = run_dir / "eval"
    # the variant is given by a datasets file (it needs its own prompt file)
    datasets = run_dir / "variants.yaml"
    datasets.write_text(f"- {{name: subset, dataset: imagefolder, data_dir: {variant}, prompts: {variant_prompts}}}\n")
    assert main(["evaluate", "--run-dir", str(run_dir), "--datasets", str(datasets), "--out", str(out)]) == 0
    result = json.loads((out / "robustness.json").read_text())["datasets"]["subset"]
    assert result["class_mapping"] == {"dataset_classes": 5, "model_outputs": 10, "matched_by": MATCH_BY_IDS,
                                       "identity": False}
    # every image is predicted WNIDS[7] (index 2 of the variant's classes), which 3 of the 11 images are
    assert result["student"]["prediction_counts"] == [0, 0, 11, 0, 0]
    assert result["student"]["top1"] == pytest.approx(3 / 11)
    assert result["student_all_outputs_top1"] == 0.0  # unmasked, everything goes to a class not in the set
    assert result["num_samples"] == 11 and 0.0 <= result["clip_zeroshot"]["top1"] <= 1.0
    assert sum(result["clip_zeroshot"]["prediction_counts"]) == 11  # CLIP on the same 11 images
    printed = capsys.readouterr().out
    assert "| subset | 5 of 10 (ids) | 27.27 | 0.00 |" in printed
    assert (out / "robustness.md").read_text().count("| subset |") == 1


def test_a_subset_whose_classes_match_no_output_is_a_clear_error(subset_world, tmp_path, capsys):
    run_dir, variant, _ = subset_world
    # no prompt file: the class names are the folder names (WordNet ids), which name no model class
    assert main(["evaluate", "--run-dir", str(run_dir), "--datasets", f"imagefolder={variant}"]) == 2
    err = capsys.readouterr().err
    assert "5 classes of 'imagefolder' match no output of the model" in err and "Traceback" not in err
