"""`sinkhorn`: rebalance the predictions to a class marginal by entropic optimal transport.

OTTER (Shin et al., "OTTER: Effortless Label Distribution Adaptation of Zero-shot Models", NeurIPS 2024)
assigns the N samples (uniform mass 1/N each) to the classes (mass ``b``, the target label distribution)
at cost ``-log p(y|x)``. With an entropic regulariser ``epsilon`` the optimal plan is
``T = diag(u) p ** (1 / epsilon) diag(v)`` (Cuturi, NeurIPS 2013), found by Sinkhorn-Knopp: alternately
rescale rows to 1/N and columns to ``b``. The refined posterior of sample i is its row of the plan times N.

- ``epsilon = 1`` (default) gives ``q(y|x) ∝ p(y|x) * v(y)``: one weight per class, chosen so that the
  predicted marginal ``mean_x q`` equals ``b``. Confidences stay probabilities a threshold can use.
- ``epsilon -> 0`` approaches OTTER's exact assignment (``ot.emd``), whose rows are one-hot.

Target ``b``: ``uniform`` (OTTER's default when nothing is known), ``prior-em`` (the EM estimate of the
data's prior, see ``prior_em``), or a JSON file with one number per class. Iterations stop when the
L1 distance between ``mean_x q`` and ``b`` is below ``tolerance``. Log-domain, so a small ``epsilon``
cannot overflow.
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
    register_method,
    safe_log,
    softmax,
)

log = logging.getLogger(__name__)

PRIOR_EM = "prior-em"
MARGINAL_FLOOR = 1e-30  # a column whose mass underflowed to 0 gets this instead (log guard)


@dataclass(frozen=True)
class SinkhornResult:
    probabilities: np.ndarray  # [N, C]
    marginal_error: float  # L1 distance between mean_x q and the target
    iterations: int
    converged: bool


def sinkhorn(
    probabilities: np.ndarray,
    target: np.ndarray,
    *,
    epsilon: float,
    max_iterations: int,
    tolerance: float,
) -> SinkhornResult:
    """probabilities: [N, C]; target: [C] summing to 1 -> refined [N, C] with mean_x q ≈ target."""
    target = np.asarray(target, dtype=np.float64)
    scores = safe_log(probabilities) / np.float32(epsilon)  # log of the Gibbs kernel p ** (1 / epsilon)
    log_target = np.log(np.maximum(target, MARGINAL_FLOOR))
    column_shift = np.zeros(len(target), dtype=np.float64)  # log v
    refined = softmax(scores)
    error = float(np.abs(refined.mean(axis=0, dtype=np.float64) - target).sum())
    iteration = 0
    while error >= tolerance and iteration < max_iterations:
        iteration += 1
        column_mass = refined.mean(axis=0, dtype=np.float64)
        column_shift += log_target - np.log(np.maximum(column_mass, MARGINAL_FLOOR))  # columns to b
        refined = softmax(scores + column_shift.astype(np.float32))  # rows to 1/N (times N)
        error = float(np.abs(refined.mean(axis=0, dtype=np.float64) - target).sum())
    converged = error < tolerance
    if not converged:
        log.warning("sinkhorn: marginal error %.2e after %d iterations (tolerance %g)", error, iteration, tolerance)
    return SinkhornResult(refined, error, iteration, converged)


def _params(config: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "marginal": marginal_param(config.sinkhorn_marginal, "transduct.sinkhorn_marginal"),
        "epsilon": config.sinkhorn_epsilon,
        "max_iterations": config.sinkhorn_max_iterations,
        "tolerance": config.sinkhorn_tolerance,
    }
    if params["marginal"] == PRIOR_EM:
        from zeroshot_adapt.transduct.prior_em import params_from_config

        params["prior_em"] = params_from_config(config)
    return params


def target_marginal(probabilities: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """The target [C] the params ask for (uniform, file values, or the EM estimate on these probabilities)."""
    num_classes = probabilities.shape[1]
    if params["marginal"] == PRIOR_EM:
        from zeroshot_adapt.transduct.prior_em import estimate_prior

        em = params["prior_em"]
        source = load_marginal(em["source_prior"], num_classes, "transduct.prior_em_source_prior")
        return estimate_prior(probabilities, source, max_iterations=em["max_iterations"],
                              tolerance=em["tolerance"]).prior
    return load_marginal(params["marginal"], num_classes, "transduct.sinkhorn_marginal")


def _apply(probabilities: np.ndarray, inputs: TransductInputs, params: Mapping[str, Any]) -> np.ndarray:
    result = sinkhorn(probabilities, target_marginal(probabilities, params), epsilon=params["epsilon"],
                      max_iterations=params["max_iterations"], tolerance=params["tolerance"])
    log.info("sinkhorn: %d iterations, marginal L1 error %.2e", result.iterations, result.marginal_error)
    return result.probabilities


register_method(TransductMethod(
    name="sinkhorn",
    params=_params,
    apply=_apply,
    description="rebalance to a uniform / estimated / given class marginal by Sinkhorn OT (OTTER)",
))
