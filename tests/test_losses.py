"""Loss formulas on 2x3 examples computed by hand (numbers written out below)."""

import math

import pytest
import torch
import torch.nn.functional as F

from zeroshot_adapt.algorithms.losses import (
    adaptive_margin_logits,
    debiased_logits,
    masked_cross_entropy,
    masked_kl_divergence,
    masked_soft_cross_entropy,
    pseudo_labels_from_probs,
    sharpen,
)

LOGITS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
PRIOR = torch.tensor([0.5, 0.25, 0.25])
TAU = 0.5
# tau * log(prior) = [0.5 ln 0.5, 0.5 ln 0.25, 0.5 ln 0.25] = [-0.3465736, -0.6931472, -0.6931472]


def test_debiased_logits_eq3_by_hand():
    expected = torch.tensor([[1.3465736, 2.6931472, 3.6931472], [0.3465736, 0.6931472, 0.6931472]])
    torch.testing.assert_close(debiased_logits(LOGITS, PRIOR, TAU), expected)


def test_adaptive_margin_logits_eq5_by_hand():
    expected = torch.tensor([[0.6534264, 1.3068528, 2.3068528], [-0.3465736, -0.6931472, -0.6931472]])
    torch.testing.assert_close(adaptive_margin_logits(LOGITS, PRIOR, TAU), expected)


def test_debias_lowers_frequent_classes_and_margin_raises_them():
    probs = torch.softmax(debiased_logits(LOGITS, PRIOR, TAU), dim=1)
    # the frequent class 0 loses probability mass after debiasing
    assert bool((probs[:, 0] < torch.softmax(LOGITS, dim=1)[:, 0]).all())
    # row 2 is all-zero logits: debiased probabilities are proportional to prior^-tau = [sqrt 2, 2, 2]
    torch.testing.assert_close(probs[1], torch.tensor([1.4142136, 2.0, 2.0]) / 5.4142136)


def test_uniform_prior_leaves_logits_unchanged():
    uniform = torch.full((3,), 1 / 3)
    targets = torch.tensor([2, 0])
    for shifted in (debiased_logits(LOGITS, uniform, TAU), adaptive_margin_logits(LOGITS, uniform, TAU)):
        # every class moves by the same constant tau * ln 3, which softmax and cross-entropy ignore
        torch.testing.assert_close(shifted - LOGITS, torch.full_like(LOGITS, shifted[0, 0] - LOGITS[0, 0]))
        assert abs(abs(float(shifted[0, 0] - LOGITS[0, 0])) - TAU * math.log(3)) < 1e-6
        torch.testing.assert_close(torch.softmax(shifted, 1), torch.softmax(LOGITS, 1))
        torch.testing.assert_close(F.cross_entropy(shifted, targets), F.cross_entropy(LOGITS, targets))


def test_tau_zero_returns_identical_values():
    assert torch.equal(debiased_logits(LOGITS, PRIOR, 0.0), LOGITS)
    assert torch.equal(adaptive_margin_logits(LOGITS, PRIOR, 0.0), LOGITS)


def test_zero_prior_entry_stays_finite():
    out = debiased_logits(LOGITS, torch.tensor([1.0, 0.0, 0.0]), TAU)
    assert bool(torch.isfinite(out).all())


def test_pseudo_labels_from_probs_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3]])
    label, confidence, mask = pseudo_labels_from_probs(probs, threshold=0.5)
    assert label.tolist() == [0, 1]
    torch.testing.assert_close(confidence, torch.tensor([0.7, 0.4]))
    assert mask.dtype == probs.dtype and mask.tolist() == [1.0, 0.0]
    # the threshold itself is kept (confidence >= threshold)
    _, _, mask = pseudo_labels_from_probs(torch.tensor([[0.5, 0.25, 0.25]]), threshold=0.5)
    assert mask.tolist() == [1.0]


def test_masked_cross_entropy_means_over_all_samples():
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1])
    # per-sample CE: ln 3 = 1.0986123 and ln(e + 2) = 1.5514448
    torch.testing.assert_close(masked_cross_entropy(logits, targets, torch.tensor([1.0, 1.0])), torch.tensor(1.3250286))
    # mask [1, 0]: (1.0986123 + 0) / 2, NOT renormalized by the kept count
    torch.testing.assert_close(masked_cross_entropy(logits, targets, torch.tensor([1.0, 0.0])), torch.tensor(0.5493061))
    assert float(masked_cross_entropy(logits, targets, torch.zeros(2))) == 0.0


def test_sharpen_by_hand():
    # T = 0.5: p^2 / sum p^2 = [0.36, 0.09, 0.01] / 0.46
    out = sharpen(torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]]), temperature=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.7826087, 0.1956522, 0.0217391], [1 / 3, 1 / 3, 1 / 3]]))


@pytest.mark.parametrize(
    ("mask", "soft_ce", "kl"),
    [
        # row 1: softmax = 1/3 each, target [.5, .5, 0]: CE = ln 3 = 1.0986123, KL = ln 3 - ln 2 = 0.4054651
        # row 2: softmax = [1/4, 1/2, 1/4], target [0, 1, 0]: CE = KL = ln 2 = 0.6931472
        ([1.0, 1.0], 0.8958797, 0.5493061),
        ([1.0, 0.0], 0.5493061, 0.2027326),
    ],
)
def test_soft_cross_entropy_and_kl_by_hand(mask, soft_ce, kl):
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor(mask)
    torch.testing.assert_close(masked_soft_cross_entropy(logits, target, mask), torch.tensor(soft_ce))
    torch.testing.assert_close(masked_kl_divergence(logits, target, mask), torch.tensor(kl))


def test_kl_and_soft_ce_have_the_same_gradient():
    logits = torch.tensor([[0.3, -1.0, 2.0], [0.5, 0.1, 0.0]], requires_grad=True)
    target = torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    mask = torch.tensor([1.0, 1.0])
    (grad_ce,) = torch.autograd.grad(masked_soft_cross_entropy(logits, target, mask), logits)
    (grad_kl,) = torch.autograd.grad(masked_kl_divergence(logits, target, mask), logits)
    torch.testing.assert_close(grad_ce, grad_kl)
