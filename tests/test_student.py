"""Student creation (timm, checkpoints with MoCo key remapping) and the EMAN teacher."""

import pytest
import timm
import torch
from torch import nn

from zeroshot_adapt.algorithms import ALGORITHMS
from zeroshot_adapt.algorithms.base import Batch, LabeledBatch, UnlabeledBatch
from zeroshot_adapt.config import AlgorithmConfig
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.models.student import (
    EmanTeacher,
    create_student,
    load_checkpoint,
    remap_checkpoint_keys,
    unwrap_model,
)


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model sits in `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))


# --- EMAN teacher ----------------------------------------------------------------------------------


def test_eman_averages_parameters_and_bn_statistics_and_copies_num_batches_tracked():
    student = conv_bn()
    teacher = EmanTeacher(student)
    old_weight = teacher.module[0].weight.detach().clone()
    with torch.no_grad():
        student[0].weight.fill_(1.0)
        student[1].running_mean.copy_(torch.tensor([1.0, 2.0]))  # teacher: [0, 0]
        student[1].running_var.copy_(torch.tensor([3.0, 5.0]))  # teacher: [1, 1]
        student[1].num_batches_tracked.fill_(7)  # teacher: 0
    teacher.update(student, momentum=0.9)
    bn = teacher.module[1]
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.1, 0.2]))  # 0.9 * 0 + 0.1 * [1, 2]
    torch.testing.assert_close(bn.running_var, torch.tensor([1.2, 1.4]))  # 0.9 * 1 + 0.1 * [3, 5]
    assert int(bn.num_batches_tracked) == 7 and bn.num_batches_tracked.dtype == torch.int64
    torch.testing.assert_close(teacher.module[0].weight, 0.9 * old_weight + 0.1)
    teacher.update(student, momentum=0.9)  # a second step: 0.9 * 0.1 + 0.1 * 1 = 0.19
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.19, 0.38]))


def test_eman_teacher_stays_frozen_and_in_eval_mode():
    student = conv_bn()
    teacher = EmanTeacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    teacher.train()
    assert not teacher.training and not teacher.module.training and not teacher.module[1].training
    before = teacher.module[1].running_mean.clone()
    teacher(torch.randn(4, 1, 3, 3) + 5.0)  # eval-mode BN: its running statistics do not move
    assert torch.equal(teacher.module[1].running_mean, before)
    # the copy is deep: changing the student leaves the teacher alone until update()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert not torch.equal(student[0].weight, teacher.module[0].weight)


def test_eman_unwraps_a_ddp_style_student_and_roundtrips_its_state():
    student = conv_bn()
    wrapped = Wrapper(student)
    teacher = EmanTeacher(wrapped)
    assert set(teacher.module.state_dict()) == set(student.state_dict())
    with torch.no_grad():
        student[1].running_mean.fill_(1.0)
    teacher.update(wrapped, momentum=0.5)
    torch.testing.assert_close(teacher.module[1].running_mean, torch.full((2,), 0.5))
    assert unwrap_model(Wrapper(Wrapper(student))) is student

    other = EmanTeacher(conv_bn())
    other.load_state_dict(teacher.state_dict())
    assert torch.equal(other.module[1].running_mean, teacher.module[1].running_mean)
    with pytest.raises(ValueError, match="differ"):
        teacher.update(nn.Sequential(nn.Conv2d(1, 2, 1)), momentum=0.5)


def test_debiaspl_steps_on_a_tiny_timm_model_and_the_loss_decreases():
    torch.manual_seed(0)
    student = create_student("resnet10t", num_classes=10)
    teacher = EmanTeacher(student)
    algorithm = ALGORITHMS.get("debiaspl")(10, AlgorithmConfig(threshold=0.0, lambda_u=1.0, tau=0.5))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    batch = Batch(
        labeled=LabeledBatch(images=images[:4], targets=torch.tensor([0, 1, 2, 3])),
        unlabeled=UnlabeledBatch(
            weak=[images[4:]],
            strong=[images[4:] + 0.1 * torch.randn(4, 3, 32, 32, generator=generator)],
            index=torch.arange(4),
            true_label=torch.full((4,), -1),
            clip_label=torch.full((4,), -1),
            clip_confidence=torch.zeros(4),
        ),
    )
    student.train()
    losses = []
    for _ in range(4):
        out = algorithm.step(batch, student=student, teacher=teacher.module)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        teacher.update(student, momentum=0.9)
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not teacher.training
    assert not torch.allclose(algorithm.class_prior, torch.full((10,), 0.1))  # the prior moved


# --- creating students -----------------------------------------------------------------------------


def test_create_student_random_init_has_the_requested_head():
    model = create_student("resnet10t", num_classes=7, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_project_wide_resnets_are_valid_arch_names():
    assert create_student("wrn28_2", num_classes=10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_arch_lists_close_matches():
    with pytest.raises(UserError, match="resnet50"):  # found with the pattern *resnet5*
        create_student("resnet5", num_classes=3)
    with pytest.raises(UserError, match="resnet50"):  # found by string similarity
        create_student("resnet_50", num_classes=3)


def test_timm_weights_offline_give_a_clear_user_error(monkeypatch):
    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(*args, **kwargs)

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="could not fetch timm weights 'resnet10t'"):
        create_student("resnet10t", num_classes=3, pretrained="timm")
    with pytest.raises(UserError, match="valid tags for 'resnet10t': c3_in1k"):
        create_student("resnet10t", num_classes=3, pretrained="no_such_tag")


# --- checkpoints -----------------------------------------------------------------------------------


def moco_checkpoint(backbone: nn.Module) -> dict:
    """A fabricated MoCo v2 checkpoint: query + key encoders with an MLP head, the queue, optimizer info."""
    state = {}
    for name, tensor in backbone.state_dict().items():
        if name.startswith("fc."):
            continue
        state[f"module.encoder_q.{name}"] = tensor.clone()
        state[f"module.encoder_k.{name}"] = torch.zeros_like(tensor)
    width = backbone.fc.in_features
    for prefix in ("module.encoder_q.", "module.encoder_k."):
        state[prefix + "fc.0.weight"] = torch.randn(width, width)
        state[prefix + "fc.0.bias"] = torch.zeros(width)
        state[prefix + "fc.2.weight"] = torch.randn(128, width)
        state[prefix + "fc.2.bias"] = torch.zeros(128)
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_moco_v2_resnet50_keys_map_onto_timm_resnet50():
    with torch.device("meta"):  # key names only: no memory, no download
        resnet50 = timm.create_model("resnet50", num_classes=10)
    names = list(resnet50.state_dict())
    state = {f"module.encoder_q.{k}": torch.zeros(1) for k in names if not k.startswith("fc.")}
    state |= {f"module.encoder_k.{k}": torch.zeros(1) for k in names}
    state |= {f"module.encoder_q.fc.{i}.{p}": torch.zeros(1) for i in (0, 2) for p in ("weight", "bias")}
    state |= {"module.queue": torch.zeros(1), "module.queue_ptr": torch.zeros(1)}
    remapped = remap_checkpoint_keys(state, head_prefix="fc.")
    assert remapped.source_format == "moco"
    assert set(remapped.state) == {k for k in names if not k.startswith("fc.")}
    assert "layer1.0.downsample.1.running_var" in remapped.state and "conv1.weight" in remapped.state
    assert remapped.dropped_head == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    assert "module.queue" in remapped.ignored and "module.encoder_k.conv1.weight" in remapped.ignored


def test_load_moco_checkpoint_into_a_student(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save(moco_checkpoint(source), path)

    torch.manual_seed(2)
    student = create_student("resnet18", num_classes=10, pretrained=str(path))
    for name, tensor in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(student.state_dict()[name], tensor), name
    assert student.fc.weight.shape == (10, 512)  # the head keeps its fresh initialization

    report = load_checkpoint(timm.create_model("resnet18", num_classes=10), path)
    assert report.source_format == "moco"
    assert report.missing == ["fc.bias", "fc.weight"]
    assert report.unexpected == [] and report.mismatched == []
    assert report.dropped_head == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]


def test_load_ddp_checkpoint_and_reject_unrelated_ones(tmp_path):
    source = conv_bn()
    path = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
    report = load_checkpoint(target, path)
    assert report.source_format == "ddp" and report.missing == []
    assert torch.equal(target[0].weight, source[0].weight)

    torch.save({"state_dict": {"encoder.layer.weight": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="shares no parameter"):
        load_checkpoint(target, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not exist"):
        create_student("resnet10t", num_classes=3, pretrained=str(tmp_path / "missing.pth"))


# --- published self-supervised formats (issue 8) -------------------------------------------------------


SMALL_RESNET = "test_resnet"  # timm's 0.47M-parameter ResNet: the same key layout rules, fast to build


def _backbone(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(SMALL_RESNET, num_classes=1000)


def _trunk(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _mlp(prefix: str, width: int, out: int = 128) -> dict:
    return {f"{prefix}0.weight": torch.randn(width, width), f"{prefix}0.bias": torch.zeros(width),
            f"{prefix}2.weight": torch.randn(out, width), f"{prefix}2.bias": torch.zeros(out)}


def moco_v3_checkpoint(backbone: nn.Module) -> dict:
    """MoCo v3 (facebookresearch/moco-v3) ResNet: base encoder with an MLP fc, momentum encoder, predictor."""
    state = {f"module.base_encoder.{k}": v for k, v in _trunk(backbone).items()}
    state |= {f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in _trunk(backbone).items()}
    state |= _mlp("module.base_encoder.fc.", 96) | _mlp("module.momentum_encoder.fc.", 96)
    state |= _mlp("module.predictor.", 128, 128)
    return {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {}, "scaler": {}}


def moco_eman_checkpoint(backbone: nn.Module) -> dict:
    """MoCo-EMAN (amazon-science/exponential-moving-average-normalization, models/moco.py MoCoEMAN): the MoCo v2
    layout — state_dict with module.encoder_q.* (fc.0 / fc.2 projection), module.encoder_k.*, queue, queue_ptr."""
    return moco_checkpoint(backbone) | {"arch": "MoCoEMAN", "epoch": 800}


def dino_checkpoint(backbone: nn.Module) -> dict:
    """DINO full checkpoint: teacher {backbone.*, head.*}, student {module.backbone.*, module.head.*}, args."""
    import argparse

    teacher = {f"backbone.{k}": v for k, v in _trunk(backbone).items()} | _mlp("head.mlp.", 96, 256)
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in _trunk(backbone).items()}
    return {"teacher": teacher, "student": student, "epoch": 100, "args": argparse.Namespace(arch="resnet50")}


def swav_checkpoint(backbone: nn.Module) -> dict:
    """SwAV (facebookresearch/swav) release: a bare state dict, module.* trunk + projection_head + prototypes."""
    state = {f"module.{k}": v for k, v in _trunk(backbone).items()}
    return state | _mlp("module.projection_head.", 96) | {"module.prototypes.weight": torch.randn(3000, 128)}


@pytest.mark.parametrize(
    ("build_checkpoint", "source_format", "container", "dropped", "ignored_prefix"),
    [
        (moco_checkpoint, "moco", "state_dict", 4, "module.encoder_k."),
        (moco_eman_checkpoint, "moco", "state_dict", 4, "module.encoder_k."),
        (moco_v3_checkpoint, "moco_v3", "state_dict", 4, "module.momentum_encoder."),
        (dino_checkpoint, "dino", "teacher", 0, "head."),
        (swav_checkpoint, "swav", None, 5, None),
        (lambda b: {"state_dict": {f"module.{k}": v for k, v in _trunk(b).items()}}, "ddp", "state_dict", 0, None),
        (lambda b: _trunk(b), "plain", None, 0, None),  # e.g. DINO's backbone-only release
    ],
    ids=["moco_v2", "moco_eman", "moco_v3", "dino", "swav", "ddp", "plain"],
)
def test_published_checkpoint_formats_load_the_backbone(tmp_path, build_checkpoint, source_format, container,
                                                         dropped, ignored_prefix):
    source = _backbone()
    path = tmp_path / "ssl.pth.tar"
    torch.save(build_checkpoint(source), path)
    torch.manual_seed(2)
    student = timm.create_model(SMALL_RESNET, num_classes=10)
    fresh_head = student.fc.weight.detach().clone()
    report = load_checkpoint(student, path)
    assert report.source_format == source_format and report.container == container
    for name, tensor in _trunk(source).items():
        assert torch.equal(student.state_dict()[name], tensor), name  # every backbone tensor, BN statistics too
    assert torch.equal(student.fc.weight, fresh_head)  # the classifier keeps its fresh initialization
    assert report.missing == ["fc.bias", "fc.weight"]
    assert report.unexpected == [] and report.mismatched == []
    assert len(report.dropped_head) == dropped
    assert all(k.startswith(("fc.", "projection_head.", "prototypes.")) for k in report.dropped_head)
    if ignored_prefix is not None:
        assert report.ignored and any(k.startswith(ignored_prefix) for k in report.ignored)
        assert not any(k.startswith(("module.encoder_q.conv", "module.base_encoder.conv")) for k in report.ignored)
    # the same through create_student
    model = create_student(SMALL_RESNET, num_classes=10, pretrained=str(path))
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)


# --- label leakage and the random-init warning ---------------------------------------------------------


def _resolved(dataset: str, *overrides: str):
    from zeroshot_adapt.pipeline import resolve_config

    return resolve_config(dataset, overrides=list(overrides))


@pytest.mark.parametrize("pretrained", ["timm", "timm:a1_in1k", "tv_in1k"])
def test_imagenet_supervised_weights_are_refused_for_zero_shot_imagenet(pretrained):
    from zeroshot_adapt.models.student import check_student_initialisation

    for dataset in ("imagenet", "imagenet-r", "imagenet-sketch"):
        with pytest.raises(UserError) as error:
            check_student_initialisation(_resolved(dataset, f"student.pretrained={pretrained}"))
        message = str(error.value)
        assert "label leakage" in message and "student.allow_label_leakage=true" in message
        assert "res50_moco_eman_800ep.pth.tar" in message
    # allowed: on purpose, for SSL, or on a dataset whose classes are not ImageNet's
    check_student_initialisation(_resolved("imagenet", f"student.pretrained={pretrained}",
                                           "student.allow_label_leakage=true"))
    check_student_initialisation(_resolved("imagenet", f"student.pretrained={pretrained}", "ssl.labels_fraction=0.01"))
    check_student_initialisation(_resolved("eurosat", f"student.pretrained={pretrained}"))


def test_a_checkpoint_file_with_an_imagenet_classifier_is_refused_and_ssl_ones_pass(tmp_path):
    from zeroshot_adapt.models.student import check_student_initialisation

    supervised = tmp_path / "resnet50_supervised.pth"  # e.g. torchvision weights or a MoCo linear probe
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(2, 3, 1, 1),
                               "module.fc.weight": torch.zeros(1000, 2), "module.fc.bias": torch.zeros(1000)}},
               supervised)
    with pytest.raises(UserError, match="1000-way classifier.*label leakage"):
        check_student_initialisation(_resolved("imagenet", f"student.pretrained={supervised}"))
    moco = tmp_path / "res50_moco_eman_800ep.pth.tar"
    torch.save(moco_checkpoint(_backbone()), moco)
    check_student_initialisation(_resolved("imagenet", f"student.pretrained={moco}"))


def test_paper_recipe_resnet50_without_a_checkpoint_warns_once(caplog, monkeypatch):
    from zeroshot_adapt.models import student as student_module

    monkeypatch.setattr(student_module, "_warned", set())
    config = _resolved("eurosat", "recipe=paper")
    with caplog.at_level("WARNING", logger="zeroshot_adapt.models.student"):
        student_module.check_student_initialisation(config)
        student_module.check_student_initialisation(config)
    warnings = [r.getMessage() for r in caplog.records if "RANDOM weights" in r.getMessage()]
    assert len(warnings) == 1
    assert "res50_moco_eman_800ep.pth.tar" in warnings[0] and "MoCo v2 + EMAN" in warnings[0]
    assert "--student-init" in warnings[0] and "800 epochs" in warnings[0]
    caplog.clear()
    monkeypatch.setattr(student_module, "_warned", set())
    with caplog.at_level("WARNING", logger="zeroshot_adapt.models.student"):
        student_module.check_student_initialisation(_resolved("eurosat"))  # the fast recipe: no warning
        student_module.check_student_initialisation(_resolved("digits", "recipe=paper"))  # not a ResNet-50
    assert not caplog.records
