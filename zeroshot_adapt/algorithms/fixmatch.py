"""FixMatch (Sohn et al. 2020) with a pluggable pseudo-label adjuster; DebiasPL = FixMatch + DebiasAdjuster.

One training step (REFERENCE.md section 1), for every consistency method built here:

1. the student sees the labeled images and every strong view in ONE forward pass (one BatchNorm pass);
   the EMAN teacher sees the weak views under ``torch.no_grad()`` (the loop keeps it in eval mode);
2. targets from ``adjuster.target_probs(z_w)`` (the adjuster's OLD state) or the plain softmax;
3. ``adjuster.update(z_w)`` (raw softmax statistics, all-reduced across processes);
4. ``margin = adjuster.margin()`` (the NEW state) is added to the strong logits in the unlabeled loss;
5. ``loss = loss_x + lambda_u * loss_u``.

Multi-view (``multiview=True``: two weak and two strong views per image): three target sets, from the
averaged weak logits ``(z_w1 + z_w2) / 2`` and from each weak view; ``loss_ssl`` is the mean of the
3 x 2 (target set, strong view) losses. The adjuster is updated ONCE per step from the averaged weak logits,
i.e. the prior moves toward ``mean_over_batch(softmax((z_w1 + z_w2) / 2))``, as the official code does
(REFERENCE.md section 1; not the mean of the two per-view softmaxes). In single view that is simply ``z_w``.
All three target sets read the state from before that update.

CLIP fill (REFERENCE.md section 2, ``clip_fill_threshold`` set; T-ZSL, or SSL with CLIP labels): unlabeled
samples that NONE of the target sets' masks kept, whose cached CLIP confidence >= the fill threshold and whose
CLIP label is known (>= 0), are supervised with CLIP's label on every strong view with the same adaptive
margin (hard cross-entropy, mean over the whole batch like the SSL term, averaged over strong views);
``loss_u = (loss_clip + loss_ssl) / 2``.

CLD (``lambda_cld > 0``; :func:`~zeroshot_adapt.algorithms.losses.cld_loss`): on the unlabeled batch, with
``p_w`` the softmax of the primary (averaged) weak logits and ``p_s`` the softmax of, as the official code
does, the MEAN of the two strong logits BEFORE the margin in multi-view, and the margin-adjusted strong
logits in single view; ``loss = loss_x + lambda_u * loss_u + lambda_cld * loss_cld``. Groups: argmax of
``p_w`` by default, the official code's argmin as ``cld_grouping="argmin"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroshot_adapt.algorithms.base import (
    Batch,
    PseudoLabelAdjuster,
    StepOutput,
    UnlabeledBatch,
    forward_in_one_pass,
)
from zeroshot_adapt.algorithms.losses import CLD_GROUPINGS, cld_loss, masked_cross_entropy, pseudo_labels_from_probs
from zeroshot_adapt.algorithms.priors import ClassPrior, ReportsMetrics
from zeroshot_adapt.errors import UserError

NUM_MULTIVIEWS = 2  # weak and strong views per unlabeled image in multi-view mode (REFERENCE.md)


@dataclass
class ViewLogits:
    """Logits of one batch, float32. labeled: [B_x, C] or None; weak / strong: one [B_u, C] per view.

    ``weak`` comes from the teacher without gradient; ``labeled`` and ``strong`` from the student.
    """

    labeled: Tensor | None
    weak: list[Tensor]
    strong: list[Tensor]


@dataclass
class UnlabeledTargets:
    """Targets made from one set of weak-view probabilities.

    labels: [B] int64 argmax; confidence: [B] max probability; mask: [B] float {0, 1};
    soft: [B, C] soft targets (UDA) or None (hard pseudo-labels).
    """

    labels: Tensor
    confidence: Tensor
    mask: Tensor
    soft: Tensor | None = None


class TargetRule(Protocol):
    """What distinguishes one consistency method from another: how probabilities become targets and
    how strong-view logits are scored against them."""

    def targets(self, probs: Tensor) -> UnlabeledTargets: ...

    def loss(self, strong_logits: Tensor, targets: UnlabeledTargets) -> Tensor: ...


class HardPseudoLabels:
    """FixMatch's rule: one-hot argmax targets kept when ``max(p) >= threshold``; masked cross-entropy."""

    def __init__(self, threshold: float):
        self.threshold = check_unit_interval("threshold", threshold)

    def targets(self, probs: Tensor) -> UnlabeledTargets:
        labels, confidence, mask = pseudo_labels_from_probs(probs, self.threshold)
        return UnlabeledTargets(labels=labels, confidence=confidence, mask=mask)

    def loss(self, strong_logits: Tensor, targets: UnlabeledTargets) -> Tensor:
        return masked_cross_entropy(strong_logits, targets.labels, targets.mask)


def check_unit_interval(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"algorithm.{name}={value!r} must lie in [0, 1]")
    return float(value)


def forward_views(batch: Batch, *, student: nn.Module, teacher: nn.Module) -> ViewLogits:
    """Student on labeled + all strong views in one pass; teacher on all weak views without gradient."""
    chunks: list[Tensor] = []
    if batch.labeled is not None:
        chunks.append(batch.labeled.images)
    if batch.unlabeled is not None:
        chunks.extend(batch.unlabeled.strong)
    if not chunks:
        raise ValueError("batch has neither labeled nor unlabeled images")
    student_logits = [z.float() for z in forward_in_one_pass(student, chunks)]
    labeled = student_logits.pop(0) if batch.labeled is not None else None
    weak: list[Tensor] = []
    if batch.unlabeled is not None:
        with torch.no_grad():
            weak = [z.float() for z in forward_in_one_pass(teacher, batch.unlabeled.weak)]
    return ViewLogits(labeled=labeled, weak=weak, strong=student_logits)


def weak_target_logits(weak: list[Tensor]) -> list[Tensor]:
    """The logits each target set is made from: ``[mean(weak), *weak]`` for several views, else ``weak``.

    weak: V tensors [B, C] -> 1 (V == 1) or V + 1 tensors [B, C]; the first is the primary set.
    """
    if len(weak) == 1:
        return list(weak)
    return [torch.stack(weak).mean(dim=0), *weak]


def clip_fill_mask(
    student_masks: list[Tensor], clip_confidence: Tensor, clip_label: Tensor, threshold: float
) -> Tensor:
    """Which unlabeled samples CLIP supervises in SSL + CLIP fill (REFERENCE.md section 2).

    student_masks: one [B] float {0, 1} mask per target set; clip_confidence: [B]; clip_label: [B] int64
    (-1: unknown). Returns [B] float {0, 1}: kept by no student mask, ``clip_confidence >= threshold``
    and ``clip_label >= 0``.
    """
    kept_by_student = torch.stack(student_masks).amax(dim=0) > 0
    fill = ~kept_by_student & (clip_confidence >= threshold) & (clip_label >= 0)
    return fill.to(student_masks[0].dtype)


def label_accuracy(labels: Tensor, true_label: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fraction of ``labels`` [B] equal to ``true_label`` [B] among samples with a known truth (>= 0) and,
    if given, ``mask`` [B] > 0; 0 when no sample qualifies (so the metric exists at every step and on
    every process, which the loop's cross-process reduction needs)."""
    counted = true_label >= 0
    if mask is not None:
        counted = counted & (mask > 0)
    correct = ((labels == true_label) & counted).sum()
    return (correct.float() / counted.sum().clamp_min(1)).detach()


def kept_correct_ratio(labels: Tensor, true_label: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the batch whose label is kept (``mask > 0``) and correct. Averaged over steps and divided
    by the average ``mask_ratio`` it gives the exact pooled precision of the kept pseudo-labels (unlike an
    average of per-batch ``*_acc_masked``, which counts batches with nothing kept as 0)."""
    return ((labels == true_label) & (true_label >= 0) & (mask > 0)).float().mean().detach()


def _mean(losses: list[Tensor]) -> Tensor:
    return torch.stack(losses).mean()


class ConsistencyTraining:
    """Weak-to-strong consistency training with a target rule and an optional pseudo-label adjuster.

    FixMatch and UDA are this class with different :class:`TargetRule` objects; DebiasPL and
    distribution alignment are adjusters. Implements the ``Algorithm`` protocol.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        lambda_u: float,
        rule: TargetRule,
        adjuster: PseudoLabelAdjuster | None = None,
        multiview: bool = False,
        clip_fill_threshold: float | None = None,
        lambda_cld: float = 0.0,
        cld_grouping: str = "argmax",
    ):
        if lambda_u < 0:
            raise UserError(f"algorithm.lambda_u={lambda_u!r} must be >= 0")
        if lambda_cld < 0:
            raise UserError(f"algorithm.lambda_cld={lambda_cld!r} must be >= 0 (the official T-ZSL script uses 0.3)")
        if cld_grouping not in CLD_GROUPINGS:
            raise UserError(f"algorithm.cld_grouping={cld_grouping!r} must be one of {', '.join(CLD_GROUPINGS)}")
        self.num_classes = num_classes
        self.lambda_u = float(lambda_u)
        self.rule = rule
        self.adjuster = adjuster
        self.multiview = multiview
        self.clip_fill_threshold = (
            None if clip_fill_threshold is None else check_unit_interval("clip_fill_threshold", clip_fill_threshold)
        )
        self.lambda_cld = float(lambda_cld)
        self.cld_grouping = cld_grouping

    # --- the Algorithm protocol -------------------------------------------------------------------

    def step(self, batch: Batch, *, student: nn.Module, teacher: nn.Module) -> StepOutput:
        if batch.unlabeled is not None:
            self._check_views(batch.unlabeled)
        views = forward_views(batch, student=student, teacher=teacher)
        self._check_classes(views)

        metrics: dict[str, Any] = {}
        if views.labeled is not None and batch.labeled is not None:
            loss_x = F.cross_entropy(views.labeled, batch.labeled.targets)
        else:
            loss_x = views.strong[0].new_zeros(())
        metrics["loss_x"] = loss_x.detach()

        if batch.unlabeled is None:
            metrics["loss"] = loss_x.detach()
            return StepOutput(loss=loss_x, metrics=metrics)

        loss_u, loss_cld, pseudo_labels, mask, unlabeled_metrics = self._unlabeled_loss(views, batch.unlabeled)
        loss = loss_x + self.lambda_u * loss_u
        if loss_cld is not None:
            loss = loss + self.lambda_cld * loss_cld
            metrics["loss_cld"] = loss_cld.detach()
        metrics.update(unlabeled_metrics)
        metrics["loss_u"] = loss_u.detach()
        metrics["loss"] = loss.detach()
        return StepOutput(loss=loss, metrics=metrics, pseudo_labels=pseudo_labels, mask=mask)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.adjuster is None else {"adjuster": self.adjuster.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adjuster is None:
            return
        if "adjuster" not in state:
            raise UserError(
                "the checkpoint holds no pseudo-label adjuster state (class prior); "
                "was it written by a different algorithm?"
            )
        self.adjuster.load_state_dict(state["adjuster"])

    @property
    def class_prior(self) -> Tensor | None:
        """[C] the adjuster's running class marginal (DebiasPL's prior, DA's p_model), or None."""
        prior = getattr(self.adjuster, "class_prior", None)
        return prior.probs if isinstance(prior, ClassPrior) else None

    def to(self, device: torch.device | str) -> ConsistencyTraining:
        """Move the adjuster's state to `device` (it also follows the logits' device by itself)."""
        move = getattr(self.adjuster, "to", None)
        if callable(move):
            move(device)
        return self

    # --- pieces ---------------------------------------------------------------------------------

    def target_probs(self, weak_logits: Tensor) -> Tensor:
        """[B, C] -> [B, C]: the adjuster's probabilities (old state) or the plain softmax."""
        if self.adjuster is None:
            return torch.softmax(weak_logits, dim=1)
        return self.adjuster.target_probs(weak_logits)

    def _unlabeled_loss(
        self, views: ViewLogits, unlabeled: UnlabeledBatch
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, dict[str, Any]]:
        """(loss_u, loss_cld or None when lambda_cld = 0, pseudo-labels [B], mask [B], metrics)."""
        # 1. targets from the OLD adjuster state (DebiasPL eq. 3)
        weak_sets = weak_target_logits(views.weak)
        target_sets = [self.rule.targets(self.target_probs(z)) for z in weak_sets]
        # 2. update the statistics ONCE, from the raw primary weak logits (eq. 4; multi-view: the averaged logits)
        margin = None
        if self.adjuster is not None:
            self.adjuster.update(weak_sets[0])
            # 3. adaptive margin from the NEW state (eq. 5)
            margin = self.adjuster.margin()
        strong = views.strong if margin is None else [z + margin for z in views.strong]
        loss_cld = None
        if self.lambda_cld > 0:
            # official: multi-view -> mean of the strong logits before the margin; single view -> with the margin
            cld_strong = torch.stack(views.strong).mean(dim=0) if len(views.strong) > 1 else strong[0]
            loss_cld = cld_loss(cld_strong, weak_sets[0], grouping=self.cld_grouping)

        loss_ssl = _mean([self.rule.loss(z, t) for t in target_sets for z in strong])
        primary = target_sets[0]
        pseudo_labels, mask = primary.labels, primary.mask
        metrics: dict[str, Any] = {"mask_ratio": primary.mask.mean().detach()}
        if len(target_sets) > 1:
            metrics["mask_ratio_any"] = torch.stack([t.mask for t in target_sets]).amax(0).mean().detach()
        metrics["pseudo_label_acc"] = label_accuracy(primary.labels, unlabeled.true_label)
        metrics["pseudo_label_acc_masked"] = label_accuracy(primary.labels, unlabeled.true_label, primary.mask)
        metrics["pseudo_label_kept_correct"] = kept_correct_ratio(primary.labels, unlabeled.true_label, primary.mask)

        if self.clip_fill_threshold is None:
            loss_u = loss_ssl
        else:
            fill = clip_fill_mask(
                [t.mask for t in target_sets],
                unlabeled.clip_confidence,
                unlabeled.clip_label,
                self.clip_fill_threshold,
            )
            clip_targets = unlabeled.clip_label.clamp_min(0)  # -1 rows are masked out by `fill`
            loss_clip = _mean([masked_cross_entropy(z, clip_targets, fill) for z in strong])
            loss_u = (loss_clip + loss_ssl) / 2
            pseudo_labels = torch.where(fill > 0, clip_targets, pseudo_labels)
            mask = torch.maximum(mask, fill)
            metrics["loss_ssl"] = loss_ssl.detach()
            metrics["loss_clip"] = loss_clip.detach()
            metrics["fill_ratio"] = fill.mean().detach()
            metrics["clip_fill_kept_correct"] = kept_correct_ratio(clip_targets, unlabeled.true_label, fill)

        if isinstance(self.adjuster, ReportsMetrics):
            metrics.update(self.adjuster.metrics())
        return loss_u, loss_cld, pseudo_labels, mask, metrics

    def _check_views(self, unlabeled: UnlabeledBatch) -> None:
        expected = NUM_MULTIVIEWS if self.multiview else 1
        if len(unlabeled.weak) != expected or len(unlabeled.strong) != expected:
            raise ValueError(
                f"multiview={self.multiview} expects {expected} weak and {expected} strong views, got "
                f"{len(unlabeled.weak)} weak and {len(unlabeled.strong)} strong"
            )

    def _check_classes(self, views: ViewLogits) -> None:
        for z in [*views.strong, *views.weak, *([views.labeled] if views.labeled is not None else [])]:
            if z.shape[1] != self.num_classes:
                raise ValueError(f"model outputs {z.shape[1]} logits, the algorithm expects {self.num_classes} classes")


class FixMatch(ConsistencyTraining):
    """FixMatch with an optional adjuster. ``adjuster=DebiasAdjuster(...)`` is DebiasPL; with ``tau=0``
    it equals ``adjuster=None`` bit for bit."""

    def __init__(
        self,
        num_classes: int,
        threshold: float,
        lambda_u: float,
        adjuster: PseudoLabelAdjuster | None = None,
        multiview: bool = False,
        clip_fill_threshold: float | None = None,
        lambda_cld: float = 0.0,
        cld_grouping: str = "argmax",
    ):
        super().__init__(
            num_classes=num_classes,
            lambda_u=lambda_u,
            rule=HardPseudoLabels(threshold),
            adjuster=adjuster,
            multiview=multiview,
            clip_fill_threshold=clip_fill_threshold,
            lambda_cld=lambda_cld,
            cld_grouping=cld_grouping,
        )
