"""Your own images: an unlabeled folder (flat or nested) + a classes file -> `zsa adapt` end to end with the
bundled tiny teacher; the report has label-free diagnostics and notes, never a faked accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zeroshot_adapt.cli import main

NUM_IMAGES = 40
TINY = ["student.arch=zsa_cnn_small", "data.image_size=16", "data.augment=small", "optim.steps_per_epoch=2",
        "optim.batch_size=4", "optim.mu=2", "data.num_workers=0"]


def write_digit_pngs(root: Path, *, nested: bool) -> Path:
    """NUM_IMAGES rendered scikit-learn digits as PNGs, flat or spread over album/day subfolders (no class folders)."""
    from zeroshot_adapt.demo.tiny_clip import digits_images, digits_pil

    images, _ = digits_images()
    for i in range(NUM_IMAGES):
        folder = root / (f"album{i % 3}/day{i % 2}" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        digits_pil(images[i]).save(folder / f"photo{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    classes = root / "classes.txt"
    classes.write_text("\n".join(str(d) for d in range(10)) + "\n")
    return {"flat": write_digit_pngs(root / "flat", nested=False),
            "nested": write_digit_pngs(root / "nested", nested=True),
            "classes": classes, "cache": root / "cache", "root": root}


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _adapt_argv(world, data_dir, run_dir, *extra) -> list[str]:
    return ["adapt", "--data-dir", str(data_dir), "--classes", str(world["classes"]), "--model", "zsa-tiny-digits",
            "--cache-dir", str(world["cache"]), "--run-dir", str(run_dir), "--epochs", "1", *_sets(*TINY), *extra]


def test_flat_unlabeled_folder_adapts_with_label_free_report(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_adapt_argv(world, world["flat"], run_dir, "--select", "topk", "--per-class", "2")) == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "report.json").read_text())
    assert report["dataset"] == "imagefolder" and report["completed"]
    assert report["labeled_set"]["size"] > 0 and report["test_set"]["has_labels"] is False
    for key in ("student", "ema", "clip_zeroshot"):
        assert report[key]["top1"] is None and report[key]["mean_per_class_recall"] is None  # never faked
        free = report[key]["label_free"]
        assert free["num_samples"] == report["test_set"]["size"] == 8  # 20% holdout of 40
        assert sum(free["prediction_counts"]) == 8 and 0 <= free["estimated_accuracy"]["value"] <= 1
        assert "true_top1" not in free["estimated_accuracy"]
    assert report["clip_zeroshot"]["label_free"]["agreement_with_clip"] is None
    assert 0 <= report["student"]["label_free"]["agreement_with_clip"] <= 1
    assert report["student"]["confusion"] is None and not (run_dir / "confusion_student.png").exists()
    assert any("have no labels" in note for note in report["notes"])
    assert "label-free (test set)" in out and "note: the 8 test images have no labels" in out
    assert (run_dir / "pseudo_label_distribution.png").is_file()
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(epoch[name] is None for epoch in epochs for name in  # no truth: null, not a 0 that reads as "wrong"
               ("pseudo_label_acc", "pseudo_label_acc_masked", "pseudo_label_kept_correct"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["teacher"]["pretrained"] == "bundled" and saved["teacher"]["classes"] == str(world["classes"])


def test_nested_folder_is_one_unlabeled_pool(world, tmp_path, capsys):
    out_dir = tmp_path / "zs"
    argv = ["zeroshot", "--data-dir", str(world["nested"]), "--classes", str(world["classes"]), "--model",
            "zsa-tiny-digits", "--cache-dir", str(world["cache"]), "--out", str(out_dir)]
    assert main(argv) == 0
    report = json.loads((out_dir / "zeroshot.json").read_text())
    assert report["dataset"] == "imagefolder"
    assert report["train"]["num_samples"] + report["test"]["num_samples"] == NUM_IMAGES  # subfolders are not classes
    assert report["train"]["num_classes"] == 10 and report["train"]["top1"] is None
    assert "n/a (no labels)" in capsys.readouterr().out


def test_data_dir_alone_means_your_own_folder(world, capsys):
    base = ["adapt", "--print-config", "--model", "zsa-tiny-digits"]
    assert main([*base, "--data-dir", str(world["flat"]), "--classes", str(world["classes"])]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["dataset"] == "imagefolder" and config["teacher"]["pretrained"] == "bundled"
    assert main(["adapt", "--print-config"]) == 0  # neither: still the digits demo
    assert yaml.safe_load(capsys.readouterr().out)["data"]["dataset"] == "digits"


def test_empty_labeled_set_stops_with_the_confidence_histogram(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_adapt_argv(world, world["flat"], run_dir, "--tau-clip", "0.9999")) == 2
    err = capsys.readouterr().err
    assert "the labeled set is empty" in err and "tau_clip=0.9999" in err
    assert "[0.90, 1.00]" in err and "[0.00, 0.10)" in err
    assert "try --tau-clip 0." in err and "--select topk --per-class" in err
    assert not run_dir.exists()  # refused before any run directory is made


def test_bad_classes_file_is_a_clear_error(world, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\ncat\n")
    argv = ["zeroshot", "--data-dir", str(world["flat"]), "--classes", str(classes), "--model", "zsa-tiny-digits",
            "--cache-dir", str(world["cache"]), "--out", str(tmp_path / "zs")]
    assert main(argv) == 2
    assert "names a class twice: 'cat' (lines 1 and 3)" in capsys.readouterr().err


def test_suite_shows_label_free_columns_for_an_unlabeled_dataset(world, tmp_path):
    datasets = tmp_path / "datasets.yaml"
    datasets.write_text(yaml.safe_dump([{"name": "mine", "dataset": "imagefolder", "data_dir": str(world["flat"]),
                                         "overrides": [f"teacher.classes={world['classes']}"]}]))
    out = tmp_path / "suite"
    argv = ["suite", "--datasets", str(datasets), "--methods", "zeroshot", "debiaspl", "sinkhorn", "--out", str(out),
            "--model", "zsa-tiny-digits", "--cache-dir", str(world["cache"]),
            *_sets(*TINY, "optim.epochs=1", "pseudo.select=topk", "pseudo.per_class=2")]
    assert main(argv) == 0
    text = (out / "results.md").read_text()
    assert "Datasets without labels" in text and "| mine |" in text
    import csv

    rows = {row["method"]: row for row in csv.DictReader((out / "results.csv").open())}
    for method in ("zeroshot", "debiaspl", "sinkhorn"):
        assert rows[method]["acc1"] == "" and 0 <= float(rows[method]["estimated_acc1"]) <= 1
    assert float(rows["debiaspl"]["clip_agreement"]) >= 0 and rows["zeroshot"]["clip_agreement"] == ""
    assert 0 <= float(rows["sinkhorn"]["clip_agreement"]) <= 1  # a transduct cell: agreement with zero-shot CLIP


def test_a_folder_too_small_for_a_test_split_trains_and_says_why_it_has_no_test_report(world, tmp_path, caplog):
    """2 images: the 20% holdout is empty. The run says so (with the remedy) and trains without a test
    evaluation, instead of failing on an empty cache or an empty evaluation."""
    import shutil

    small = tmp_path / "two"
    small.mkdir()
    for path in sorted(world["flat"].iterdir())[:2]:
        shutil.copy(path, small / path.name)
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(_adapt_argv(world, small, run_dir, "--select", "topk", "--per-class", "1")) == 0
    assert "the test split of imagefolder is empty" in caplog.text and "data.holdout_fraction=0" in caplog.text
    assert json.loads((run_dir / "report.json").read_text())["completed"]
