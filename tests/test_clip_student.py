"""CLIP as the student (student.arch=clip, models/clip_student.py): step 0 equals the cached zero-shot logits,
adapt runs end to end and the trained student loads, last-blocks freezes what it says, export round trip."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from zeroshot_adapt import pipeline
from zeroshot_adapt.cli import main
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.models.clip_student import ClipStudent, count_parameters, create_clip_student
from zeroshot_adapt.stages import load_trained_student, predict_table, run_config

TINY = ["optim.epochs=1", "optim.steps_per_epoch=3", "data.num_workers=0", "optim.batch_size=8", "optim.mu=2"]
# Same weights, same preprocessing, fp32 on CPU; the cache stores logits as float16 (relative rounding <= 2^-11),
# so the student's fp32 logits agree to fp16 precision: |a - b| <= 1e-4 + 2^-10 |b| (twice fp16's rounding).
STEP0_ATOL = 1e-4
STEP0_RTOL = 2.0**-10
CLIP_LR = 1e-3  # fine-tuning a pretrained encoder: the demo's lr 0.03 (for a CNN from scratch) wrecks it in 3 steps


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _config(cache_dir, *extra, run_dir="unused"):
    config = pipeline.resolve_config("digits", overrides=[f"teacher.cache_dir={cache_dir}", "student.arch=clip",
                                                          *TINY, *extra])
    return replace(config, run_dir=str(run_dir))


@pytest.fixture(scope="module")
def step0(cache_dir):
    """(config, the CLIP student at step 0, the test split's cached predictions)."""
    config = _config(cache_dir)
    data = pipeline.prepare_training_data(config)
    student = create_clip_student(config, data.num_classes, data.text_classifier, data.logit_scale)
    return config, student, pipeline.teacher_predictions(config, "test")


def test_step0_logits_equal_the_cached_zeroshot_logits(step0):
    config, student, preds = step0
    eval_view = pipeline.student_transforms(config, recipe=config.data.augment, hflip=False).eval
    keys = np.arange(len(preds.table))
    logits, features = predict_table(student, preds.table, keys, eval_view, with_features=True,
                                     device=torch.device("cpu"))
    cached = preds.field("logits").astype(np.float32)
    assert logits.shape == cached.shape == (360, 10)
    np.testing.assert_allclose(logits, cached, atol=STEP0_ATOL, rtol=STEP0_RTOL)
    assert (logits.argmax(1) == preds.prediction).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)  # pre-logits: L2-normalised
    # the CNN student's views (16 px, ImageNet mean/std) would not match: the test can fail
    other = pipeline.student_transforms(replace(config, student=replace(config.student, arch="zsa_cnn_small")),
                                        recipe=config.data.augment, hflip=False)
    assert other.image_size != 32 or other.mean != tuple(student.pretrained_cfg["mean"])


def test_head_is_the_scaled_text_classifier(step0):
    config, student, preds = step0
    expected = preds.logit_scale * preds.text_classifier
    assert torch.equal(student.head.weight, torch.as_tensor(expected))
    assert not student.head.bias.any()


def test_last_blocks_freezes_all_but_the_last_blocks_norms_and_head(cache_dir, step0):
    config, student_all, _ = step0
    trainable_all, total = count_parameters(student_all)
    assert trainable_all == total
    student = ClipStudent.from_export_config(student_all.export_config())
    student.set_trainable("last-blocks", last_blocks=1)
    visual = student.visual
    expected = {name for name, p in student.named_parameters()
                if name.startswith(("visual.transformer.resblocks.3.", "visual.ln_", "head."))
                or name == "visual.proj" or ".ln_" in name}
    assert {n for n, p in student.named_parameters() if p.requires_grad} == expected
    assert not any(p.requires_grad for p in visual.transformer.resblocks[0].attn.parameters())
    assert not visual.conv1.weight.requires_grad and not visual.positional_embedding.requires_grad
    trainable, total_again = count_parameters(student)
    block = sum(p.numel() for n, p in visual.transformer.resblocks[3].named_parameters())
    head = sum(p.numel() for p in student.head.parameters())
    norms = sum(p.numel() for n, p in student.named_parameters() if "ln_" in n and "resblocks.3." not in n)
    assert trainable == block + head + norms + visual.proj.numel()
    assert total_again == total and trainable < total / 2
    with pytest.raises(UserError, match=r"clip_train_blocks=9 must lie in 1\.\.4"):
        student.set_trainable("last-blocks", last_blocks=9)


def test_export_config_round_trip_same_architecture_and_outputs(step0):
    _, student, _ = step0
    cfg = student.export_config()
    json.dumps(cfg)  # serialisable as it is
    assert cfg["model_name"] == "zsa-tiny-digits" and cfg["image_size"] == 32 and cfg["num_classes"] == 10
    assert cfg["embed_dim"] == 64 and cfg["train"] == "all" and len(cfg["mean"]) == 3
    rebuilt = ClipStudent.from_export_config(json.loads(json.dumps(cfg)))
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [
        (k, v.shape) for k, v in student.state_dict().items()]
    images = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(rebuilt.eval()(images), student.eval()(images))  # random weights before loading
    rebuilt.load_state_dict(student.state_dict())
    assert torch.equal(rebuilt(images), student(images))
    assert rebuilt.export_config() == cfg
    with pytest.raises(UserError, match="not a CLIP student export config"):
        ClipStudent.from_export_config({"model_name": "zsa-tiny-digits"})


def test_timm_like_interface(step0):
    _, student, _ = step0
    model = ClipStudent.from_export_config(student.export_config())
    model.load_state_dict(student.state_dict())
    images = torch.randn(2, 3, 32, 32)
    pre = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(model.get_classifier()(pre), model(images))
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(images).shape == (2, 3) and model.export_config()["num_classes"] == 3


def test_bad_clip_train_is_refused_listing_the_valid_values(cache_dir):
    with pytest.raises(UserError, match="student.clip_train.*one of all, last-blocks"):
        _config(cache_dir, "student.clip_train=some")


def test_lora_is_refused_saying_why_and_naming_the_working_modes(cache_dir, step0, tmp_path):
    _, student, _ = step0
    with pytest.raises(UserError, match=r"clip_train 'lora' \(LoRA is not offered.*valid: all, last-blocks"):
        student.set_trainable("lora")
    with pytest.raises(UserError, match="student.clip_train"):  # refused by the config, before any stage
        _config(cache_dir, "student.clip_train=lora", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("pretrained", ["timm", "timm:a1_in1k", "a1_in1k"])
def test_timm_weights_for_a_clip_student_are_refused(cache_dir, tmp_path, pretrained):
    config = _config(cache_dir, f"student.pretrained={pretrained}", run_dir=tmp_path / "run")
    with pytest.raises(UserError, match="makes no sense with student.arch=clip"):
        pipeline.adapt(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("algorithm", ["fixmatch", "debiaspl"])
def test_adapt_end_to_end_then_load_and_predict(cache_dir, tmp_path, algorithm, step0):
    run_dir = tmp_path / "run"
    argv = ["adapt", "--dataset", "digits", "--cache-dir", str(cache_dir), "--run-dir", str(run_dir),
            "--set", "student.arch=clip", "--set", f"algorithm.name={algorithm}",
            "--set", "student.clip_train=last-blocks", "--set", "student.clip_train_blocks=1",
            "--set", f"optim.lr={CLIP_LR}"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["completed"] and report["step"] == 3 and report["algorithm"] == algorithm
    assert report["method"]["views"] == "small 32 px"  # CLIP's input size, not the demo's data.image_size=16
    config = run_config(run_dir)
    # frozen parameters are not in the optimizer (so no weight decay on them): one entry per trainable tensor
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    in_optimizer = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
    expected = ClipStudent.from_export_config({**step0[1].export_config(), "train": "last-blocks", "train_blocks": 1})
    assert in_optimizer == sum(p.requires_grad for p in expected.parameters()) < len(list(expected.parameters()))
    assert config.student.arch == "clip" and config.student.clip_train == "last-blocks"
    model = load_trained_student(config, 10, run_dir / "student.pt")
    _, initial, preds = step0
    trained, start = model.state_dict(), initial.state_dict()
    # frozen: the first blocks are bit-identical to the teacher's; the head moved
    assert torch.equal(trained["visual.transformer.resblocks.0.attn.in_proj_weight"],
                       start["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert not torch.equal(trained["visual.transformer.resblocks.3.mlp.c_fc.weight"],
                           start["visual.transformer.resblocks.3.mlp.c_fc.weight"])
    eval_view = pipeline.student_transforms(config, recipe=config.data.augment, hflip=False).eval
    logits, _ = predict_table(model, preds.table, np.arange(len(preds.table)), eval_view, device=torch.device("cpu"))
    top1 = float((logits.argmax(1) == np.asarray(preds.table.labels)).mean())
    assert top1 == pytest.approx(report["student"]["top1"], abs=1e-6)  # the loaded student is the evaluated one
    if algorithm == "fixmatch":  # zsa export / load_exported (issue 11 parts 3-4) rebuild it from export_config
        from zeroshot_adapt.export import export_run, load_exported

        result = export_run(run_dir, tmp_path / "exported")
        exported, info = load_exported(result.out_dir)
        assert info.architecture == "clip" and result.preprocessing_difference < 1e-5
        images = torch.stack([eval_view(preds.table.load_image(i)) for i in range(4)])
        assert torch.allclose(exported(images), model(images), atol=1e-5)
    # it starts at CLIP's zero-shot accuracy (a random-init student would sit near 10%); 3 small steps stay near it
    assert abs(top1 - report["clip_zeroshot"]["top1"]) < 0.1


def test_student_pretrained_file_must_be_a_clip_student_state_dict(cache_dir, tmp_path, step0):
    config, student, preds = step0
    saved = tmp_path / "student.pt"
    state = {k: v + 1 if v.is_floating_point() else v for k, v in student.state_dict().items()}
    torch.save(state, saved)
    with_file = replace(config, student=replace(config.student, pretrained=str(saved)))
    loaded = create_clip_student(with_file, 10, preds.text_classifier, preds.logit_scale)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)  # the file's weights, not the head init
    torch.save({"conv1.weight": torch.zeros(3)}, saved)
    with pytest.raises(UserError, match="is not a state dict of this CLIP student"):
        create_clip_student(with_file, 10, preds.text_classifier, preds.logit_scale)


def test_last_blocks_of_a_resnet_tower_is_its_last_stage_attnpool_and_batchnorms():
    from zeroshot_adapt.models.clip_student import _build_visual, _model_config

    spec = {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    model = ClipStudent(_build_visual(_model_config("RN50-quickgelu")), num_classes=5, embed_dim=1024, spec=spec)
    model.set_trainable("last-blocks", last_blocks=3)  # RN50's layer4 has 3 bottlenecks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("visual.layer4.", "visual.attnpool.", "head.")) or ".bn" in n or "downsample.1" in n
                or n.startswith("visual.bn")}
    assert trainable == expected
    assert "visual.layer3.5.conv1.weight" not in trainable and "visual.layer3.5.bn1.weight" in trainable
    with pytest.raises(UserError, match=r"must lie in 1\.\.16"):
        model.set_trainable("last-blocks", last_blocks=17)
