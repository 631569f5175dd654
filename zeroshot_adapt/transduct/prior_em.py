"""`prior-em`: EM re-estimation of the class prior of the unlabeled set (Saerens, Latinne, Decaestecker,
"Adjusting the outputs of a classifier to new a priori probabilities", Neural Computation 2002, eqs. 2.9-2.10).

A classifier whose posteriors ``p0(y|x)`` are calibrated under a source prior ``pi_0`` is adapted to the
unknown prior ``pi`` of the new data by iterating, from ``pi = pi_0``::

    p(y|x) ∝ (pi(y) / pi_0(y)) * p0(y|x)        (E step, eq. 2.9)
    pi(y)  = mean_x p(y|x)                       (M step, eq. 2.10)

until the prior moves by less than ``tolerance`` (max absolute change). It maximises the likelihood of
the unlabeled data over ``pi``. ``pi_0`` defaults to uniform: a zero-shot classifier built from one
prompt ensemble per class favours no class a priori. The data cannot tell the classifier's own bias from
a real imbalance of the data: with ``pi_0`` uniform, EM reads CLIP's bias as data imbalance and
*amplifies* it; give the classifier's known source prior (``transduct.prior_em_source_prior``, a JSON
list) to remove a bias instead. See ``sinkhorn`` for imposing a marginal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from zeroshot_adapt.transduct.base import (
    TransductInputs,
    TransductMethod,
    load_marginal,
    marginal_param,
    normalize_rows,
    register_method,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorEstimate:
    probabilities: np.ndarray  # [N, C] adapted posteriors
    prior: np.ndarray  # [C] estimated class prior of the data
    iterations: int
    converged: bool


def estimate_prior(
    probabilities: np.ndarray, source_prior: np.ndarray, *, max_iterations: int, tolerance: float
) -> PriorEstimate:
    """Saerens et al. 2002 EM. probabilities: [N, C] posteriors under ``source_prior`` [C] (sums to 1)."""
    source = np.asarray(source_prior, dtype=np.float64)
    if (source <= 0).any():
        raise ValueError("the source prior must be positive for every class (EM divides by it)")
    prior = source.copy()
    adapted = probabilities
    for iteration in range(1, max_iterations + 1):
        weights = (prior / source).astype(np.float32)
        adapted = normalize_rows(probabilities * weights)  # E step
        new_prior = adapted.mean(axis=0, dtype=np.float64)  # M step
        change = float(np.abs(new_prior - prior).max())
        prior = new_prior
        if change < tolerance:
            return PriorEstimate(adapted, prior, iteration, True)
    log.warning("prior-em: no convergence after %d iterations (last change above %g)", max_iterations, tolerance)
    return PriorEstimate(adapted, prior, max_iterations, False)


def params_from_config(config: Any) -> dict[str, Any]:
    return {
        "source_prior": marginal_param(config.prior_em_source_prior, "transduct.prior_em_source_prior"),
        "max_iterations": config.prior_em_max_iterations,
        "tolerance": config.prior_em_tolerance,
    }


def _apply(probabilities: np.ndarray, inputs: TransductInputs, params: Mapping[str, Any]) -> np.ndarray:
    source = load_marginal(params["source_prior"], probabilities.shape[1], "transduct.prior_em_source_prior")
    result = estimate_prior(probabilities, source, max_iterations=params["max_iterations"],
                            tolerance=params["tolerance"])
    log.info("prior-em: %d iterations, estimated prior min %.4f max %.4f", result.iterations,
             result.prior.min(), result.prior.max())
    return result.probabilities


register_method(TransductMethod(
    name="prior-em",
    params=params_from_config,
    apply=_apply,
    description="EM estimate of the data's class prior, posteriors adapted to it (Saerens et al. 2002)",
))
