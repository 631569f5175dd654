"""Registered factories for FixMatch, DebiasPL and distribution alignment.

Every factory has the signature
``factory(num_classes, config, all_reduce_mean=identity_mean, *, micro_batches=1) -> Algorithm``;
``all_reduce_mean`` averages a tensor across processes (``accelerator.reduce(t, "mean")``) so the class
prior is identical on every process; ``micro_batches`` is the loop's gradient accumulation (``optim.grad_accum``:
the loop calls the algorithm once per micro-batch), so the class prior moves once per optimizer step
(see :class:`~zeroshot_adapt.algorithms.priors.ClassPrior`). DebiasPL is composition: FixMatch + a
DebiasAdjuster holding a ClassPrior (REFERENCE.md section 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zeroshot_adapt.algorithms.base import ALGORITHMS, identity_mean
from zeroshot_adapt.algorithms.fixmatch import FixMatch
from zeroshot_adapt.algorithms.priors import AllReduceMean, ClassPrior, DebiasAdjuster, DistributionAlignment
from zeroshot_adapt.config import AlgorithmConfig
from zeroshot_adapt.errors import UserError


def check_extra_keys(name: str, config: AlgorithmConfig, allowed: Iterable[str] = ()) -> None:
    """Reject ``algorithm.extra`` keys this algorithm does not read (catches typos such as ``temprature``)."""
    allowed = sorted(allowed)
    unknown = sorted(set(config.extra) - set(allowed))
    if unknown:
        raise UserError(
            f"algorithm {name!r} does not use algorithm.extra keys {unknown}; "
            f"valid: {', '.join(allowed) if allowed else 'none'}"
        )


def debias_adjuster(
    num_classes: int, config: AlgorithmConfig, all_reduce_mean: AllReduceMean, micro_batches: int = 1
) -> DebiasAdjuster:
    """DebiasPL's adjuster: a class prior with ``config.prior_momentum`` and debias factor ``config.tau``."""
    prior = ClassPrior(
        num_classes, momentum=config.prior_momentum, all_reduce_mean=all_reduce_mean, micro_batches=micro_batches
    )
    return DebiasAdjuster(prior, tau=config.tau)


def shared_options(config: AlgorithmConfig) -> dict[str, Any]:
    """The ConsistencyTraining options every factory passes through: multi-view, CLIP fill, CLD."""
    return {
        "multiview": config.multiview,
        "clip_fill_threshold": config.clip_fill_threshold,
        "lambda_cld": config.lambda_cld,
        "cld_grouping": config.cld_grouping,
    }


def _fixmatch(num_classes: int, config: AlgorithmConfig, adjuster) -> FixMatch:
    return FixMatch(
        num_classes, threshold=config.threshold, lambda_u=config.lambda_u, adjuster=adjuster, **shared_options(config)
    )


@ALGORITHMS.register("fixmatch")
def fixmatch(
    num_classes: int, config: AlgorithmConfig, all_reduce_mean: AllReduceMean = identity_mean, *, micro_batches: int = 1
) -> FixMatch:
    """FixMatch (Sohn et al. 2020); ``config.tau`` and ``config.prior_momentum`` are not used."""
    check_extra_keys("fixmatch", config)
    return _fixmatch(num_classes, config, adjuster=None)


@ALGORITHMS.register("debiaspl")
def debiaspl(
    num_classes: int, config: AlgorithmConfig, all_reduce_mean: AllReduceMean = identity_mean, *, micro_batches: int = 1
) -> FixMatch:
    """DebiasPL (Wang et al. 2022): FixMatch + DebiasAdjuster(ClassPrior(prior_momentum), tau)."""
    check_extra_keys("debiaspl", config)
    adjuster = debias_adjuster(num_classes, config, all_reduce_mean, micro_batches=micro_batches)
    return _fixmatch(num_classes, config, adjuster=adjuster)


@ALGORITHMS.register("distalign")
def distalign(
    num_classes: int, config: AlgorithmConfig, all_reduce_mean: AllReduceMean = identity_mean, *, micro_batches: int = 1
) -> FixMatch:
    """FixMatch + ReMixMatch distribution alignment toward ``extra["target_prior"]`` (default uniform);
    the model's running class marginal uses ``config.prior_momentum``."""
    check_extra_keys("distalign", config, allowed=("target_prior",))
    adjuster = DistributionAlignment(
        num_classes,
        momentum=config.prior_momentum,
        target_prior=config.extra.get("target_prior"),
        all_reduce_mean=all_reduce_mean,
        micro_batches=micro_batches,
    )
    return _fixmatch(num_classes, config, adjuster=adjuster)
