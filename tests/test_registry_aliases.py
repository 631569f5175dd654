"""CLIP_benchmark dataset names as aliases, the registry's hub-copy fixes, and `{c}` / CuPL prompt files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.data.registry import canonical_dataset_name, get_spec, load_split, open_source
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.teacher.prompts import load_prompts

# CLIP_benchmark `--dataset` names (its README / benchmark/webdatasets.txt) -> our registered datasets
CLIP_BENCHMARK_NAMES = {
    "imagenet1k": "imagenet",
    "imagenetv2": "imagenet-v2",
    "imagenet_sketch": "imagenet-sketch",
    "imagenet-a": "imagenet-a",
    "imagenet-r": "imagenet-r",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "food101": "food101",
    "dtd": "dtd",
    "gtsrb": "gtsrb",
    "mnist": "mnist",
    "eurosat": "eurosat",
    "flowers": "flowers102",
    "vtab/eurosat": "eurosat",
    "vtab/dtd": "dtd",
    "vtab/flowers": "flowers102",
    "vtab/cifar10": "cifar10",
    "vtab/cifar100": "cifar100",
    "wds/imagenetv2": "imagenet-v2",
    "wds/vtab/flowers": "flowers102",
    "wds/imagenet_sketch": "imagenet-sketch",
}


@pytest.mark.parametrize(("alias", "registered"), sorted(CLIP_BENCHMARK_NAMES.items()))
def test_clip_benchmark_names_resolve(alias, registered):
    assert canonical_dataset_name(alias) == registered
    assert get_spec(alias) is get_spec(registered)


def test_unknown_name_lists_registered_names_and_aliases():
    with pytest.raises(UserError) as error:
        get_spec("vtab/svhn")
    message = str(error.value)
    assert "unknown dataset 'vtab/svhn'" in message
    assert "eurosat" in message and "imagenet1k -> imagenet" in message and "flowers -> flowers102" in message


def test_an_alias_resolves_in_the_config_and_shares_the_cache_identity(shared_data):
    eurosat = str(shared_data / "eurosat_rgb_100")
    by_alias = pipeline.resolve_config("vtab/eurosat", overrides=[f"data.data_dir={eurosat}"])
    by_name = pipeline.resolve_config("eurosat", overrides=[f"data.data_dir={eurosat}"])
    assert by_alias == by_name and by_alias.data.dataset == "eurosat"
    table = load_split("vtab/eurosat", "test", data_dir=eurosat)
    assert table.dataset == "eurosat"
    assert table.fingerprint == load_split("eurosat", "test", data_dir=eurosat).fingerprint


def test_zsa_datasets_lists_the_aliases(capsys):
    assert main(["datasets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "imagenet1k" in lines["imagenet"] and "flowers" in lines["flowers102"]


def test_hub_copies_use_their_real_columns_configs_and_splits():
    sketch = get_spec("imagenet-sketch")
    assert sketch.hf_id == "clip-benchmark/wds_imagenet_sketch"
    assert (sketch.image_column, sketch.label_column) == ("jpg", "cls")
    rendition = get_spec("imagenet-r")
    assert (rendition.hf_id, rendition.hf_config, rendition.train_split) == ("axiong/imagenet-r", "test", "test")
    assert rendition.label_column == "wnid"
    v2 = get_spec("imagenet-v2")
    assert (v2.image_column, v2.label_column, v2.train_split) == ("webp", "cls", "test")
    source = open_source(rendition, None, rendition.class_space())  # what load_dataset will be called with
    assert (source.hf_id, source.hf_config, source.split_names()) == ("axiong/imagenet-r", "test", ["test"])


# ------------------------------------------------------------------------------------------ prompt files

DIGIT_NAMES = [str(i) for i in range(10)]


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_benchmark_placeholder_templates_give_the_same_prompts(tmp_path):
    plain = load_prompts(str(_write(tmp_path / "plain.json", {"classes": ["cat", "dog"],
                                                              "templates": ["a photo of a {}.", "art of the {}."]})))
    braces = load_prompts(str(_write(tmp_path / "c.json", {"classes": ["cat", "dog"],
                                                           "templates": ["a photo of a {c}.", "art of the {c}."]})))
    assert braces.class_texts(1) == ["a photo of a dog.", "art of the dog."]
    assert braces.digest() == plain.digest()  # the same texts: the same cache


def test_cupl_per_class_prompt_lists_load_in_both_forms(tmp_path):
    cupl = {"dog": ["a loyal dog.", "a dog on a leash."], "cat": ["a cat asleep."]}
    bare = load_prompts(str(_write(tmp_path / "bare.json", cupl)))
    assert bare.classes == ("dog", "cat")  # a bare CuPL file: key order is the class order
    assert bare.class_texts(0) == ["a loyal dog.", "a dog on a leash."] and bare.class_texts(1) == ["a cat asleep."]
    ordered = load_prompts(str(_write(tmp_path / "ordered.json", {"classes": ["cat", "dog"], "templates": cupl})))
    assert ordered.classes == ("cat", "dog") and ordered.class_texts(0) == ["a cat asleep."]
    assert ordered.texts_for("dog") == ["a loyal dog.", "a dog on a leash."]
    assert ordered.digest() != load_prompts(str(_write(tmp_path / "other.json", {
        "classes": ["cat", "dog"], "templates": {"cat": ["a cat."], "dog": cupl["dog"]}}))).digest()
    with pytest.raises(UserError, match="no prompts for \\['fox'\\]"):
        load_prompts(str(_write(tmp_path / "missing.json", {"classes": ["cat", "fox"], "templates": cupl})))
    with pytest.raises(UserError, match="empty prompt list"):
        load_prompts(str(_write(tmp_path / "empty.json", {"cat": [], "dog": ["a dog."]})))


def test_cupl_file_with_the_template_texts_predicts_like_the_template_file(tmp_path):
    """The same texts written per class (CuPL form) give the same CLIP classifier, hence the same logits;
    the per-class lists are part of the cache key (a separate cache is built)."""
    digits = load_prompts("digits")
    cupl = {name: digits.class_texts(i) for i, name in enumerate(digits.classes)}
    path = _write(tmp_path / "digits_cupl.json", cupl)
    common = [f"teacher.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    base = pipeline.resolve_config("digits", overrides=common)
    custom = pipeline.resolve_config("digits", overrides=[*common, f"teacher.prompts={path}"])
    ours, theirs = pipeline.teacher_predictions(base, "test"), pipeline.teacher_predictions(custom, "test")
    assert theirs.cache.directory != ours.cache.directory
    np.testing.assert_allclose(theirs.field("logits"), ours.field("logits"), rtol=1e-5, atol=1e-5)
