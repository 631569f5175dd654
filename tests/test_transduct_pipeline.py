"""`zsa transduct`, the derived prediction store, and any transduction chain as the teacher of `pseudolabel` /
`adapt`, end to end on the offline digits dataset (bundled tiny CLIP teacher)."""

from __future__ import annotations

import csv
import json
from dataclasses import fields, replace

import numpy as np
import pytest

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.config import TransductConfig
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.transduct import chain_identity
from zeroshot_adapt.transduct.store import get_or_compute, identity_digest

TINY = ["optim.epochs=2", "optim.steps_per_epoch=4", "data.num_workers=0", "optim.batch_size=8", "optim.mu=2"]
FULL_CHAIN = ["debias", "prior-em", "sinkhorn", "label-propagation", "transclip"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _config(cache_dir, *overrides):
    return pipeline.resolve_config("digits", overrides=[f"teacher.cache_dir={cache_dir}", *overrides])


# ----------------------------------------------------------------------------- the derived store


def _changed(value, name: str = ""):
    if name == "knn_exact_max_samples":
        return 10**9  # every size exact: the index plan changes
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value > 0 else 0.5
    return "prior-em" if value == "uniform" else "uniform"


def test_every_parameter_of_a_chain_keys_its_derived_set():
    base = TransductConfig()
    large = 100_000  # above knn_exact_max_samples: the IVF settings matter
    reference = identity_digest(chain_identity(FULL_CHAIN, base, large, 64))
    no_effect = {"method", "knn_memory_mb", "knn_device"}  # the chain is the key's list; budget/device change no value
    for item in fields(TransductConfig):
        if item.name in no_effect:
            continue
        changed = replace(base, **{item.name: _changed(getattr(base, item.name), item.name)})
        assert identity_digest(chain_identity(FULL_CHAIN, changed, large, 64)) != reference, item.name
    same = replace(base, knn_memory_mb=8192, knn_device="cpu")
    assert identity_digest(chain_identity(FULL_CHAIN, same, large, 64)) == reference
    # a parameter of a method that is not in the chain does not touch the key
    assert chain_identity(["debias"], replace(base, lp_alpha=0.5), large, 64) == chain_identity(["debias"], base,
                                                                                                large, 64)


def test_get_or_compute_hits_on_the_same_key_and_misses_on_another(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.array([[0.25, 0.75], [0.6, 0.4], [0.0, 0.0]], dtype=np.float32), np.array([True, True, False])

    first = get_or_compute(tmp_path, {"chain": "a"}, compute)
    again = get_or_compute(tmp_path, {"chain": "a"}, compute)
    other = get_or_compute(tmp_path, {"chain": "b"}, compute)
    assert (first.hit, again.hit, other.hit) == (False, True, False) and len(calls) == 2
    assert again.directory == first.directory != other.directory
    assert again.prediction.tolist() == [1, 0, 0] and again.valid.tolist() == [True, True, False]
    np.testing.assert_allclose(again.confidence, [0.75, 0.6, 0.0])
    assert not list(tmp_path.glob(".*partial*"))  # no leftover temporary folder


def test_pipeline_derived_set_hit_and_miss_per_parameter(cache_dir):
    config = _config(cache_dir, "transduct.method=debias")
    preds = pipeline.teacher_predictions(config, "train", progress=False)
    first = pipeline.refined_predictions(config, preds)
    again = pipeline.refined_predictions(config, preds)
    assert not first.derived.hit and again.derived.hit and again.steps is None
    np.testing.assert_array_equal(first.derived.prediction, again.derived.prediction)
    changed = pipeline.refined_predictions(_config(cache_dir, "transduct.method=debias", "transduct.debias_tau=0.5"),
                                           preds)
    assert not changed.derived.hit and changed.derived.directory != first.derived.directory
    np.testing.assert_allclose(np.asarray(first.derived.probabilities, np.float32).sum(1), 1.0, atol=2e-3)


def test_a_cache_without_features_is_a_clear_error_for_graph_methods(cache_dir, monkeypatch):
    config = _config(cache_dir, "transduct.method=label-propagation")
    preds = pipeline.teacher_predictions(config, "train", progress=False)
    monkeypatch.setattr(pipeline.TeacherPredictions, "has_field", lambda self, name: name != "features")
    with pytest.raises(UserError, match="'label-propagation' needs the cached image features"):
        pipeline.refined_predictions(config, preds)
    assert pipeline.refined_predictions(_config(cache_dir, "transduct.method=sinkhorn"), preds).derived is not None


# ----------------------------------------------------------------------------- zsa transduct


def test_zsa_transduct_end_to_end(cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["transduct", "--dataset", "digits", "--cache-dir", str(cache_dir), "--method",
            "label-propagation,sinkhorn", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "digits/train: label-propagation,sinkhorn: top-1" in printed and "written to" in printed
    report = json.loads((out / "transduct.json").read_text())
    config = _config(cache_dir)
    for split in ("train", "test"):
        entry = report[split]
        preds = pipeline.teacher_predictions(config, split, progress=False)
        assert entry["zeroshot"]["top1"] == preds.zeroshot_report()["top1"]
        assert entry["num_samples"] == len(preds.table) and sum(entry["prediction_counts"]) == len(preds.table)
        assert entry["mean_per_class_recall"] is not None and len(entry["per_class"]) == 10
        assert all(row["precision"] is not None and row["recall"] is not None for row in entry["per_class"])
        assert [s["method"] for s in entry["steps"]] == ["label-propagation", "sinkhorn"]
        assert entry["identity"]["knn_index"] == {"index": "exact"}
        for key in ("plot", "comparison_plot"):
            assert (out / entry[key].split("/")[-1]).is_file()
    # Sinkhorn to a uniform marginal leaves the predictions far more balanced than CLIP's
    assert report["train"]["imbalance_ratio"] < report["train"]["zeroshot"]["imbalance_ratio"]
    assert main(argv) == 0
    assert "read from" in capsys.readouterr().out  # the derived set is reused


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "propagate"], "unknown transduction method 'propagate'; valid: debias, label-propagation, prior-em"),
    (["--method", "label-propagation", "--lp-knn", "0"], "transduct.lp_knn \\(--lp-knn\\)=0 must be >= 1"),
    (["--method", "label-propagation", "--lp-knn", "1437", "--split", "train"],
     "transduct.lp_knn=1437 must be below the number of samples \\(1437\\)"),
    (["--method", "sinkhorn", "--sinkhorn-marginal", "missing.json"], "no such JSON file"),
])
def test_zsa_transduct_bad_input_exits_2_without_traceback(cache_dir, tmp_path, capsys, flags, message):
    import re

    code = main(["transduct", "--dataset", "digits", "--cache-dir", str(cache_dir), "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and "Traceback" not in err


# ----------------------------------------------------------------------------- teachers


def test_pseudolabel_with_a_refined_teacher_and_top_k_selection(cache_dir, tmp_path, capsys):
    out = tmp_path / "pl"
    assert main(["pseudolabel", "--dataset", "digits", "--cache-dir", str(cache_dir), "--out", str(out),
                 "--teacher-method", "label-propagation,sinkhorn", "--select", "topk", "--per-class", "20"]) == 0
    printed = capsys.readouterr().out
    assert "top-20 per class kept" in printed and "threshold 0.95 kept" in printed
    report = json.loads((out / "pseudolabels.json").read_text())
    config = _config(cache_dir, "transduct.method=label-propagation,sinkhorn")
    preds = pipeline.teacher_predictions(config, "train", progress=False)
    refined = pipeline.refined_predictions(config, preds).derived
    assert refined.hit  # the pseudolabel run stored it
    counts = np.bincount(refined.prediction[preds.valid], minlength=10)
    assert report["kept"] == int(np.minimum(counts, 20).sum())
    assert report["teacher_method"] == "label-propagation,sinkhorn" and report["select"] == "topk"
    assert set(report["rules"]) == {"threshold 0.95", "top-20 per class"}
    threshold_rule = report["rules"]["threshold 0.95"]
    assert threshold_rule["kept"] == int((refined.confidence[preds.valid] >= np.float32(0.95)).sum())
    assert report["rules"]["top-20 per class"]["num_empty_classes"] == int((counts == 0).sum())
    with (out / "pseudo_labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["clip_label"]) for r in rows] == refined.prediction.tolist()
    assert sum(int(r["selected"]) for r in rows) == report["kept"]


def test_zeroshot_teacher_is_cached_clip_unchanged(cache_dir, tmp_path):
    config = _config(cache_dir)
    preds = pipeline.teacher_predictions(config, "train", progress=False)
    prediction, confidence = pipeline.teacher_labels(config, preds)
    assert prediction is preds.prediction and confidence is preds.confidence  # the same arrays: bit for bit
    data = pipeline.prepare_training_data(config)
    selected = np.flatnonzero(preds.confidence >= np.float32(config.pseudo.tau_clip))
    np.testing.assert_array_equal(data.labeled_indices, np.intersect1d(selected, np.flatnonzero(preds.valid)))
    np.testing.assert_array_equal(data.clip_label, preds.prediction)
    assert not (cache_dir / "derived").exists() or all(
        "zeroshot" not in (d / "identity.json").read_text() for d in (cache_dir / "derived").iterdir()
    )


def test_the_training_data_come_from_the_refined_teacher(cache_dir):
    config = _config(cache_dir, "transduct.method=debias", "pseudo.select=topk", "pseudo.per_class=5")
    data = pipeline.prepare_training_data(config)
    preds = pipeline.teacher_predictions(config, "train", progress=False)
    refined = pipeline.refined_predictions(config, preds).derived
    assert not np.array_equal(refined.prediction, preds.prediction)  # the teacher really changed
    np.testing.assert_array_equal(data.labeled_targets, refined.prediction[data.labeled_indices])
    np.testing.assert_array_equal(data.clip_label, refined.prediction[data.unlabeled_indices])  # CLIP fill
    np.testing.assert_array_equal(data.clip_confidence, refined.confidence[data.unlabeled_indices])
    assert len(data.labeled_indices) == 50  # 5 per predicted class, every class predicted
    for c in range(10):  # the 5 most confident of each predicted class
        members = np.flatnonzero(refined.prediction == c)
        best = members[np.argsort(-refined.confidence[members], kind="stable")[:5]]
        assert set(best) == set(data.labeled_indices[data.labeled_targets == c])


def test_zsa_adapt_with_teacher_method(cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "cli-run"
    argv = ["adapt", "--dataset", "digits", "--cache-dir", str(cache_dir), "--run-dir", str(run_dir),
            "--teacher-method", "sinkhorn", "--select", "topk", "--per-class-fraction", "0.1",
            *[item for o in TINY for item in ("--set", o)]]
    assert main(argv) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["completed"] and report["labeled_set"]["teacher_method"] == "sinkhorn"
    assert report["labeled_set"]["select"] == "topk" and 144 <= report["labeled_set"]["size"] <= 153  # sum ceil(.1 n_c)
    assert "adapted student top-1" in capsys.readouterr().out
    argv[argv.index("sinkhorn")] = "debias"
    assert main(argv) == 2  # the same run directory with another teacher: refused, not mixed
    assert "transduct.method: 'sinkhorn' in the checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Fig. 5 in the zero-shot report


def test_zeroshot_report_has_the_centroid_similarities(cache_dir, tmp_path):
    config = _config(cache_dir)
    report = pipeline.zeroshot_report(config, tmp_path)
    record = report["train"]["centroid_similarity"]
    assert record["grouping"] == "label" and record["num_neighbours"] == 9
    assert len(record["most_predicted"]) == len(record["least_predicted"]) == 5  # 10 classes: halves
    most = min(e["predicted"] for e in record["most_predicted"])
    assert most >= max(e["predicted"] for e in record["least_predicted"])
    preds = pipeline.teacher_predictions(config, "train", progress=False)
    features = preds.field("features").astype(np.float64)
    labels = np.asarray(preds.table.labels)
    centroids = np.stack([features[labels == c].mean(0) for c in range(10)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    entry = record["most_predicted"][0]
    others = np.delete(centroids @ centroids[entry["index"]], entry["index"])
    np.testing.assert_allclose(entry["similarities"], np.sort(others)[::-1], atol=1e-5)
    assert (tmp_path / "zeroshot_train_centroid_similarity.png").is_file()
