"""Class prior (DebiasPL eq. 4), DebiasAdjuster and ReMixMatch distribution alignment on hand values."""

import math

import pytest
import torch

from zeroshot_adapt.algorithms.priors import ClassPrior, DebiasAdjuster, DistributionAlignment
from zeroshot_adapt.errors import UserError

# raw softmax rows [0.5, 0.25, 0.25] and [0.1, 0.2, 0.7]; batch mean [0.3, 0.225, 0.475]
WEAK_LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
BATCH_MEAN = torch.tensor([0.3, 0.225, 0.475])


def test_prior_starts_uniform_float32():
    prior = ClassPrior(4, momentum=0.99)
    assert prior.probs.dtype == torch.float32
    torch.testing.assert_close(prior.probs, torch.full((4,), 0.25))


def test_prior_ema_per_class_by_hand():
    prior = ClassPrior(3, momentum=0.9)
    prior.update_from_logits(WEAK_LOGITS)
    # 0.9 * 1/3 + 0.1 * [0.3, 0.225, 0.475]
    torch.testing.assert_close(prior.probs, torch.tensor([0.33, 0.3225, 0.3475]))
    prior.update(torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(prior.probs, torch.tensor([0.397, 0.29025, 0.31275]))


def test_debias_adjuster_updates_with_raw_softmax_not_debiased():
    adjuster = DebiasAdjuster(ClassPrior(3, momentum=0.5), tau=1.0)
    adjuster.load_state_dict({"class_prior": torch.tensor([0.5, 0.25, 0.25])})
    adjuster.update(WEAK_LOGITS)
    # 0.5 * [0.5, 0.25, 0.25] + 0.5 * [0.3, 0.225, 0.475]   (the raw batch mean)
    torch.testing.assert_close(adjuster.class_prior.probs, torch.tensor([0.4, 0.2375, 0.3625]))
    # the debiased batch mean would have given a different prior: rows ∝ p / prior_old
    # = [1, 1, 1]/3 and [0.2, 0.8, 2.8]/3.8 -> mean [0.1929825, 0.2719298, 0.5350877]
    debiased_mean = torch.tensor([0.1929825, 0.2719298, 0.5350877])
    wrong = 0.5 * torch.tensor([0.5, 0.25, 0.25]) + 0.5 * debiased_mean
    assert not torch.allclose(adjuster.class_prior.probs, wrong, atol=1e-3)


def test_all_reduce_mean_is_applied_before_the_ema():
    received = []

    def fake_all_reduce_mean(tensor):
        received.append(tensor.clone())
        return torch.tensor([0.6, 0.3, 0.1])  # "the mean over all processes"

    prior = ClassPrior(3, momentum=0.9, all_reduce_mean=fake_all_reduce_mean)
    prior.update_from_logits(WEAK_LOGITS)
    torch.testing.assert_close(received[0], BATCH_MEAN)  # this process's own batch mean goes in
    # 0.9 * 1/3 + 0.1 * [0.6, 0.3, 0.1]: the EMA uses the reduced mean
    torch.testing.assert_close(prior.probs, torch.tensor([0.36, 0.33, 0.31]))


def test_debias_adjuster_target_probs_and_margin_by_hand():
    adjuster = DebiasAdjuster(ClassPrior(3, momentum=0.0), tau=1.0)
    adjuster.load_state_dict({"class_prior": torch.tensor([0.5, 0.25, 0.25])})
    # softmax(log p - log prior) ∝ p / prior: [1, 1, 1] -> 1/3 each; [0.2, 0.8, 2.8] / 3.8
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.0526316, 0.2105263, 0.7368421]])
    torch.testing.assert_close(adjuster.target_probs(WEAK_LOGITS), expected)
    adjuster.update(WEAK_LOGITS)  # momentum 0: the prior becomes the batch mean
    torch.testing.assert_close(adjuster.margin(), torch.log(BATCH_MEAN))
    torch.testing.assert_close(adjuster.margin(), torch.tensor([-1.2039728, -1.4916549, -0.7444405]))


def test_uniform_prior_adjuster_equals_plain_softmax():
    adjuster = DebiasAdjuster(ClassPrior(3, momentum=0.9), tau=0.7)
    torch.testing.assert_close(adjuster.target_probs(WEAK_LOGITS), torch.softmax(WEAK_LOGITS, dim=1))
    margin = adjuster.margin()
    torch.testing.assert_close(margin, torch.full((3,), 0.7 * math.log(1 / 3)))  # a constant shift


def test_distribution_alignment_by_hand():
    align = DistributionAlignment(3, momentum=0.5)
    align.load_state_dict({"class_prior": torch.tensor([0.5, 0.25, 0.25])})
    # p * (1/3) / [0.5, 0.25, 0.25] ∝ p * [2/3, 4/3, 4/3]:
    # row 1 -> [1/3, 1/3, 1/3]; row 2 -> [0.0667, 0.2667, 0.9333] / 1.2667 = [1, 4, 14] / 19
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1 / 19, 4 / 19, 14 / 19]])
    torch.testing.assert_close(align.target_probs(WEAK_LOGITS), expected)
    assert align.margin() is None
    align.update(WEAK_LOGITS)  # p_model = 0.5 * old + 0.5 * raw batch mean
    torch.testing.assert_close(align.class_prior.probs, torch.tensor([0.4, 0.2375, 0.3625]))


def test_distribution_alignment_with_target_prior():
    align = DistributionAlignment(3, momentum=0.9, target_prior=[2.0, 1.0, 1.0])  # normalized to [.5, .25, .25]
    # p_model uniform: p * [0.5, 0.25, 0.25] * 3, row 1 -> [0.25, 0.0625, 0.0625] / 0.375
    torch.testing.assert_close(align.target_probs(WEAK_LOGITS)[0], torch.tensor([2 / 3, 1 / 6, 1 / 6]))
    with pytest.raises(UserError, match="3 positive numbers"):
        DistributionAlignment(3, momentum=0.9, target_prior=[0.5, 0.5])


def test_prior_state_dict_roundtrip_and_validation():
    prior = ClassPrior(3, momentum=0.9)
    prior.update_from_logits(WEAK_LOGITS)
    restored = ClassPrior(3, momentum=0.9)
    restored.load_state_dict(prior.state_dict())
    assert torch.equal(restored.probs, prior.probs)
    with pytest.raises(UserError, match="3 classes"):
        ClassPrior(3, momentum=0.9).load_state_dict({"class_prior": torch.ones(5) / 5})
    with pytest.raises(UserError, match="momentum"):
        ClassPrior(3, momentum=1.0)


def test_prior_is_device_movable():
    prior = ClassPrior(3, momentum=0.9).to("meta")
    assert prior.probs.device.type == "meta" and prior.probs.dtype == torch.float32
