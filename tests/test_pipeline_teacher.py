"""The teacher stage end to end, offline: a tiny random-weight open_clip model, image folders the tests
write, the real EuroSAT subset; cache hit/miss, multi-process build, corrupt images, CLI errors."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.demo.tiny_clip import TINY_CLIP_MODEL, register_tiny_clip


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory) -> Path:
    """Random weights of the tiny open_clip config, saved as a local checkpoint (so they hash)."""
    import open_clip

    register_tiny_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "random_tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


def _config(tmp_path: Path, folder: Path, weights: Path, **teacher):
    config = pipeline.resolve_config(
        "imagefolder",
        overrides=[f"data.data_dir={folder}", f"teacher.model={TINY_CLIP_MODEL}", f"teacher.pretrained={weights}",
                   f"teacher.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "teacher.batch_size=5",
                   "teacher.shard_size=4"],
    )
    return replace(config, teacher=replace(config.teacher, **teacher)) if teacher else config


def test_cache_is_built_once_then_hit(tmp_path, random_clip, monkeypatch):
    folder = write_image_folder(tmp_path / "images", per_class=5)
    config = _config(tmp_path, folder, random_clip)
    first = pipeline.teacher_predictions(config, "train")
    n = len(first.table)
    assert first.prediction.shape == (n,) and first.field("logits").shape == (n, 3)
    assert first.field("features").dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(first.field("features").astype(np.float32), axis=1), 1, atol=2e-3)
    assert (first.confidence > 0).all() and (first.confidence <= 1).all()
    # predictions are the argmax of the stored logits, aligned with the table's keys
    np.testing.assert_array_equal(first.prediction, first.field("logits").astype(np.float32).argmax(1))

    def no_clip(*args, **kwargs):
        raise AssertionError("a cache hit must not load CLIP")

    monkeypatch.setattr("zeroshot_adapt.teacher.clip.load_clip", no_clip)
    second = pipeline.teacher_predictions(config, "train")
    np.testing.assert_array_equal(second.confidence, first.confidence)
    # the text classifier and logit scale the logits were made with are stored with them (cache hit too)
    classifier, scale = second.text_classifier, second.logit_scale
    assert classifier.shape == (3, first.field("features").shape[1]) and classifier.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1, atol=1e-5)
    features = second.field("features").astype(np.float32)
    np.testing.assert_allclose(scale * features @ classifier.T, second.field("logits").astype(np.float32),
                               atol=0.05 * scale)


def test_every_identity_field_changes_the_key(tmp_path, random_clip):
    folder = write_image_folder(tmp_path / "images", per_class=5)
    config = _config(tmp_path, folder, random_clip)
    table = pipeline.load_table(config, "train")
    prompts = pipeline.prompts_for(config, table)
    base = pipeline.cache_identity(config, table, prompts)

    other_weights = tmp_path / "other.pt"
    state = torch.load(random_clip)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, other_weights)
    variants = {
        "weights": pipeline.cache_identity(_config(tmp_path, folder, other_weights), table, prompts),
        "templates": pipeline.cache_identity(config, table, replace(prompts, templates=("a drawing of a {}.",))),
        "class_names": pipeline.cache_identity(config, table, replace(prompts, classes=("a", "b", "c"))),
        "split": pipeline.cache_identity(config, pipeline.load_table(config, "test"), prompts),
    }
    write_image_folder(tmp_path / "images", classes=("cat",), per_class=6, seed=9)  # one more cat
    variants["dataset_fingerprint"] = pipeline.cache_identity(config, pipeline.load_table(config, "train"), prompts)
    rn50 = replace(config, teacher=replace(config.teacher, model="RN50-quickgelu", pretrained="none"))
    variants["preprocess"] = pipeline.cache_identity(rn50, table, prompts)
    for field, identity in variants.items():
        assert identity[field] != base[field], field
    assert variants["preprocess"]["preprocess"]["size"] == 224 and base["preprocess"]["size"] == 32


def test_changing_the_templates_rebuilds(tmp_path, random_clip):
    folder = write_image_folder(tmp_path / "images", per_class=5)
    prompt_file = tmp_path / "p.json"
    prompt_file.write_text(json.dumps({"classes": ["cat", "dog", "fox"], "templates": ["a photo of a {}."]}))
    a = pipeline.teacher_predictions(_config(tmp_path, folder, random_clip, prompts=str(prompt_file)), "train")
    prompt_file.write_text(json.dumps({"classes": ["cat", "dog", "fox"], "templates": ["a sketch of the {}."]}))
    b = pipeline.teacher_predictions(_config(tmp_path, folder, random_clip, prompts=str(prompt_file)), "train")
    assert a.cache.directory != b.cache.directory
    assert not np.array_equal(a.field("logits"), b.field("logits"))


def test_corrupt_image_is_skipped_counted_and_named(tmp_path, random_clip, caplog):
    folder = write_image_folder(tmp_path / "images", per_class=5, suffix=".jpg")
    config = _config(tmp_path, folder, random_clip)
    victim = next(k for k in pipeline.load_table(config, "train").keys if k.startswith("dog/"))
    bad = folder / victim
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG (size changes: a new dataset fingerprint)
    with caplog.at_level("WARNING"):
        preds = pipeline.teacher_predictions(config, "train")
    assert victim in caplog.text
    keys = list(preds.table.keys)
    invalid = [k for k, ok in zip(keys, preds.valid, strict=True) if not ok]
    assert invalid == [victim]
    report = pipeline.pseudolabel_report(replace(config, pseudo=replace(config.pseudo, tau_clip=0.2)),
                                         tmp_path / "out")
    assert report["num_corrupt_skipped"] == 1 and report["total"] == len(keys) - 1


def test_two_processes_build_the_same_cache(tmp_path, random_clip):
    folder = write_image_folder(tmp_path / "images", per_class=6)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    common = ["cache", "--dataset", "imagefolder", "--data-dir", str(folder), "--model", TINY_CLIP_MODEL,
              "--pretrained", str(random_clip), "--num-workers", "0", "--split", "train",
              "--set", "teacher.shard_size=3", "--set", "teacher.batch_size=2"]
    one = [sys.executable, "-m", "zeroshot_adapt.cli", *common, "--cache-dir", str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "zeroshot_adapt.cli", *common, "--cache-dir", str(tmp_path / "two")]
    for command in (one, two):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    (dir_one,), (dir_two,) = ([p for p in (tmp_path / name).iterdir() if p.name != ".locks"] for name in ("one", "two"))
    assert dir_one.name == dir_two.name
    # every file but build.json (when and by how many processes) is identical
    files = sorted(str(p.relative_to(dir_one)) for p in dir_one.rglob("*") if p.is_file() and p.name != "build.json")
    assert files == sorted(str(p.relative_to(dir_two)) for p in dir_two.rglob("*")
                           if p.is_file() and p.name != "build.json")
    match, mismatch, errors = filecmp.cmpfiles(dir_one, dir_two, files, shallow=False)
    assert not mismatch and not errors, mismatch


def test_zeroshot_and_pseudolabel_commands_on_real_eurosat(tmp_path, random_clip, shared_data, capsys):
    eurosat = shared_data / "eurosat_rgb_100"
    common = ["--dataset", "eurosat", "--data-dir", str(eurosat), "--model", TINY_CLIP_MODEL,
              "--pretrained", str(random_clip), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    assert main(["zeroshot", *common, "--out", str(tmp_path / "zs")]) == 0
    report = json.loads((tmp_path / "zs" / "zeroshot.json").read_text())
    assert report["train"]["num_samples"] + report["test"]["num_samples"] == 1000
    assert len(report["test"]["per_class"]) == 10 and report["test"]["top1"] is not None
    assert (tmp_path / "zs" / "zeroshot_test_predictions_per_class.png").stat().st_size > 1000
    assert main(["pseudolabel", *common, "--tau-clip", "0.2", "--out", str(tmp_path / "pl")]) == 0
    selection = json.loads((tmp_path / "pl" / "pseudolabels.json").read_text())
    rows = (tmp_path / "pl" / "pseudo_labels.csv").read_text().splitlines()
    assert len(rows) == 1 + report["train"]["num_samples"]
    assert sum(int(r.rsplit(",", 1)[1]) for r in rows[1:]) == selection["kept"]
    assert "kept" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["zeroshot", "--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
        (["pseudolabel", "--dataset", "digits", "--tau-clip", "1.5"], "1.5"),
        (["pseudolabel", "--dataset", "digits", "--tau-clip", "0"], "(0, 1]"),
        (["cache", "--dataset", "imagefolder", "--data-dir", "/no/such/dir"], "/no/such/dir"),
        (["cache", "--dataset", "digits", "--pretrained", "/no/weights.pt"], "/no/weights.pt"),
        (["cache", "--dataset", "digits", "--model", "NoSuchNet"], "NoSuchNet"),
        (["adapt", "--dataset", "digits", "--set", "algorithm.tau=lots"], "lots"),
        (["adapt", "--dataset", "digits", "--algorithm", "magic"], "unknown algorithm 'magic'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(argv, message, capsys, tmp_path):
    assert main([*argv, "--cache-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_weights_that_cannot_be_downloaded_say_what_to_pass(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    folder = write_image_folder(tmp_path / "images", per_class=2)
    done = subprocess.run(
        [sys.executable, "-m", "zeroshot_adapt.cli", "cache", "--dataset", "imagefolder", "--data-dir", str(folder),
         "--model", "RN50-quickgelu", "--pretrained", "openai", "--cache-dir", str(tmp_path / "c"),
         "--num-workers", "0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "could not download CLIP weights RN50-quickgelu/openai" in done.stderr
    assert "--pretrained /path/to/weights" in done.stderr


def test_labeled_set_carries_clip_labels_never_ground_truth(tmp_path, random_clip):
    """The official code's zero-shot set trains on ground truth; ours must train on CLIP's labels."""
    from zeroshot_adapt.data.datasets import LabeledViews

    folder = write_image_folder(tmp_path / "images", per_class=8)
    config = _config(tmp_path, folder, random_clip)
    config = replace(config, pseudo=replace(config.pseudo, tau_clip=0.01))  # keep (almost) everything
    data = pipeline.prepare_training_data(config)
    preds = pipeline.teacher_predictions(config, "train")
    truth = np.asarray(data.train.labels)[data.labeled_indices]
    np.testing.assert_array_equal(data.labeled_targets, preds.prediction[data.labeled_indices])
    assert (data.labeled_targets != truth).any()  # a random teacher is often wrong: the labels differ
    views = LabeledViews(data.train, data.labeled_indices, data.labeled_targets, weak=lambda im: 0)
    assert [views[i]["target"] for i in range(len(views))] == data.labeled_targets.tolist()
    # the unlabeled set is every valid training sample, with CLIP's label and confidence attached
    assert len(data.unlabeled_indices) == len(data.train)
    np.testing.assert_array_equal(data.clip_label, preds.prediction)


def test_weights_file_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """A local CLIP checkpoint is hashed once per process (its id is asked for several times per run), and
    hashed again when its bytes (size / mtime) change."""
    import hashlib
    import os

    from zeroshot_adapt.teacher import clip

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
    first = clip.file_sha256(path)
    assert first == clip.file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest() and len(opened) == 1
    path.write_bytes(b"b" * 1001)
    os.utime(path, ns=(1, 1))
    assert clip.file_sha256(path) == hashlib.sha256(b"b" * 1001).hexdigest() and len(opened) == 2
