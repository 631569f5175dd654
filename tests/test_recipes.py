"""Named recipes (fast / paper), dataset view presets, --print-config, and the data sets a recipe trains on
(issue 8)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.config import RECIPES, RunConfig, describe_recipe, to_dict
from zeroshot_adapt.data.registry import dataset_names, get_spec
from zeroshot_adapt.errors import UserError

# The official DebiasPL T-ZSL ImageNet run, field by field (REFERENCE.md section 1): lr 0.003, momentum 0.9,
# wd 1e-4, no nesterov, 5 warm-up epochs, 50 epochs, batch 64, mu 5, threshold 0.8, tau 0.4, prior momentum 0.99,
# lambda_u 10, EMAN 0.999, multi-view, CLD 0.3, CLIP fill 0.3, tau_clip 0.95, ResNet-50, 224 px ImageNet views.
OFFICIAL_TZSL = {
    "optim.lr": 0.003,
    "optim.momentum": 0.9,
    "optim.weight_decay": 1e-4,
    "optim.nesterov": False,
    "optim.warmup_epochs": 5.0,
    "optim.epochs": 50,
    "optim.batch_size": 64,
    "optim.mu": 5,
    "algorithm.name": "debiaspl",
    "algorithm.threshold": 0.8,
    "algorithm.tau": 0.4,
    "algorithm.prior_momentum": 0.99,
    "algorithm.lambda_u": 10.0,
    "student.ema_momentum": 0.999,
    "algorithm.multiview": True,
    "algorithm.lambda_cld": 0.3,
    "algorithm.clip_fill_threshold": 0.3,
    "pseudo.tau_clip": 0.95,
    "student.arch": "resnet50",
    "data.image_size": 224,
    "data.augment": "imagenet",
}


def value(config: RunConfig, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("dataset", ["imagenet", "eurosat"])
def test_paper_recipe_equals_the_official_values_field_by_field(dataset):
    config = pipeline.resolve_config(dataset, overrides=["recipe=paper"])
    mismatches = {k: (value(config, k), v) for k, v in OFFICIAL_TZSL.items() if value(config, k) != v}
    assert mismatches == {}
    assert config.recipe == "paper" and config.pseudo.unlabeled_set == "all"
    assert config.algorithm.cld_grouping == "argmax"  # ours; the official argmin is an option


def test_paper_recipe_in_ssl_modes():
    ssl = pipeline.resolve_config("imagenet", overrides=["recipe=paper", "ssl.labels_fraction=0.01"])
    assert ssl.algorithm.clip_fill_threshold is None and ssl.algorithm.threshold == 0.8
    assert ssl.algorithm.multiview and ssl.algorithm.lambda_cld == 0.3
    with_clip = pipeline.resolve_config("imagenet", overrides=["recipe=paper", "ssl.labels_fraction=0.01",
                                                               "ssl.use_clip=true"])
    # REFERENCE.md: threshold 0.7 for SSL with CLIP; fill threshold 0.4 in SSL
    assert with_clip.algorithm.threshold == 0.7 and with_clip.algorithm.clip_fill_threshold == 0.4


def test_fast_recipe_is_the_default_and_keeps_the_demo():
    config = pipeline.resolve_config("digits")
    assert config.recipe == "fast" and RunConfig().recipe == "fast"
    assert not config.algorithm.multiview and config.algorithm.lambda_cld == 0.0
    assert config.algorithm.clip_fill_threshold is None
    # the demo preset sits above the recipe: small CNN, 16 px small views, 300 steps
    assert (config.student.arch, config.data.image_size, config.data.augment) == ("zsa_cnn_small", 16, "small")
    assert config.optim.epochs * config.optim.steps_per_epoch == 300 and config.data.hflip is False
    # the paper recipe on the demo: its extras, the demo's student and budget
    paper = pipeline.resolve_config("digits", overrides=["recipe=paper"])
    assert paper.algorithm.multiview and paper.algorithm.lambda_cld == 0.3
    assert paper.algorithm.clip_fill_threshold == 0.3
    assert paper.student.arch == "zsa_cnn_small" and paper.optim.epochs == 6


def test_recipe_layering_file_and_set_win(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"recipe": "paper", "algorithm": {"lambda_cld": 0.1}}))
    config = pipeline.resolve_config("eurosat", config_file=str(path), overrides=["algorithm.multiview=false"])
    assert config.recipe == "paper" and config.algorithm.lambda_cld == 0.1 and not config.algorithm.multiview
    assert config.algorithm.clip_fill_threshold == 0.3  # the rest of the recipe still applies
    # the resolved config round-trips: config.yaml re-resolved gives the same config
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(config)))
    assert pipeline.resolve_config(config_file=str(saved)) == config
    with pytest.raises(UserError, match="unknown recipe 'slow'; valid: fast, paper"):
        pipeline.resolve_config("eurosat", overrides=["recipe=slow"])


def test_dataset_view_presets():
    imagenet_recipe = ("eurosat", "mnist", "dtd", "gtsrb", "flowers102", "food101", "imagenet", "imagenet-v2",
                       "imagenet-r", "imagenet-a", "imagenet-sketch", "imagefolder")
    for name in imagenet_recipe:
        config = pipeline.resolve_config(name)
        assert (config.data.augment, config.data.image_size) == ("imagenet", 224), name
    for name in ("cifar10", "cifar100"):
        config = pipeline.resolve_config(name)
        assert (config.data.augment, config.data.image_size) == ("small", 32), name
    # no flips where a mirror changes the class
    flips = {name: pipeline.resolve_config(name).data.hflip for name in dataset_names()}
    assert {name for name, flip in flips.items() if not flip} == {"digits", "mnist", "gtsrb"}
    assert pipeline.resolve_config("gtsrb", overrides=["data.hflip=true"]).data.hflip is True
    assert {n for n in dataset_names() if get_spec(n).imagenet_classes} == {
        "imagenet", "imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch"}
    with pytest.raises(UserError, match="data.augment='auto' must be one of imagenet, small"):
        pipeline.resolve_config("eurosat", overrides=["data.augment=auto"])


def test_clip_fill_without_clip_labels_is_an_error():
    with pytest.raises(UserError, match="in SSL needs CLIP labels: set ssl.use_clip=true"):
        pipeline.resolve_config("digits", overrides=["ssl.labels_per_class=4", "algorithm.clip_fill_threshold=0.4"])
    with pytest.raises(UserError, match="nothing uses them without a fill threshold"):
        pipeline.resolve_config("digits", overrides=["ssl.labels_per_class=4", "ssl.use_clip=true"])
    # T-ZSL always has CLIP labels: fill needs nothing more
    assert pipeline.resolve_config("digits", overrides=["algorithm.clip_fill_threshold=0.3"])


def test_describe_recipe_names_what_runs():
    text = describe_recipe(pipeline.resolve_config("imagenet", overrides=["recipe=paper"]))
    for part in ("recipe paper (tzsl)", "multi-view", "CLD 0.3 (argmax groups)", "CLIP fill >= 0.3",
                 "resnet50 (random init)", "224 px imagenet views", "50 epochs"):
        assert part in text, part
    assert set(RECIPES) == {"fast", "paper"}


# --- --print-config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["adapt", "--dataset", "eurosat", "--recipe", "paper"],
     ["ssl", "--dataset", "eurosat", "--label-fraction", "0.01", "--clip-fill", "0.4", "--recipe", "paper"]],
)
def test_print_config_prints_the_resolved_yaml_and_touches_nothing(tmp_path, monkeypatch, capsys, argv):
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    for name, path in (("HOME", home), ("ZSA_CACHE_DIR", cache), ("HF_HOME", home / "hf")):
        monkeypatch.setenv(name, str(path))
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"] == "paper" and printed["run_dir"] == f"runs/{argv[2]}/{argv[0]}-debiaspl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no runs/, no cache
    assert list(home.iterdir()) == []
    if argv[0] == "ssl":
        assert printed["ssl"]["use_clip"] is True and printed["algorithm"]["clip_fill_threshold"] == 0.4
        assert printed["algorithm"]["threshold"] == 0.7


def test_cli_refuses_a_mismatched_mode(tmp_path, capsys):
    assert main(["ssl", "--dataset", "digits", "--print-config"]) == 2
    assert "zsa ssl needs labels" in capsys.readouterr().err
    path = tmp_path / "ssl.yaml"
    path.write_text(yaml.safe_dump({"ssl": {"labels_per_class": 4}}))
    assert main(["adapt", "--dataset", "digits", "--config", str(path), "--print-config"]) == 2
    assert "use `zsa ssl`" in capsys.readouterr().err
    assert main(["ssl", "--dataset", "digits", "--config", str(path), "--print-config"]) == 0  # labels from the file


# --- which images train (SSL: labeled excluded; T-ZSL: all or unselected) -------------------------------


def test_ssl_unlabeled_set_excludes_the_labeled_images():
    config = pipeline.resolve_config("digits", overrides=["ssl.labels_per_class=4"])
    data = pipeline.prepare_training_data(config)
    labeled = {data.train.keys[i] for i in data.labeled_indices}
    unlabeled = {data.train.keys[i] for i in data.unlabeled_indices}
    assert len(labeled) == 40 and labeled.isdisjoint(unlabeled)
    assert len(labeled) + len(unlabeled) == len(data.train)  # nothing else is lost
    assert data.clip_label is None


@pytest.fixture
def fake_clip(monkeypatch):
    """CLIP's cached predictions replaced by seeded random ones (no cache build): confidence uniform in [0, 1]."""
    from types import SimpleNamespace

    from zeroshot_adapt.teacher.prompts import load_prompts

    def predictions(config, split="train", **_):
        if split != "train":
            raise UserError("no test split in this test")
        table = pipeline.load_table(config, split)
        rng = np.random.default_rng(0)
        return SimpleNamespace(table=table, prompts=load_prompts("digits"),
                               prediction=rng.integers(0, 10, len(table)), confidence=rng.random(len(table)),
                               valid=np.ones(len(table), bool))

    monkeypatch.setattr(pipeline, "teacher_predictions", predictions)


def test_tzsl_unlabeled_set_all_or_unselected(fake_clip):
    base = ["pseudo.tau_clip=0.7"]
    every = pipeline.prepare_training_data(pipeline.resolve_config("digits", overrides=base))
    assert 0 < len(every.labeled_indices) < len(every.train)
    assert len(every.unlabeled_indices) == len(every.train)  # default: every image unlabeled
    assert set(every.labeled_indices) <= set(every.unlabeled_indices)
    rest = pipeline.prepare_training_data(
        pipeline.resolve_config("digits", overrides=[*base, "pseudo.unlabeled_set=unselected"]))
    assert np.array_equal(rest.labeled_indices, every.labeled_indices)
    assert set(rest.unlabeled_indices).isdisjoint(rest.labeled_indices)
    assert len(rest.unlabeled_indices) + len(rest.labeled_indices) == len(every.unlabeled_indices)
    # the CLIP labels stay aligned with the unlabeled rows
    position = {int(i): n for n, i in enumerate(every.unlabeled_indices)}
    assert all(rest.clip_label[n] == every.clip_label[position[int(i)]] for n, i in enumerate(rest.unlabeled_indices))


def test_clip_fill_with_no_clip_predictions_fails_at_the_data_stage():
    from dataclasses import replace

    config = pipeline.resolve_config("digits", overrides=["ssl.labels_per_class=4"])
    unchecked = replace(config, algorithm=replace(config.algorithm, clip_fill_threshold=0.4))  # validation bypassed
    with pytest.raises(UserError, match="CLIP fill .* needs CLIP's predictions"):
        pipeline.prepare_training_data(unchecked)


def test_the_pipeline_tells_the_algorithm_about_gradient_accumulation():
    config = pipeline.resolve_config("digits", overrides=["optim.grad_accum=4"])
    algorithm = pipeline.build_algorithm(config, num_classes=10)
    assert algorithm.adjuster.class_prior.micro_batches == 4
    summary = pipeline.method_summary(pipeline.resolve_config("digits", overrides=["recipe=paper"]))
    assert summary["cld_grouping"] == "argmax" and summary["recipe"] == "paper" and summary["multiview"]
