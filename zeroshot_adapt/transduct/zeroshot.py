"""`zeroshot`: the baseline. Returns its input probabilities unchanged (CLIP's softmax at the start of a chain)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from zeroshot_adapt.transduct.base import TransductInputs, TransductMethod, register_method


def identity(probabilities: np.ndarray, inputs: TransductInputs, params: Mapping[str, Any]) -> np.ndarray:
    return probabilities


register_method(TransductMethod(
    name="zeroshot",
    params=lambda config: {},
    apply=identity,
    description="CLIP's zero-shot probabilities, unchanged",
))
