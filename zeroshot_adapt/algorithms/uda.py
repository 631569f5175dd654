"""UDA (Xie et al., "Unsupervised Data Augmentation for Consistency Training", NeurIPS 2020), and DebiasPL
plugged into it.

Soft targets: the weak-view probabilities sharpened with temperature T (``softmax(z_w / T)``; UDA's
defaults T = 0.4, confidence threshold 0.8), kept where the unsharpened confidence ``max(p) >= threshold``;
the loss is ``mean_over_batch(KL(target || softmax(z_s)) * mask)``. Everything else (forward passes,
adjuster order, multi-view, CLIP fill, metrics) is shared with FixMatch through
:class:`~zeroshot_adapt.algorithms.fixmatch.ConsistencyTraining`.

With DebiasPL (``"uda-debiaspl"``) the weak logits are debiased before sharpening (eq. 3) and the adaptive
margin (eq. 5) is added to the strong logits.
"""

from __future__ import annotations

from torch import Tensor

from zeroshot_adapt.algorithms.base import ALGORITHMS, PseudoLabelAdjuster, identity_mean
from zeroshot_adapt.algorithms.debiaspl import check_extra_keys, debias_adjuster, shared_options
from zeroshot_adapt.algorithms.fixmatch import ConsistencyTraining, UnlabeledTargets, check_unit_interval
from zeroshot_adapt.algorithms.losses import masked_kl_divergence, pseudo_labels_from_probs, sharpen
from zeroshot_adapt.algorithms.priors import AllReduceMean
from zeroshot_adapt.config import AlgorithmConfig
from zeroshot_adapt.errors import UserError

DEFAULT_TEMPERATURE = 0.4  # UDA's sharpening temperature (Xie et al. 2020, section 3.2)
EXTRA_KEYS = ("temperature",)


class SharpenedTargets:
    """UDA's rule: sharpened soft targets with a confidence mask, scored by KL divergence."""

    def __init__(self, threshold: float, temperature: float):
        if temperature <= 0:
            raise UserError(f"algorithm.extra.temperature={temperature!r} must be > 0 (UDA uses 0.4)")
        self.threshold = check_unit_interval("threshold", threshold)
        self.temperature = float(temperature)

    def targets(self, probs: Tensor) -> UnlabeledTargets:
        labels, confidence, mask = pseudo_labels_from_probs(probs, self.threshold)
        return UnlabeledTargets(labels=labels, confidence=confidence, mask=mask, soft=sharpen(probs, self.temperature))

    def loss(self, strong_logits: Tensor, targets: UnlabeledTargets) -> Tensor:
        assert targets.soft is not None  # made by targets() above
        return masked_kl_divergence(strong_logits, targets.soft, targets.mask)


class UDA(ConsistencyTraining):
    """UDA with an optional pseudo-label adjuster (DebiasAdjuster for UDA + DebiasPL)."""

    def __init__(
        self,
        num_classes: int,
        threshold: float,
        lambda_u: float,
        temperature: float = DEFAULT_TEMPERATURE,
        adjuster: PseudoLabelAdjuster | None = None,
        multiview: bool = False,
        clip_fill_threshold: float | None = None,
        lambda_cld: float = 0.0,
        cld_grouping: str = "argmax",
    ):
        super().__init__(
            num_classes=num_classes,
            lambda_u=lambda_u,
            rule=SharpenedTargets(threshold, temperature),
            adjuster=adjuster,
            multiview=multiview,
            clip_fill_threshold=clip_fill_threshold,
            lambda_cld=lambda_cld,
            cld_grouping=cld_grouping,
        )


def _uda(name: str, num_classes: int, config: AlgorithmConfig, adjuster: PseudoLabelAdjuster | None) -> UDA:
    check_extra_keys(name, config, allowed=EXTRA_KEYS)
    return UDA(
        num_classes,
        threshold=config.threshold,
        lambda_u=config.lambda_u,
        temperature=float(config.extra.get("temperature", DEFAULT_TEMPERATURE)),
        adjuster=adjuster,
        **shared_options(config),
    )


@ALGORITHMS.register("uda")
def uda(
    num_classes: int, config: AlgorithmConfig, all_reduce_mean: AllReduceMean = identity_mean, *, micro_batches: int = 1
) -> UDA:
    """UDA; ``extra["temperature"]`` (default 0.4)."""
    return _uda("uda", num_classes, config, adjuster=None)


@ALGORITHMS.register("uda-debiaspl")
def uda_debiaspl(
    num_classes: int, config: AlgorithmConfig, all_reduce_mean: AllReduceMean = identity_mean, *, micro_batches: int = 1
) -> UDA:
    """UDA + DebiasPL: debiased weak logits before sharpening, adaptive margin on the strong logits."""
    adjuster = debias_adjuster(num_classes, config, all_reduce_mean, micro_batches=micro_batches)
    return _uda("uda-debiaspl", num_classes, config, adjuster=adjuster)
