"""Label-free diagnostics (reports.label_free) on hand-made arrays, and the small pure pieces of "your own
images": classes / templates files, the empty-labeled-set histogram, warm-up scaling, the large-student
CPU warning, bundled default weights, plots with class names or no data, and the suite's label-free columns."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zeroshot_adapt.config import MAX_WARMUP_FRACTION, warmup_steps
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.models.cost import LARGE_STUDENT_PARAMS, large_student_message
from zeroshot_adapt.pseudo_labels import confidence_histogram, confidence_histogram_text, suggest_tau_clip
from zeroshot_adapt.reports import label_free as lf
from zeroshot_adapt.reports import records as rec
from zeroshot_adapt.teacher.prompts import default_templates, read_classes_file, read_templates_file

# ----------------------------------------------------------------------------- label-free diagnostics


def test_agreement_and_distribution_by_hand():
    assert lf.agreement([0, 1, 2, 2], [0, 1, 1, 0]) == 0.5
    assert lf.agreement([], []) is None
    with pytest.raises(ValueError, match="differ in length"):
        lf.agreement([0, 1], [0])
    out = lf.prediction_distribution([0, 0, 0, 1], ["cat", "dog", "fox"])
    assert out["prediction_counts"] == [3, 1, 0]
    assert out["imbalance_ratio"] is None and out["empty_classes"] == ["fox"] and out["num_empty_classes"] == 1
    # shares (3/4, 1/4): H = -(.75 ln .75 + .25 ln .25) = 0.5623; / ln 3 = 0.5118
    assert math.isclose(out["normalized_entropy"], 0.5623351446 / math.log(3), rel_tol=1e-6)
    balanced = lf.prediction_distribution([0, 1, 1, 0, 2, 2], ["a", "b", "c"])
    assert balanced["imbalance_ratio"] == 1.0 and math.isclose(balanced["normalized_entropy"], 1.0)
    assert lf.prediction_distribution([1, 1], ["a", "b"])["normalized_entropy"] == 0.0
    assert lf.prediction_distribution([0, 1, 1, 1, 1], ["a", "b"])["imbalance_ratio"] == 4.0
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\)"):
        lf.prediction_distribution([0, 2], ["a", "b"])


def test_average_confidence_estimate_next_to_the_truth():
    assert math.isclose(lf.average_confidence([0.9, 0.5, 0.7]), 0.7)
    assert lf.average_confidence([]) is None
    with pytest.raises(ValueError, match="probabilities"):
        lf.average_confidence([1.5])
    out = lf.label_free_diagnostics([0, 1, 1, 0], [0.9, 0.8, 0.6, 0.5], ["a", "b"], reference=[0, 1, 0, 0],
                                    true_accuracy=0.5)
    assert out["agreement_with_clip"] == 0.75 and math.isclose(out["mean_confidence"], 0.7)
    estimate = out["estimated_accuracy"]
    assert estimate["method"] == "average_confidence" and math.isclose(estimate["value"], 0.7)
    assert estimate["true_top1"] == 0.5 and math.isclose(estimate["gap"], 0.2)
    unlabeled = lf.label_free_diagnostics([0, 1], [0.6, 0.6], ["a", "b"])
    assert unlabeled["agreement_with_clip"] is None and "true_top1" not in unlabeled["estimated_accuracy"]


def test_suite_label_free_metrics_are_fractions_in_a_valid_record():
    diagnostics = lf.label_free_diagnostics([0, 1, 1], [0.9, 0.6, 0.6], ["a", "b"], reference=[0, 1, 0])
    metrics = rec.label_free_metrics(diagnostics)
    assert math.isclose(metrics["estimated_acc1"], 0.7) and math.isclose(metrics["clip_agreement"], 2 / 3)
    assert rec.label_free_metrics(None) == dict.fromkeys(rec.LABEL_FREE_KEYS)
    rec.make_record(dataset="mine", model="m", pretrained="p", method="debiaspl", seed=0,
                    metrics={"acc1": None, "acc5": None, "mean_per_class_recall": None, **metrics})
    assert set(rec.LABEL_FREE_KEYS) <= set(rec.CSV_FIELDS)


# ----------------------------------------------------------------------------- classes / templates files


def test_classes_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\ndog\n\n")  # trailing blank lines are fine
    assert read_classes_file(str(path)) == ("cat", "dog")
    path.write_text("cat\ndog\nCat\nfox\ndog\n")
    with pytest.raises(UserError, match=r"twice: 'Cat' \(lines 1 and 3\), 'dog' \(lines 2 and 5\)"):
        read_classes_file(str(path))
    path.write_text("cat\n\ndog\n  \nfox\n")
    with pytest.raises(UserError, match=r"line\(s\) 2, 4 are empty"):
        read_classes_file(str(path))
    path.write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        read_classes_file(str(path))
    path.write_text("cat\n")
    with pytest.raises(UserError, match="names 1 class .'cat'.; at least 2 are needed"):
        read_classes_file(str(path))
    with pytest.raises(UserError, match="does not exist"):
        read_classes_file(str(tmp_path / "missing.txt"))


def test_templates_file_and_open_clip_defaults(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\na drawing of a {c}.\n")
    assert read_templates_file(str(path)) == ("a photo of a {}.", "a drawing of a {}.")
    path.write_text("no slot here\n")
    with pytest.raises(UserError, match="no '{}' slot"):
        read_templates_file(str(path))
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    defaults = default_templates()
    assert len(defaults) == len(OPENAI_IMAGENET_TEMPLATES) and defaults[0] == OPENAI_IMAGENET_TEMPLATES[0]("{}")


# ----------------------------------------------------------------------------- empty labeled set


def test_confidence_histogram_and_suggested_tau():
    confidence = np.array([0.05, 0.15, 0.15, 0.42, 0.91, 1.0])
    assert confidence_histogram(confidence).tolist() == [1, 2, 0, 0, 1, 0, 0, 0, 0, 2]
    text = confidence_histogram_text(confidence)
    assert "[0.90, 1.00]      2 ####" in text and "[0.10, 0.20)      2 ####" in text
    # keep ceil(0.1 * 6) = 1 image: the highest confidence, 1.0
    assert suggest_tau_clip(confidence) == 1.0
    values = np.linspace(0.3, 0.6, 20)  # keep 2: the second highest 0.5842 -> 0.58
    tau = suggest_tau_clip(values)
    assert tau == 0.58 and (values >= tau).sum() >= 2
    assert suggest_tau_clip(np.array([0.001])) is None and suggest_tau_clip(np.array([])) is None


# ----------------------------------------------------------------------------- warm-up, CPU warning


def test_warmup_is_capped_at_a_fraction_of_the_run():
    assert warmup_steps(5.0, 10, 500) == (50, False)  # the paper: 5 of 50 epochs, unchanged
    assert warmup_steps(0.5, 50, 300) == (25, False)  # the digits demo, unchanged
    steps, capped = warmup_steps(5.0, 10, 10)  # --epochs 1 under 5 warm-up epochs
    assert capped and steps == int(MAX_WARMUP_FRACTION * 10) == 5


def test_large_student_message_logic():
    big, small = 25_557_032, 11_689_512  # ResNet-50, ResNet-18
    assert small < LARGE_STUDENT_PARAMS <= big
    assert large_student_message("resnet50", big, "cuda", 0.1, 100, 1000) is None
    assert large_student_message("resnet18", small, "cpu", 0.1, 100, 1000) is None
    message = large_student_message("resnet50", big, "cpu", 0.05, 64 * 11, 1000)  # 0.05 * 704 * 1000 s
    assert "resnet50 (25.6M parameters)" in message and "9.8 h" in message and "50 ms per image" in message
    assert "student.arch=resnet18" in message and "zsa_cnn_small" in message


def test_measuring_leaves_the_student_as_it_was():
    import torch

    from zeroshot_adapt.models.cost import measure_seconds_per_image

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert measure_seconds_per_image(model, 8) > 0
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- bundled weights


def test_bundled_models_default_to_bundled_weights():
    from zeroshot_adapt.cli import _build_parser, _overrides
    from zeroshot_adapt.teacher.clip import BUNDLED, resolve_weights

    parser = _build_parser()
    args = parser.parse_args(["zeroshot", "--model", "zsa-tiny-digits"])
    assert 'teacher.pretrained="bundled"' in _overrides(args)
    args = parser.parse_args(["zeroshot", "--model", "zsa-tiny-digits", "--pretrained", "none"])
    assert not any(o.startswith("teacher.pretrained=\"bundled") for o in _overrides(args))
    args = parser.parse_args(["zeroshot", "--model", "RN50-quickgelu"])
    assert not any("bundled" in o for o in _overrides(args))
    with pytest.raises(UserError, match="valid: bundled"):
        resolve_weights("zsa-tiny-digits", "openai")
    assert resolve_weights("zsa-tiny-digits", BUNDLED).weights_id.startswith("sha256:")
    assert "bundled" in parser._subparsers._group_actions[0].choices["adapt"].format_help()


# ----------------------------------------------------------------------------- plots


def _captured_figures(monkeypatch):
    from zeroshot_adapt.reports import plots

    figures = []
    original = plots._save

    def save(figure, path):
        figures.append(figure)
        return original(figure, path)

    monkeypatch.setattr(plots, "_save", save)
    return plots, figures


def _texts(figure) -> list[str]:
    texts = [t.get_text() for t in figure.texts]
    for ax in figure.axes:
        texts += [t.get_text() for t in ax.texts] + [t.get_text() for t in ax.get_xticklabels()]
    return texts


def test_plots_show_class_names_and_say_when_there_is_no_data(tmp_path, monkeypatch):
    plots, figures = _captured_figures(monkeypatch)
    names = ["cat", "dog", "fox"]
    plots.plot_predictions_per_class([1, 5, 0], names, tmp_path / "a.png")
    plots.plot_pseudo_label_distribution([(1, [2, 0, 1]), (2, [3, 1, 0])], tmp_path / "b.png", class_names=names)
    plots.plot_predictions_per_class([0, 0, 0], names, tmp_path / "c.png")
    plots.plot_pseudo_label_distribution([(1, [0, 0, 0])], tmp_path / "d.png", class_names=names)
    with_data, distribution, no_counts, no_labels = (_texts(f) for f in figures)
    assert {"cat", "dog", "fox"} <= set(with_data) and {"cat", "dog", "fox"} <= set(distribution)
    assert plots.NO_COUNTS_TEXT not in with_data and plots.NO_PSEUDO_LABELS_TEXT not in distribution
    assert plots.NO_COUNTS_TEXT in no_counts and plots.NO_PSEUDO_LABELS_TEXT in no_labels


def test_every_summary_prints_an_empty_class_imbalance_the_same_way():
    from zeroshot_adapt.cli import _imbalance

    assert _imbalance(None) == _imbalance(float("inf")) == "inf (a class is empty)"
    assert _imbalance(7.8123) == "7.81"
