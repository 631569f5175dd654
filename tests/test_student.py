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
    remapped, source_format, dropped = remap_checkpoint_keys(state, head_prefix="fc.")
    assert source_format == "moco"
    assert set(remapped) == {k for k in names if not k.startswith("fc.")}
    assert "layer1.0.downsample.1.running_var" in remapped and "conv1.weight" in remapped
    assert dropped == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]


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
