"""`zsa export` and `zsa predict`: a tiny digits run exported as a timm hub folder loads with plain timm (and,
for a genuine timm architecture, without this package), predicts what the run's student predicts, and the
prediction CLI skips and reports corrupt files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.export import (
    EXPORT_FILES,
    crop_pct_for,
    describe_eval_transform,
    export_run,
    load_exported,
    save_exported,
)
from zeroshot_adapt.predict import predict_folder, predict_images

TINY = ["optim.epochs=1", "optim.steps_per_epoch=3", "data.num_workers=0", "optim.batch_size=8", "optim.mu=2"]
NUM_IMAGES = 12  # digits written as PNGs for prediction


def _train(cache_dir: Path, run_dir: Path, *extra: str) -> Path:
    config = pipeline.resolve_config("digits", overrides=[f"teacher.cache_dir={cache_dir}", *TINY, *extra])
    report = pipeline.adapt(replace(config, run_dir=str(run_dir)))
    assert report["completed"]
    return run_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cnn_run(cache_dir, tmp_path_factory) -> Path:
    return _train(cache_dir, tmp_path_factory.mktemp("runs") / "cnn")


@pytest.fixture(scope="module")
def timm_run(cache_dir, tmp_path_factory) -> Path:
    return _train(cache_dir, tmp_path_factory.mktemp("runs") / "test_resnet", "student.arch=test_resnet")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """NUM_IMAGES digits as PNGs, half of them in a subfolder, plus one corrupt file."""
    from zeroshot_adapt.demo.tiny_clip import digits_images

    root = tmp_path_factory.mktemp("images")
    (root / "nested" / "deeper").mkdir(parents=True)
    images, _ = digits_images()
    for i in range(NUM_IMAGES):
        folder = root / "nested" / "deeper" if i % 2 else root
        Image.fromarray(images[i]).save(folder / f"digit_{i:02d}.png")
    (root / "nested" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _good_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("digit_*.png"))


def _run_logits(run_dir: Path, files: list[Path]) -> np.ndarray:
    """The run's own student (stages.load_trained_student) with the run's eval transform."""
    from zeroshot_adapt.data.transforms import build_transforms
    from zeroshot_adapt.stages import load_trained_student, run_config

    config = run_config(run_dir)
    model = load_trained_student(config, 10, run_dir / "student.pt")
    transform = build_transforms(config.data.image_size, recipe=config.data.augment).eval
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return model(batch).numpy()


@pytest.fixture(scope="module")
def cnn_export(cnn_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "cnn"
    assert main(["export", str(cnn_run), "--out", str(out)]) == 0
    return out


def test_export_holds_weights_only_and_loads_with_timm(cnn_run, cnn_export, digit_folder):
    from safetensors import safe_open

    assert sorted(p.name for p in cnn_export.iterdir()) == sorted(EXPORT_FILES)
    for path in cnn_export.iterdir():  # no pickle (protocol 2+ starts with 0x80) and no torch zip archive
        assert path.read_bytes()[:2] not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), path
    with safe_open(str(cnn_export / "model.safetensors"), "pt") as weights:
        saved = {k: weights.get_tensor(k) for k in weights.keys()}  # noqa: SIM118
    student = torch.load(cnn_run / "student.pt", weights_only=True)
    assert saved.keys() == student.keys() and all(torch.equal(saved[k], student[k]) for k in saved)

    # plain timm (zsa_cnn_small was registered with timm when this package was imported)
    model = timm.create_model(f"local-dir:{cnn_export}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    files = _good_files(digit_folder)
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).numpy()
    expected = _run_logits(cnn_run, files)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    assert model.pretrained_cfg["label_names"] == [str(d) for d in range(10)]


def test_config_json_has_timm_hub_fields(cnn_export):
    config = json.loads((cnn_export / "config.json").read_text())
    assert config["architecture"] == "zsa_cnn_small" and config["num_classes"] == 10
    assert config["num_features"] == 128 and config["label_names"] == [str(d) for d in range(10)]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and cfg["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert not {"tag", "license", "url", "hf_hub_id"} & set(cfg)  # no origin of some other weights
    zsa = config["zsa"]
    assert zsa["weights"] == "student" and zsa["needs_import"] == "zeroshot_adapt.models" and zsa["loader"] == "timm"
    assert zsa["preprocessing_check"]["max_abs_difference"] == 0.0


def test_the_export_holds_no_local_path(cnn_run, cnn_export):
    assert all((cnn_export / name).stat().st_mode & 0o777 == 0o644 for name in ("model.safetensors", "config.json"))
    """An export is meant for upload: the run's folder (and any other absolute path) is cut to its name."""
    from zeroshot_adapt.export import shareable

    for name in ("config.json", "README.md"):
        text = (cnn_export / name).read_text()
        assert str(cnn_run.parent) not in text and "/tmp/" not in text, name
    assert json.loads((cnn_export / "config.json").read_text())["zsa"]["run"]["dir"] == cnn_run.name
    assert shareable({"p": "classes of /home/me/classes.txt", "u": "https://hf.co/a/b", "r": ["prompts/x.json"]}) == {
        "p": "classes of classes.txt", "u": "https://hf.co/a/b", "r": ["prompts/x.json"]}


def test_model_card_says_what_the_run_was(cnn_run, cnn_export):
    card = (cnn_export / "README.md").read_text()
    report = json.loads((cnn_run / "report.json").read_text())
    provenance = report["provenance"]
    assert provenance["teacher"]["prompts"]["num_templates"] == 4  # prompts/digits.json
    for text in ("library_name: timm", "debiaspl", "CLIP `zsa-tiny-digits`, weights `bundled`", "4 template(s)",
                 "tau_clip = 0.95", f"{report['labeled_set']['size']} images", "import zeroshot_adapt.models",
                 provenance["train"]["fingerprint"], provenance["test"]["fingerprint"], "final student (these weights)",
                 f"{100 * report['student']['top1']:.2f}%", f"{100 * report['ema']['top1']:.2f}%",
                 f"{100 * report['clip_zeroshot']['top1']:.2f}%", "first template are the CLIP paper"):
        assert text in card, text


def test_genuine_timm_arch_loads_without_this_package(timm_run, digit_folder, tmp_path):
    out = tmp_path / "test_resnet"
    export_run(timm_run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["zsa"]["needs_import"] is None
    assert "With timm alone" in (out / "README.md").read_text()
    files = _good_files(digit_folder)
    script = textwrap.dedent(f"""
        import sys, numpy, timm, torch
        from PIL import Image
        model = timm.create_model("local-dir:{out}", pretrained=True).eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
        files = {[str(f) for f in files]!r}
        with torch.no_grad():
            logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
        numpy.save({str(tmp_path / "logits.npy")!r}, logits.numpy())
        assert not [m for m in sys.modules if m.startswith("zeroshot_adapt")], "zeroshot_adapt was imported"
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), _run_logits(timm_run, files), rtol=0, atol=1e-5)


def test_ema_weights_are_the_last_checkpoints_teacher(cnn_run, tmp_path):
    out = tmp_path / "ema"
    assert main(["export", str(cnn_run), "--out", str(out), "--weights", "ema"]) == 0
    model, info = load_exported(out)
    checkpoint = torch.load(cnn_run / "checkpoints" / "last.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items()}
    state = model.state_dict()
    assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in state)
    assert not all(torch.equal(state[k], checkpoint["student"][k]) for k in state)  # not the student
    assert info.config["zsa"]["weights"] == "ema" and "EMA (EMAN) teacher** at the last step" in \
        (out / "README.md").read_text()


def test_a_damaged_ema_checkpoint_is_refused_without_advising_to_start_over(cnn_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cnn_run, run)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(run), "--out", str(tmp_path / "ema"), "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the EMA teacher" in err and "--weights student" in err and "start" not in err


def test_predict_cli_skips_corrupt_files_and_sorts_top_k(cnn_run, cnn_export, digit_folder, tmp_path, caplog):
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(cnn_export), "--data-dir", str(digit_folder), "--out", str(out),
                 "--top-k", "3", "--batch-size", "5", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(out.open()))
    files = _good_files(digit_folder)
    assert sorted(r["key"] for r in rows) == sorted(f.relative_to(digit_folder).as_posix() for f in files)
    summary = json.loads((tmp_path / "predictions.summary.json").read_text())
    assert summary["num_skipped"] == 1 and summary["skipped"][0]["key"] == "nested/broken.png"
    assert summary["skipped"][0]["reason"].startswith("corrupt")
    assert "1 of 13 image(s) could not be decoded" in caplog.text and "nested/broken.png" in caplog.text
    expected = _run_logits(cnn_run, [digit_folder / r["key"] for r in rows])
    probs = torch.softmax(torch.as_tensor(expected, dtype=torch.float64), dim=1).numpy()
    for row, p in zip(rows, probs, strict=True):
        confidences = [float(row[f"top{i}_confidence"]) for i in (1, 2, 3)]
        assert confidences == sorted(confidences, reverse=True) and sum(confidences) <= 1 + 1e-6
        assert int(row["top1_class"]) == int(np.argmax(p))
        assert confidences[0] == pytest.approx(p.max(), abs=1e-6)


def test_python_api_on_folders_paths_and_pil_images(cnn_export, digit_folder):
    import zeroshot_adapt

    assert zeroshot_adapt.predict_folder is predict_folder and zeroshot_adapt.load_exported is load_exported
    files = _good_files(digit_folder)
    folder = predict_folder(cnn_export, digit_folder, top_k=10, progress=False)
    assert len(folder.keys) == NUM_IMAGES and folder.indices.shape == folder.probs.shape == (NUM_IMAGES, 10)
    assert [s["key"] for s in folder.skipped] == ["nested/broken.png"]
    np.testing.assert_allclose(folder.probs.sum(1), 1.0, atol=1e-5)  # all classes: the whole softmax
    assert (np.diff(folder.probs, axis=1) <= 0).all()
    by_key = dict(zip(folder.keys, folder.indices[:, 0], strict=True))
    pil = predict_images(cnn_export, [Image.open(f) for f in files], top_k=2)
    paths = predict_images(cnn_export, [*files, digit_folder / "nested" / "broken.png"], top_k=2)
    np.testing.assert_array_equal(pil.indices, paths.indices)
    assert pil.keys == [f"image-{i}" for i in range(len(files))] and len(paths.skipped) == 1
    assert [int(i) for i in pil.indices[:, 0]] == [by_key[f.relative_to(digit_folder).as_posix()] for f in files]
    assert pil.labels()[0][0] == folder.class_names[pil.indices[0, 0]]


def test_bad_inputs_are_user_errors(cnn_run, cnn_export, digit_folder, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["export", str(missing), "--out", str(tmp_path / "o1")]) == 2
    assert f"run directory {str(missing)!r} does not exist" in capsys.readouterr().err
    (tmp_path / "not_a_run").mkdir()
    assert main(["export", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a run directory: it holds no config.yaml" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"  # what an interrupted run leaves: report.json with completed=false
    shutil.copytree(cnn_run, unfinished)
    report = json.loads((unfinished / "report.json").read_text())
    (unfinished / "report.json").write_text(json.dumps({**report, "completed": False, "step": 1}))
    assert main(["export", str(unfinished), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert f"run {str(unfinished)!r} has not finished" in err and "step 1 of 3" in err
    (unfinished / "report.json").unlink()
    with pytest.raises(UserError, match="has not finished \\(no report.json\\)"):
        export_run(unfinished, tmp_path / "o4")
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(cnn_run), "--out", str(busy)]) == 2
    assert f"--out {str(busy)!r} exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(cnn_run), "--out", str(busy), "--force"]) == 0
    assert (busy / "notes.txt").read_text() == "mine" and (busy / "model.safetensors").is_file()

    assert main(["predict", "--model", str(cnn_run), "--data-dir", str(digit_folder), "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert main(["predict", "--model", str(cnn_export), "--data-dir", str(digit_folder), "--out",
                 str(tmp_path / "p.csv"), "--top-k", "11"]) == 2
    assert "--top-k 11 must be an integer in 1..10" in capsys.readouterr().err
    assert main(["predict", "--model", str(cnn_export), "--data-dir", str(tmp_path / "none"), "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert "is not a folder of images" in capsys.readouterr().err


def test_package_wrn_loads_from_a_folder_through_timm(tmp_path):
    """wrn28_2 (registered by this package) loads its exported weights through timm's local-dir: source."""
    import zeroshot_adapt.models  # noqa: F401

    model = timm.create_model("wrn28_2", num_classes=3).eval()
    data_config = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                   "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    save_exported(model, tmp_path, class_names=["a", "b", "c"], data_config=data_config, zsa={}, card="card\n")
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.pretrained_cfg["label_names"] == ["a", "b", "c"] and loaded.pretrained_cfg["mean"] == [0.5] * 3
    with pytest.raises(UserError, match="no pretrained weights"):
        timm.create_model("wrn28_2", pretrained=True)


@pytest.mark.parametrize("size", [16, 32, 96, 100, 224, 225])
def test_timm_transform_reproduces_the_eval_transform(size):
    """describe_eval_transform + timm's create_transform equal build_transforms' eval view (both recipes)."""
    from zeroshot_adapt.data.transforms import build_transforms
    from zeroshot_adapt.export import preprocessing_difference

    for recipe in ("small", "imagenet"):
        transform = build_transforms(size, recipe=recipe).eval
        config = describe_eval_transform(transform)
        assert preprocessing_difference(transform, config) == 0.0, (size, recipe, config)
    assert crop_pct_for(224, 256) == 0.875 and crop_pct_for(16, 16) == 1.0


def test_card_metrics_of_an_unlabeled_run_are_label_free_only():
    """Without labels the report has no top-1: the card shows its label-free diagnostics and nothing else."""
    from zeroshot_adapt.export import metrics_section

    free = {"agreement_with_clip": 0.8125, "average_confidence": 0.9, "prediction_distribution": {
        "imbalance_ratio": 3.5, "counts": [1, 2]}}
    report = {"student": {"top1": None, "top5": None, "mean_per_class_recall": None, "label_free": free},
              "ema": {"top1": None, "label_free": free}, "notes": ["the 9 test images have no labels"]}
    text = "\n".join(metrics_section(report, "student"))
    assert "top-1 |" not in text and "%" not in text
    assert "| agreement_with_clip | 0.8125 |" in text and "| prediction_distribution.imbalance_ratio | 3.5 |" in text
    assert "counts" not in text and "Note: the 9 test images have no labels" in text
    empty = "\n".join(metrics_section({}, "student"))
    assert "measured no metric" in empty


def test_open_clip_style_eval_transforms_are_described_for_timm():
    """CLIP students use open_clip's eval preprocessing (bicubic, a convert-to-RGB step; squash or shorter side)."""
    from torchvision import transforms as T

    from zeroshot_adapt.export import preprocessing_difference

    def _convert_to_rgb(image):
        return image.convert("RGB")

    finish = [_convert_to_rgb, T.ToTensor(), T.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))]
    for resize, mode in ((T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), "center"),
                         (T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), "squash")):
        transform = T.Compose([resize, T.CenterCrop(32), *finish])
        config = describe_eval_transform(transform)
        assert config["crop_mode"] == mode and config["interpolation"] == "bicubic"
        assert preprocessing_difference(transform, config) == 0.0
    with pytest.raises(UserError, match="unexpected step"):
        describe_eval_transform(T.Compose([T.Resize(32), T.RandomHorizontalFlip(), T.CenterCrop(32), *finish]))


def test_default_top_k_fits_a_model_with_fewer_classes_and_a_truncated_pil_image_is_skipped(tmp_path):
    """A 3-class model predicts with the defaults (top-3, not an error for top-5); an explicit --top-k above the
    class count is refused naming the range; a truncated PIL image given by the caller is skipped, not fatal."""
    import io
    from types import SimpleNamespace

    import torchvision.transforms as T

    from zeroshot_adapt.predict import Predictor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    info = SimpleNamespace(class_names=["cat", "dog", "fox"], transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]),
                           data_config={"input_size": (3, 8, 8)})
    predictor = Predictor(model, info, torch.device("cpu"))
    good = Image.new("RGB", (12, 12), (200, 30, 30))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buffer, format="PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:60]))  # lazily opened: fails when its pixels are read
    result = predictor.predict_images([good, truncated], progress=False)
    assert result.indices.shape == (1, 3) and result.keys == ["image-0"]
    assert [s["key"] for s in result.skipped] == ["image-1"] and result.skipped[0]["reason"].startswith("corrupt")
    assert np.all(np.diff(result.probs, axis=1) <= 0) and np.isclose(result.probs.sum(), 1.0, atol=1e-5)
    with pytest.raises(UserError, match=r"--top-k 5 must be an integer in 1\.\.3"):
        predictor.predict_images([good], top_k=5, progress=False)
