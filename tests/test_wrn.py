"""WRN-28-2 / WRN-28-8: parameter counts of the FixMatch backbones, shapes, timm registration."""

from __future__ import annotations

import pytest
import timm
import torch

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.models.wrn import WideResNet, count_parameters

WRN28_2_PARAMS_10_CLASSES = 1_467_610  # the FixMatch paper's "1.5M"; any change in the layout moves it


pytestmark = pytest.mark.usefixtures("single_thread")


def test_wrn28_2_parameter_count():
    model = timm.create_model("wrn28_2", num_classes=10)
    assert isinstance(model, WideResNet)
    assert count_parameters(model) == WRN28_2_PARAMS_10_CLASSES


def test_wrn28_8_is_registered_with_about_23m_parameters():
    # counting needs no forward pass; the 23.4M model is only built, not run
    model = timm.create_model("wrn28_8", num_classes=100)
    assert 23.3e6 < count_parameters(model) < 23.5e6
    assert "wrn28_2" in timm.list_models("wrn*") and "wrn28_8" in timm.list_models("wrn*")


def test_wrn_forward_shapes_and_timm_interface():
    model = timm.create_model("wrn28_2", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
    assert logits.shape == (3, 10)
    assert features.shape == (3, 128, 8, 8) and pooled.shape == (3, model.num_features) == (3, 128)
    assert torch.allclose(model.get_classifier()(pooled), logits, atol=1e-5)
    model.reset_classifier(4)
    assert model(x).shape == (3, 4)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_wrn_bn_momentum_and_leaky_relu_follow_fixmatch():
    model = timm.create_model("wrn28_2")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    acts = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert bns and all(bn.momentum == 0.001 for bn in bns)
    assert acts and all(a.negative_slope == 0.1 for a in acts)
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_wrn_timm_kwargs():
    model = timm.create_model("wrn28_2", num_classes=5, in_chans=1, drop_rate=0.3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(UserError, match="no pretrained weights"):
        timm.create_model("wrn28_2", pretrained=True)
    with pytest.raises(TypeError):
        timm.create_model("wrn28_2", not_an_option=1)


def test_wrn_learns_a_batch():
    """Gradients reach every parameter and a few steps fit 4 random images (the model can learn)."""
    torch.manual_seed(0)
    model = timm.create_model("wrn28_2", num_classes=10)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)  # 16x16 keeps it fast; the net is size-agnostic
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if first is None:
            first = loss.item()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        optimizer.step()
    assert loss.item() < 0.5 * first
