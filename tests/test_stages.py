"""Multi-run stages end to end on the bundled digits (SSL mode, no CLIP): CReST / CReST+ generations,
alternate sampling rounds, post-hoc logit adjustment, and `zsa baseline`."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from zeroshot_adapt import cli, stages
from zeroshot_adapt.baselines import crest_plus_target, crest_sampling_rates
from zeroshot_adapt.pipeline import adapt, prepare_training_data, resolve_config

torch.set_num_threads(1)

TINY = [
    "optim.epochs=1", "optim.steps_per_epoch=3", "optim.batch_size=8", "optim.mu=2", "optim.lr=0.03",
    "student.arch=test_resnet", "data.image_size=16", "data.num_workers=0", "algorithm.name=fixmatch",
    "checkpoint_every_steps=1000",
]
LONG_TAILED_LABELS = ["ssl.long_tail_ratio=10", "ssl.labels_fraction=0.1"]  # labeled counts 14 ... 1 per class
ALPHA = 1 / 3


def config_for(run_dir, *extra):
    return resolve_config("digits", overrides=[*TINY, *extra, f"run_dir={run_dir}"])


def read_json(path):
    return json.loads(path.read_text())


def expected_pseudo_label_count(probs, rates, pool, human):
    """Per predicted class c: the floor(rate_c * n_c) most confident, minus those already human-labeled."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    total = 0
    for cls, rate in enumerate(rates):
        members = np.flatnonzero(predicted == cls)
        top = members[np.argsort(-confidence[members], kind="stable")][: math.floor(rate * len(members) + 1e-9)]
        total += sum(int(pool[i]) not in human for i in top)
    return total


def test_crest_generations_follow_the_rates_and_finished_ones_are_skipped(tmp_path, monkeypatch):
    config = config_for(tmp_path / "crest", *LONG_TAILED_LABELS)
    report = stages.run_crest(config, num_generations=2, alpha=ALPHA)
    assert report["completed"] and report["method"] == "crest"
    assert [g["generation"] for g in report["generations"]] == [0, 1]
    for generation in report["generations"]:
        assert 0.0 <= generation["student"]["top1"] <= 1.0
        assert (tmp_path / "crest" / f"gen{generation['generation']}" / "report.json").is_file()

    data = prepare_training_data(config)
    human_counts = np.bincount(data.labeled_targets, minlength=data.num_classes)
    assert human_counts.max() > 2 * human_counts.min()  # a long-tailed labeled set: rates differ per class
    rates = crest_sampling_rates(human_counts, ALPHA)
    np.testing.assert_allclose(report["sampling_rates"], rates)
    probs0 = np.load(tmp_path / "crest" / "gen0" / "pool_probs.npy")
    expected = expected_pseudo_label_count(probs0, rates, data.unlabeled_indices, set(data.labeled_indices.tolist()))
    assert 0 < expected < len(data.unlabeled_indices) - len(data.labeled_indices)  # rates < 1 drop some
    gen1_set = np.load(tmp_path / "crest" / "gen1" / "labeled_set.npz")
    assert len(gen1_set["indices"]) == len(data.labeled_indices) + expected
    assert report["generations"][1]["labeled_set_size"] == len(data.labeled_indices) + expected
    assert report["generations"][0]["selected_for_next"]["size"] == expected
    # the human labels come first, unchanged; the pseudo-labels are gen0's argmax on the pool
    assert np.array_equal(gen1_set["labels"][: len(data.labeled_targets)], data.labeled_targets)
    pool_row = {int(p): i for i, p in enumerate(data.unlabeled_indices)}
    pseudo_rows = [pool_row[int(i)] for i in gen1_set["indices"][len(data.labeled_indices):]]
    assert np.array_equal(gen1_set["labels"][len(data.labeled_indices):], probs0[pseudo_rows].argmax(1))
    # plain CReST: no distribution alignment
    saved = yaml.safe_load((tmp_path / "crest" / "gen1" / "config.yaml").read_text())
    assert saved["algorithm"]["name"] == "fixmatch" and "target_prior" not in saved["algorithm"]["extra"]

    # re-run after losing generation 1: generation 0 is not trained again, generation 1 is
    shutil.rmtree(tmp_path / "crest" / "gen1")
    trained = []

    def spy(run_config, **kwargs):
        trained.append(run_config.run_dir)
        return adapt(run_config, **kwargs)

    monkeypatch.setattr(stages, "adapt", spy)
    again = stages.run_crest(config, num_generations=2, alpha=ALPHA)
    assert trained == [str(tmp_path / "crest" / "gen1")]
    assert again["generations"][1]["labeled_set_size"] == report["generations"][1]["labeled_set_size"]
    # everything finished: nothing is trained
    trained.clear()
    stages.run_crest(config, num_generations=2, alpha=ALPHA)
    assert trained == []
    # another alpha would change generation 1's labeled set: refused, not silently mixed
    with pytest.raises(stages.UserError, match="different labeled set"):
        stages.run_crest(config, num_generations=2, alpha=0.0)


def test_crest_plus_through_the_cli_passes_the_alignment_target(tmp_path, capsys):
    run_dir = tmp_path / "crest+"
    argv = ["baseline", "--method", "crest+", "--dataset", "digits", "--label-fraction", "0.1", "--long-tail", "10",
            "--generations", "2", "--t-min", "0.5", "--run-dir", str(run_dir)] + [a for o in TINY for a in ("--set", o)]
    assert cli.main(argv) == 0
    assert "generation 1: top-1" in capsys.readouterr().out
    report = read_json(run_dir / "report.json")
    assert report["method"] == "crest+" and report["completed"]
    config = config_for(run_dir, *LONG_TAILED_LABELS)
    labeled = prepare_training_data(config).labeled_targets
    prior = np.bincount(labeled, minlength=10) / len(labeled)
    for generation, temperature in ((0, 1.0), (1, 0.5)):
        saved = yaml.safe_load((run_dir / f"gen{generation}" / "config.yaml").read_text())
        assert saved["algorithm"]["name"] == "distalign"
        np.testing.assert_allclose(saved["algorithm"]["extra"]["target_prior"], crest_plus_target(prior, temperature))
        assert report["generations"][generation]["temperature"] == temperature
    # t < 1 flattens the long-tailed labeled prior toward uniform
    target = np.asarray(report["generations"][1]["da_target"])
    assert target.max() / target.min() < prior.max() / prior.min()


def test_crest_cli_rejects_zero_generations(tmp_path, capsys):
    argv = ["baseline", "--method", "crest", "--dataset", "digits", "--labels-per-class", "4", "--generations", "0",
            "--run-dir", str(tmp_path / "x")] + [a for o in TINY for a in ("--set", o)]
    assert cli.main(argv) == 2
    assert "num_generations=0" in capsys.readouterr().err


def test_alternate_sampling_rounds(tmp_path):
    config = config_for(tmp_path / "alt", *LONG_TAILED_LABELS)
    report = stages.run_alternate(config, num_rounds=1)
    assert report["completed"] and [r["round"] for r in report["rounds"]] == [0, 1]
    data = prepare_training_data(config)
    human = len(data.labeled_indices)
    round0, round1 = report["rounds"]
    assert round0["labeled_set_size"] == human
    # pseudo_threshold 0: every unlabeled sample joins round 1's labeled set (the SSL unlabeled set already
    # excludes the human-labeled images)
    assert set(data.unlabeled_indices).isdisjoint(data.labeled_indices)
    assert round1["pseudo_labels"]["size"] == len(data.unlabeled_indices)
    assert round1["labeled_set_size"] == len(data.unlabeled_indices) + human
    for entry in report["rounds"]:
        assert 0.0 <= entry["embedding"]["student"]["top1"] <= 1.0
        assert 0.0 <= entry["balanced"]["top1"] <= 1.0
    assert report["student"]["top1"] == round1["balanced"]["top1"]

    # the classifier phase replaced only the head: same backbone, another linear classifier
    trained = torch.load(tmp_path / "alt" / "round0" / "student.pt")
    balanced = torch.load(tmp_path / "alt" / "round0" / "student_balanced.pt")
    for name, tensor in trained.items():
        assert torch.equal(tensor, balanced[name]) != name.startswith("fc."), name
    # round 1 fine-tunes round 0's balanced student
    saved = yaml.safe_load((tmp_path / "alt" / "round1" / "config.yaml").read_text())
    assert saved["student"]["pretrained"] == str(tmp_path / "alt" / "round0" / "student_balanced.pt")
    # the reported balanced accuracy is that of the saved balanced student
    model = stages.load_trained_student(config, data.num_classes, tmp_path / "alt" / "round1" / "student_balanced.pt")
    logits, _ = stages.predict_table(model, data.test, np.arange(len(data.test)), stages._eval_transform(config))
    assert (logits.argmax(1) == np.asarray(data.test.labels)).mean() == pytest.approx(round1["balanced"]["top1"])


def test_logit_adjustment_moves_predictions_to_rare_classes():
    labeled = np.array([0] * 8 + [1] + [2])  # smoothed prior (9, 2, 2) / 13
    logits = np.array([[3.0, 0.0, 0.0]] * 3 + [[1.0, 0.0, 0.5]] * 3)  # three head, three rare samples
    labels = np.array([0, 0, 0, 2, 2, 2])
    names = ["head", "middle", "rare"]
    plain = stages.logit_adjusted_metrics(logits, labels, labeled, names, tau=0.0)
    assert plain["prediction_counts"] == [6, 0, 0] and plain["top1"] == 0.5 and plain["mean_per_class_recall"] == 0.5
    # rare: [1, 0, .5] - log([9, 2, 2] / 13) = [1.37, 1.87, 2.37] -> class 2; head [3, 0, 0] -> [3.37, 1.87, 1.87]
    adjusted = stages.logit_adjusted_metrics(logits, labels, labeled, names, tau=1.0)
    assert adjusted["prediction_counts"] == [3, 0, 3]
    assert adjusted["top1"] == 1.0 and adjusted["mean_per_class_recall"] == 1.0
    np.testing.assert_allclose(adjusted["prior"], np.array([9, 2, 2]) / 13)


def test_logit_adjusted_report_on_a_finished_run(tmp_path):
    config = config_for(tmp_path / "fixmatch", *LONG_TAILED_LABELS)
    with pytest.raises(stages.UserError, match="no finished run"):
        stages.logit_adjusted_report(config)
    adapt(config)
    entry = stages.logit_adjusted_report(stages.run_config(tmp_path / "fixmatch"))  # from the saved config
    report = read_json(tmp_path / "fixmatch" / "report.json")
    assert report["student_la"] == entry
    assert 0.0 <= entry["top1"] <= 1.0 and 0.0 <= entry["mean_per_class_recall"] <= 1.0
    # the prior is the labeled set's (long-tailed: class 0 most frequent), so LA favours the tail
    labeled = prepare_training_data(config).labeled_targets
    np.testing.assert_allclose(entry["prior"], (np.bincount(labeled, minlength=10) + 1) / (len(labeled) + 10))
    # tau = 0 reproduces the run's own student evaluation
    plain = stages.logit_adjusted_report(config, tau=0.0)
    assert plain["top1"] == pytest.approx(report["student"]["top1"], abs=1 / 360)
