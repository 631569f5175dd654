"""FixMatch / DebiasPL / distribution alignment / UDA steps: update order, tau=0 invariance, multi-view,
SSL + CLIP fill, metrics and registry — on tiny tensors with hand-computed values."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from zeroshot_adapt.algorithms import ALGORITHMS
from zeroshot_adapt.algorithms.base import Batch, LabeledBatch, UnlabeledBatch
from zeroshot_adapt.algorithms.fixmatch import FixMatch, clip_fill_mask, weak_target_logits
from zeroshot_adapt.algorithms.losses import cld_groups, cld_loss, masked_cross_entropy, pseudo_labels_from_probs
from zeroshot_adapt.algorithms.priors import ClassPrior, DebiasAdjuster
from zeroshot_adapt.config import AlgorithmConfig
from zeroshot_adapt.errors import UserError

LN3 = math.log(3.0)


class LogitModel(nn.Module):
    """Its 'images' [B, C, 1, 1] ARE the logits (times a parameter equal to 1, so there is a gradient)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images):
        return images.flatten(1) * self.scale


def as_images(logits):
    return torch.as_tensor(logits, dtype=torch.float32)[:, :, None, None]


def make_batch(weak, strong, labeled=None, targets=None, true_label=None, clip_label=None, clip_confidence=None):
    weak, strong = [as_images(w) for w in weak], [as_images(s) for s in strong]
    size = weak[0].shape[0]
    unlabeled = UnlabeledBatch(
        weak=weak,
        strong=strong,
        index=torch.arange(size),
        true_label=torch.full((size,), -1) if true_label is None else torch.tensor(true_label),
        clip_label=torch.full((size,), -1) if clip_label is None else torch.tensor(clip_label),
        clip_confidence=torch.zeros(size) if clip_confidence is None else torch.tensor(clip_confidence),
    )
    lab = None if labeled is None else LabeledBatch(images=as_images(labeled), targets=torch.tensor(targets))
    return Batch(labeled=lab, unlabeled=unlabeled)


def build(name, num_classes=3, **config):
    return ALGORITHMS.get(name)(num_classes, AlgorithmConfig(name=name, **config))


# --- DebiasPL update order -------------------------------------------------------------------------


def test_labels_use_old_prior_and_margin_uses_new_prior():
    adjuster = DebiasAdjuster(ClassPrior(3, momentum=0.0), tau=1.0)
    adjuster.load_state_dict({"class_prior": torch.tensor([0.8, 0.1, 0.1])})  # the OLD prior
    algorithm = FixMatch(3, threshold=0.0, lambda_u=1.0, adjuster=adjuster)
    model = LogitModel()
    # weak softmax [0.6, 0.3, 0.1]: raw argmax 0; with the old prior p / prior_old = [0.75, 3, 1] -> label 1;
    # the new prior (momentum 0) is [0.6, 0.3, 0.1] itself, with which the label would be a 3-way tie -> 0.
    batch = make_batch(
        weak=[torch.log(torch.tensor([[0.6, 0.3, 0.1]]))],
        strong=[torch.zeros(1, 3)],
        labeled=torch.zeros(1, 3),
        targets=[0],
    )
    out = algorithm.step(batch, student=model, teacher=model)
    assert out.pseudo_labels.tolist() == [1]
    assert out.mask.tolist() == [1.0]
    torch.testing.assert_close(adjuster.class_prior.probs, torch.tensor([0.6, 0.3, 0.1]))
    # loss_u = CE(0 + log(prior_new), 1) = -ln 0.3 = 1.2039728 (the old prior would give -ln 0.1 = 2.3025851)
    torch.testing.assert_close(out.metrics["loss_u"], torch.tensor(1.2039728))
    torch.testing.assert_close(out.metrics["loss_x"], torch.tensor(LN3))  # CE of zero logits = ln 3
    torch.testing.assert_close(out.loss, torch.tensor(LN3 + 1.2039728))


# --- tau = 0 is FixMatch ---------------------------------------------------------------------------


def random_batch(generator, num_views, size=16, num_labeled=4):
    def images(n):
        return torch.randn(n, 3, 2, 2, generator=generator)

    return Batch(
        labeled=LabeledBatch(
            images=images(num_labeled), targets=torch.randint(0, 5, (num_labeled,), generator=generator)
        ),
        unlabeled=UnlabeledBatch(
            weak=[images(size) for _ in range(num_views)],
            strong=[images(size) for _ in range(num_views)],
            index=torch.arange(size),
            true_label=torch.randint(0, 5, (size,), generator=generator),
            clip_label=torch.randint(-1, 5, (size,), generator=generator),
            clip_confidence=torch.rand(size, generator=generator),
        ),
    )


def linear_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    nn.init.normal_(model[1].weight, std=1.0)
    return model


@pytest.mark.parametrize(
    ("multiview", "fill", "cld"),
    [(False, None, 0.0), (True, None, 0.0), (False, 0.3, 0.0), (True, 0.3, 0.0), (False, 0.3, 0.3), (True, 0.3, 0.3),
     (False, None, 0.3), (True, None, 0.3)],
)
def test_tau_zero_debiaspl_equals_fixmatch_bit_for_bit(multiview, fill, cld):
    config = dict(threshold=0.8, lambda_u=2.0, tau=0.0, prior_momentum=0.9, multiview=multiview, lambda_cld=cld)
    fixmatch = build("fixmatch", 5, clip_fill_threshold=fill, **config)
    debiaspl = build("debiaspl", 5, clip_fill_threshold=fill, **config)
    debiaspl.load_state_dict({"adjuster": {"class_prior": torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05])}})
    student_a, student_b = linear_model(0), linear_model(0)
    teacher = linear_model(1)
    generator = torch.Generator().manual_seed(0)
    filled = 0.0
    for _ in range(3):  # the prior keeps moving; tau = 0 must keep ignoring it
        batch = random_batch(generator, num_views=2 if multiview else 1)
        out_f = fixmatch.step(batch, student=student_a, teacher=teacher)
        out_d = debiaspl.step(batch, student=student_b, teacher=teacher)
        assert 0 < float(out_f.metrics["mask_ratio"]) < 1  # a mixed mask, so the check means something
        filled += float(out_f.metrics.get("fill_ratio", 0.0))
        assert ("loss_cld" in out_f.metrics) == (cld > 0)  # the CLD term really took part
        assert torch.equal(out_f.loss, out_d.loss)
        assert torch.equal(out_f.mask, out_d.mask)
        assert torch.equal(out_f.pseudo_labels, out_d.pseudo_labels)
        out_f.loss.backward()
        out_d.loss.backward()
        for p_f, p_d in zip(student_a.parameters(), student_b.parameters(), strict=True):
            assert torch.equal(p_f.grad, p_d.grad)
    assert (filled > 0) == (fill is not None)  # CLIP fill really took part


def test_positive_tau_changes_the_loss():
    config = dict(threshold=0.6, lambda_u=2.0, prior_momentum=0.9)
    fixmatch, debiaspl = build("fixmatch", 5, **config), build("debiaspl", 5, tau=0.5, **config)
    debiaspl.load_state_dict({"adjuster": {"class_prior": torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05])}})
    batch, model = random_batch(torch.Generator().manual_seed(0), 1), linear_model(0)
    assert not torch.equal(
        fixmatch.step(batch, student=model, teacher=model).loss, debiaspl.step(batch, student=model, teacher=model).loss
    )


# --- multi-view ------------------------------------------------------------------------------------


def test_multiview_loss_averages_three_target_sets_times_two_strong_views():
    generator = torch.Generator().manual_seed(3)
    weak = [2 * torch.randn(6, 3, generator=generator) for _ in range(2)]
    strong = [torch.randn(6, 3, generator=generator) for _ in range(2)]
    algorithm = build("debiaspl", threshold=0.5, lambda_u=1.0, tau=0.0, prior_momentum=0.0, multiview=True)
    model = LogitModel()
    out = algorithm.step(make_batch(weak, strong), student=model, teacher=model)

    target_sets = [(weak[0] + weak[1]) / 2, weak[0], weak[1]]
    terms = []
    for z_w in target_sets:
        label, _, mask = pseudo_labels_from_probs(torch.softmax(z_w, 1), 0.5)
        terms += [masked_cross_entropy(z_s, label, mask) for z_s in strong]
    assert len(terms) == 6
    torch.testing.assert_close(out.loss, sum(terms) / 6)
    assert not torch.allclose(out.loss, terms[0])  # the average is not just the primary term
    # returned targets come from the averaged weak logits
    assert out.pseudo_labels.shape == (6,) and out.mask.shape == (6,)
    assert torch.equal(out.pseudo_labels, target_sets[0].argmax(1))
    # one prior update per step, from the softmax of the AVERAGED weak logits as the official code does
    # (momentum 0: the prior is that batch mean); not the mean of the two per-view softmaxes (the old rule)
    expected_prior = torch.softmax((weak[0] + weak[1]) / 2, 1).mean(0)
    torch.testing.assert_close(algorithm.class_prior, expected_prior)
    assert not torch.allclose(algorithm.class_prior, torch.softmax(torch.cat(weak), 1).mean(0), atol=1e-3)


def test_multiview_prior_update_on_hand_values():
    # one sample, weak views [2, 0, 0] and [0, 2, 0] -> averaged logits [1, 1, 0]
    # softmax([1, 1, 0]) = [e, e, 1] / (2e + 1) = [0.4223188, 0.4223188, 0.1553624]
    # momentum 0.5 from uniform: 0.5 / 3 + 0.5 * that = [0.3778261, 0.3778261, 0.2443479]
    # (the old rule, the mean of the per-view softmaxes [0.4467, 0.4467, 0.1065], would give 0.3900 / 0.2199)
    algorithm = build("debiaspl", threshold=0.5, tau=0.5, prior_momentum=0.5, multiview=True)
    weak = [torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])]
    batch = make_batch(weak, [torch.zeros(1, 3), torch.zeros(1, 3)])
    algorithm.step(batch, student=LogitModel(), teacher=LogitModel())
    torch.testing.assert_close(algorithm.class_prior, torch.tensor([0.3778261, 0.3778261, 0.2443479]))
    single = build("debiaspl", threshold=0.5, tau=0.5, prior_momentum=0.5)  # single view: softmax(z_w) itself
    single.step(make_batch([torch.tensor([[1.0, 1.0, 0.0]])], [torch.zeros(1, 3)]), student=LogitModel(),
                teacher=LogitModel())
    torch.testing.assert_close(single.class_prior, torch.tensor([0.3778261, 0.3778261, 0.2443479]))


def test_weak_target_logits_shapes():
    a, b = torch.zeros(4, 3), torch.ones(4, 3)
    sets = weak_target_logits([a, b])
    assert len(sets) == 3 and all(s.shape == (4, 3) for s in sets)
    torch.testing.assert_close(sets[0], torch.full((4, 3), 0.5))
    assert len(weak_target_logits([a])) == 1


def test_view_count_must_match_the_multiview_flag():
    batch = make_batch([torch.zeros(2, 3)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="2 weak and 2 strong"):
        build("fixmatch", multiview=True).step(batch, student=LogitModel(), teacher=LogitModel())


# --- SSL + CLIP fill -------------------------------------------------------------------------------


def test_clip_fill_mask_by_hand():
    student_masks = [torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])]
    confidence = torch.tensor([0.9, 0.9, 0.9, 0.2, 0.9])
    label = torch.tensor([2, 1, 0, 1, -1])
    # 0, 1: kept by a student mask; 3: CLIP not confident enough; 4: no CLIP label; 2: filled
    fill = clip_fill_mask(student_masks, confidence, label, threshold=0.5)
    assert fill.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert clip_fill_mask(student_masks, confidence, label, threshold=0.9).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert clip_fill_mask(student_masks, confidence, label, threshold=0.95).tolist() == [0.0] * 5


def test_clip_fill_loss_is_the_mean_of_clip_and_ssl_losses():
    # row 0: weak [4, 0, 0] -> confidence e^4 / (e^4 + 2) = 0.9647 >= 0.9: the student keeps label 0
    # row 1: weak uniform, not kept; CLIP says class 2 at 0.8 >= 0.5: filled
    # row 2: weak uniform, not kept; CLIP at 0.1: nothing
    batch = make_batch(
        weak=[torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])],
        strong=[torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)], [5.0, 0.0, 0.0]])],
        clip_label=[1, 2, 0],
        clip_confidence=[0.99, 0.8, 0.1],
        true_label=[0, 2, 1],
    )
    algorithm = build("fixmatch", threshold=0.9, lambda_u=1.0, clip_fill_threshold=0.5)
    model = LogitModel()
    out = algorithm.step(batch, student=model, teacher=model)
    loss_ssl = LN3 / 3  # row 0: CE(zeros, 0) = ln 3, over 3 samples
    loss_clip = math.log(2.0) / 3  # row 1: CE([0, 0, ln 2], 2) = -ln(2 / 4) = ln 2, over 3 samples
    torch.testing.assert_close(out.metrics["loss_ssl"], torch.tensor(loss_ssl))  # 0.3662041
    torch.testing.assert_close(out.metrics["loss_clip"], torch.tensor(loss_clip))  # 0.2310491
    torch.testing.assert_close(out.metrics["loss_u"], torch.tensor(0.2986266))  # (0.3662041 + 0.2310491) / 2
    torch.testing.assert_close(out.loss, torch.tensor(0.2986266))  # no labeled batch: loss_x = 0
    # targets actually used: the student's label for row 0, CLIP's for row 1, nothing for row 2
    assert out.mask.tolist() == [1.0, 1.0, 0.0]
    assert out.pseudo_labels.tolist()[:2] == [0, 2]
    torch.testing.assert_close(out.metrics["fill_ratio"], torch.tensor(1 / 3))


# --- CLD ----------------------------------------------------------------------------------------------


def test_cld_loss_by_hand_with_both_groupings_and_an_empty_group():
    # p_w rows [0.7, 0.2, 0.1], [0.5, 0.1, 0.4]; p_s rows uniform, [0.5, 0.25, 0.25]; temperature 0.07.
    weak = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]]))
    strong = torch.log(torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]]))
    # argmax: both rows in group 0, c_0 = [0.6, 0.15, 0.25]; groups 1, 2 empty (divide by 1: zero centroids).
    # A = [[1/3, 0, 0], [0.4, 0, 0]]; CE(A / 0.07, 0) = ln(1 + 2 e^{-4.7619}) = 0.0169541, ln(1 + 2 e^{-5.7143})
    # = 0.0065753; mean 0.0117647
    torch.testing.assert_close(cld_loss(strong, weak), torch.tensor(0.0117647), atol=1e-6, rtol=0)
    # argmin (the official code's): row 0 -> group 2 (c_2 = [0.7, 0.2, 0.1]), row 1 -> group 1 (c_1 = [0.5, 0.1, 0.4])
    # row 0: A = [0, 1/3, 1/3], target 2 -> ln(2 + e^{-4.7619}) = 0.6974127
    # row 1: A = [0, 0.375, 0.425], target 1 -> logsumexp([0, 5.3571, 6.0714]) - 5.3571 = 1.1143024; mean 0.9058575
    torch.testing.assert_close(cld_loss(strong, weak, grouping="argmin"), torch.tensor(0.9058575), atol=1e-6, rtol=0)
    assert cld_groups(torch.softmax(weak, 1), "argmin").tolist() == [2, 1]
    # no gradient into the weak side
    weak_param, strong_param = weak.clone().requires_grad_(True), strong.clone().requires_grad_(True)
    cld_loss(strong_param, weak_param).backward()
    assert weak_param.grad is None and strong_param.grad is not None


def test_cld_two_classes_by_hand():
    # p_w [0.8, 0.2], [0.6, 0.4], [0.3, 0.7] -> groups 0, 0, 1; c_0 = [0.7, 0.3], c_1 = [0.3, 0.7]
    # p_s [0.5, 0.5] -> A [0.5, 0.5]: ln 2; [0.9, 0.1] -> A [0.66, 0.34]: ln(1 + e^{-0.32/0.07}) = 0.0102900;
    # [0.2, 0.8] -> A [0.38, 0.62], target 1: ln(1 + e^{-0.24/0.07}) = 0.0319184; mean 0.2451185
    weak = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]))
    strong = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    torch.testing.assert_close(cld_loss(strong, weak), torch.tensor(0.2451185), atol=1e-6, rtol=0)


def test_cld_in_the_step_uses_the_official_strong_logits():
    generator = torch.Generator().manual_seed(5)
    prior = torch.tensor([0.5, 0.3, 0.2])
    weak = [torch.randn(6, 3, generator=generator) for _ in range(2)]
    strong = [torch.randn(6, 3, generator=generator) for _ in range(2)]
    config = dict(threshold=0.99, lambda_u=0.0, tau=1.0, prior_momentum=0.0, lambda_cld=0.5)
    # single view: the margin-adjusted strong logits (margin from the NEW prior: momentum 0 -> the batch mean)
    single = build("debiaspl", **config)
    single.load_state_dict({"adjuster": {"class_prior": prior}})
    out = single.step(make_batch(weak[:1], strong[:1]), student=LogitModel(), teacher=LogitModel())
    new_prior = torch.softmax(weak[0], 1).mean(0)
    expected = cld_loss(strong[0] + torch.log(new_prior), weak[0])
    torch.testing.assert_close(out.metrics["loss_cld"], expected)
    torch.testing.assert_close(out.loss, 0.5 * expected)  # no labeled batch, lambda_u = 0
    # multi-view: the mean of the two strong logits BEFORE the margin, p_w from the averaged weak logits
    multi = build("debiaspl", multiview=True, **config)
    multi.load_state_dict({"adjuster": {"class_prior": prior}})
    out = multi.step(make_batch(weak, strong), student=LogitModel(), teacher=LogitModel())
    expected = cld_loss((strong[0] + strong[1]) / 2, (weak[0] + weak[1]) / 2)
    torch.testing.assert_close(out.metrics["loss_cld"], expected)
    # argmin is passed through
    argmin = build("fixmatch", lambda_cld=1.0, cld_grouping="argmin", threshold=0.99, lambda_u=0.0)
    out = argmin.step(make_batch(weak[:1], strong[:1]), student=LogitModel(), teacher=LogitModel())
    torch.testing.assert_close(out.metrics["loss_cld"], cld_loss(strong[0], weak[0], grouping="argmin"))
    with pytest.raises(UserError, match="cld_grouping='middle'"):
        build("fixmatch", cld_grouping="middle")


# --- gradient accumulation: one prior update per optimizer step ---------------------------------------


@pytest.mark.parametrize("name", ["debiaspl", "distalign", "uda-debiaspl"])
def test_grad_accumulation_keeps_one_prior_update_per_optimizer_step(name):
    generator = torch.Generator().manual_seed(7)
    config = AlgorithmConfig(name=name, threshold=0.5, tau=0.5, prior_momentum=0.9)
    whole = ALGORITHMS.get(name)(3, config)
    split = ALGORITHMS.get(name)(3, config, micro_batches=2)
    model = LogitModel()
    for _ in range(3):  # three optimizer steps
        weak, strong = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
        whole.step(make_batch([weak], [strong]), student=model, teacher=model)
        before = split.class_prior.clone()
        split.step(make_batch([weak[:4]], [strong[:4]]), student=model, teacher=model)
        assert torch.equal(split.class_prior, before)  # first micro-batch: the prior has not moved
        split.step(make_batch([weak[4:]], [strong[4:]]), student=model, teacher=model)
        # after the step's last micro-batch: the same prior as one update with the whole batch
        torch.testing.assert_close(split.class_prior, whole.class_prior)
    assert not torch.allclose(whole.class_prior, torch.full((3,), 1 / 3))


def test_grad_accumulation_count_must_be_positive():
    with pytest.raises(UserError, match="micro_batches"):
        ClassPrior(3, momentum=0.9, micro_batches=0)


# --- metrics, state, registry ----------------------------------------------------------------------


def test_pseudo_label_accuracy_metrics_by_hand():
    # labels [0, 1, 2, 0]; kept (threshold 0.9) rows 0 and 1; truth [0, 2, 2, unknown]
    weak = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    batch = make_batch([weak], [torch.zeros(4, 3)], true_label=[0, 2, 2, -1])
    out = build("fixmatch", threshold=0.9).step(batch, student=LogitModel(), teacher=LogitModel())
    assert out.pseudo_labels.tolist() == [0, 1, 2, 0]
    torch.testing.assert_close(out.metrics["mask_ratio"], torch.tensor(0.5))
    torch.testing.assert_close(out.metrics["pseudo_label_acc"], torch.tensor(2 / 3))  # rows 0, 2 of 0..2
    torch.testing.assert_close(out.metrics["pseudo_label_acc_masked"], torch.tensor(0.5))  # row 0 of 0, 1
    torch.testing.assert_close(out.metrics["pseudo_label_kept_correct"], torch.tensor(0.25))  # 1 of 4


def test_metric_names_do_not_depend_on_the_batch():
    # the loop reduces metric sums across processes by name: every step must report the same names
    algorithm = build("debiaspl", threshold=0.99, clip_fill_threshold=0.5)
    names = set()
    for truth in ([-1, -1], [0, 1]):
        batch = make_batch([torch.zeros(2, 3)], [torch.zeros(2, 3)], true_label=truth)
        names.add(frozenset(algorithm.step(batch, student=LogitModel(), teacher=LogitModel()).metrics))
    assert len(names) == 1


def test_algorithm_state_dict_holds_the_class_prior():
    algorithm = build("debiaspl", prior_momentum=0.5)
    batch = make_batch([torch.tensor([[2.0, 0.0, 0.0]])], [torch.zeros(1, 3)])
    algorithm.step(batch, student=LogitModel(), teacher=LogitModel())
    state = algorithm.state_dict()
    assert torch.equal(state["adjuster"]["class_prior"], algorithm.class_prior)
    assert not torch.allclose(algorithm.class_prior, torch.full((3,), 1 / 3))
    restored = build("debiaspl", prior_momentum=0.5)
    restored.load_state_dict(state)
    assert torch.equal(restored.class_prior, algorithm.class_prior)
    assert build("fixmatch").state_dict() == {}
    with pytest.raises(UserError, match="adjuster"):
        restored.load_state_dict({})


def test_distalign_factory_uses_alignment():
    algorithm = build("distalign", threshold=0.0, prior_momentum=0.5)
    algorithm.load_state_dict({"adjuster": {"class_prior": torch.tensor([0.5, 0.25, 0.25])}})
    # softmax [0.1, 0.2, 0.7] aligned to uniform over p_model -> [1, 4, 14] / 19: the label stays 2 but
    # row [0.5, 0.25, 0.25] becomes uniform (a 3-way tie, label 0, confidence 1/3)
    weak = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    out = algorithm.step(make_batch([weak], [torch.zeros(2, 3)]), student=LogitModel(), teacher=LogitModel())
    assert out.pseudo_labels.tolist() == [0, 2]
    torch.testing.assert_close(algorithm.class_prior, torch.tensor([0.4, 0.2375, 0.3625]))


def test_unknown_algorithm_lists_valid_names():
    with pytest.raises(UserError) as error:
        ALGORITHMS.get("debias-pl")
    for name in ("debiaspl", "fixmatch", "distalign", "uda", "uda-debiaspl"):
        assert name in str(error.value)


def test_unknown_extra_key_and_bad_values_are_user_errors():
    with pytest.raises(UserError, match="temprature"):
        build("uda", extra={"temprature": 0.5})
    with pytest.raises(UserError, match="threshold"):
        build("debiaspl", threshold=1.5)
    with pytest.raises(UserError, match="momentum"):
        build("debiaspl", prior_momentum=1.0)


# --- UDA -------------------------------------------------------------------------------------------


def test_uda_loss_by_hand():
    # row 0: softmax [0.6, 0.3, 0.1], kept at 0.5; sharpened (T = 0.5) [0.7826087, 0.1956522, 0.0217391];
    #        KL(target || uniform) = sum t ln t + ln 3 = 0.5043557
    # row 1: uniform, confidence 1/3 < 0.5: masked out
    weak = torch.log(torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    algorithm = build("uda", threshold=0.5, lambda_u=1.0, extra={"temperature": 0.5})
    out = algorithm.step(make_batch([weak], [torch.zeros(2, 3)]), student=LogitModel(), teacher=LogitModel())
    torch.testing.assert_close(out.loss, torch.tensor(0.5043557 / 2))
    assert out.mask.tolist() == [1.0, 0.0]


def test_uda_debiaspl_debiases_before_sharpening_and_adds_the_new_margin():
    algorithm = build(
        "uda-debiaspl", threshold=0.5, lambda_u=1.0, tau=1.0, prior_momentum=0.9, extra={"temperature": 0.5}
    )
    algorithm.load_state_dict({"adjuster": {"class_prior": torch.tensor([0.3, 0.3, 0.4])}})
    # debiased: [0.6, 0.3, 0.1] / [0.3, 0.3, 0.4] ∝ [2, 1, 0.25] -> confidence 0.615 (kept);
    # sharpened ∝ [4, 1, 1/16] = [64, 16, 1] / 81. New prior 0.9 * old + 0.1 * raw = [0.33, 0.3, 0.37];
    # strong logits 0 + ln(new prior) -> softmax q = [0.33, 0.3, 0.37];
    # KL = sum t ln t - sum t ln q = -0.5607455 + 1.1260761 = 0.5653306
    weak = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    out = algorithm.step(make_batch([weak], [torch.zeros(1, 3)]), student=LogitModel(), teacher=LogitModel())
    torch.testing.assert_close(algorithm.class_prior, torch.tensor([0.33, 0.3, 0.37]))
    torch.testing.assert_close(out.loss, torch.tensor(0.5653306))


def test_uda_debiaspl_with_tau_zero_equals_uda_bit_for_bit():
    config = dict(threshold=0.4, lambda_u=1.0, prior_momentum=0.9, extra={"temperature": 0.4})
    uda, debiased = build("uda", 5, **config), build("uda-debiaspl", 5, tau=0.0, **config)
    debiased.load_state_dict({"adjuster": {"class_prior": torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05])}})
    generator, model = torch.Generator().manual_seed(1), linear_model(2)
    for _ in range(2):
        batch = random_batch(generator, 1)
        out_a, out_b = uda.step(batch, student=model, teacher=model), debiased.step(batch, student=model, teacher=model)
        assert torch.equal(out_a.loss, out_b.loss) and torch.equal(out_a.mask, out_b.mask)


def test_factories_pass_the_config_through():
    config = AlgorithmConfig(threshold=0.7, lambda_u=3.0, tau=0.25, multiview=True, clip_fill_threshold=0.4)
    algorithm = ALGORITHMS.get("debiaspl")(10, dataclasses.replace(config, prior_momentum=0.999))
    assert algorithm.rule.threshold == 0.7 and algorithm.lambda_u == 3.0 and algorithm.multiview
    assert algorithm.clip_fill_threshold == 0.4
    assert algorithm.adjuster.tau == 0.25 and algorithm.adjuster.class_prior.momentum == 0.999
    assert algorithm.class_prior.shape == (10,)
    config = dataclasses.replace(config, lambda_cld=0.3, cld_grouping="argmin")
    for name in ("fixmatch", "debiaspl", "distalign", "uda", "uda-debiaspl"):
        algorithm = ALGORITHMS.get(name)(10, config, micro_batches=4)
        assert (algorithm.lambda_cld, algorithm.cld_grouping) == (0.3, "argmin"), name
        assert algorithm.clip_fill_threshold == 0.4 and algorithm.multiview, name
        prior = getattr(algorithm.adjuster, "class_prior", None)
        assert prior is None or prior.micro_batches == 4, name


@pytest.mark.parametrize("name", ["fixmatch", "debiaspl", "uda-debiaspl"])
def test_ground_truth_never_reaches_the_loss(name):
    """true_label travels with the unlabeled batch for metrics only: scrambling it changes no loss or gradient."""
    from zeroshot_adapt.algorithms import ALGORITHMS
    from zeroshot_adapt.algorithms.base import Batch, LabeledBatch, UnlabeledBatch
    from zeroshot_adapt.config import AlgorithmConfig

    def run(true_label):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        algorithm = ALGORITHMS.get(name)(3, AlgorithmConfig(name=name, threshold=0.0, tau=0.5))
        g = torch.Generator().manual_seed(1)
        weak, strong = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
        batch = Batch(
            labeled=LabeledBatch(images=torch.randn(4, 3, 2, 2, generator=g), targets=torch.tensor([0, 1, 2, 0])),
            unlabeled=UnlabeledBatch(weak=[weak], strong=[strong], index=torch.arange(6), true_label=true_label,
                                     clip_label=torch.full((6,), -1), clip_confidence=torch.zeros(6)),
        )
        out = algorithm.step(batch, student=model, teacher=model)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = run(torch.tensor([0, 1, 2, 0, 1, 2]))
    loss_b, grads_b = run(torch.tensor([2, 2, 1, -1, 0, 0]))
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
