"""`debias`: DebiasPL's correction applied once, post hoc, to the whole unlabeled set.

DebiasPL (Wang et al. CVPR 2022, eq. 3) debiases each pseudo-label by the running mean of the model's own
predictions: ``p = softmax(z - tau * log(class_prior))``. On cached predictions the prior is known
exactly, the mean over the data of the softmax, so (REFERENCE.md section 6)::

    p(y|x) = softmax(z - tau * log(mean_x softmax(z)))  ∝  p0(y|x) / pi(y) ** tau

``tau = 1`` divides by the predicted marginal (post-hoc logit adjustment, Menon et al. ICLR 2021, whose
``tau = 1`` is the Bayes-optimal correction for the balanced error); DebiasPL's online ``tau`` (0.4-0.5)
is a damped version for a prior that is still moving. With a uniform predicted marginal nothing changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from zeroshot_adapt.transduct.base import TransductInputs, TransductMethod, register_method, safe_log, softmax


def debias(probabilities: np.ndarray, tau: float) -> np.ndarray:
    """probabilities: [N, C] rows summing to 1 -> [N, C] ∝ p / mean_x(p) ** tau."""
    marginal = probabilities.mean(axis=0, dtype=np.float64)
    return softmax(safe_log(probabilities) - np.float32(tau) * safe_log(marginal).astype(np.float32))


def _apply(probabilities: np.ndarray, inputs: TransductInputs, params: Mapping[str, Any]) -> np.ndarray:
    return debias(probabilities, params["tau"])


register_method(TransductMethod(
    name="debias",
    params=lambda config: {"tau": config.debias_tau},
    apply=_apply,
    description="divide by the predicted class marginal (DebiasPL eq. 3 / Menon et al., post hoc)",
))
