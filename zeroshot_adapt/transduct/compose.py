"""Run a chain of methods in order (``label-propagation,sinkhorn``): each refines the previous output.

The chain's identity (each method's name, code version and parameters, plus the kNN index the graph
methods will use) keys the derived prediction set (see ``store``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from zeroshot_adapt.transduct.base import METHODS, TransductInputs, check_probabilities, parse_chain
from zeroshot_adapt.transduct.knn import KnnGraph, KnnSettings, check_k, knn_graph, plan_index

log = logging.getLogger(__name__)


def graph_for(inputs: TransductInputs, k: int, what: str = "k") -> KnnGraph:
    """The kNN graph with ``k`` neighbours of ``inputs.features``, built once per chain: a graph with more
    neighbours already built is truncated instead of searched again."""
    features = inputs.require_features(what)
    k = check_k(k, features.num_samples, what)
    for built_k, graph in sorted(inputs.graphs.items()):
        if built_k >= k:
            return graph.truncate(k)
    graph = knn_graph(features, k, inputs.knn or KnnSettings(), progress=True, what=what)
    inputs.graphs[k] = graph
    return graph


def chain_identity(names: list[str], config: Any, num_samples: int, dim: int | None) -> dict[str, Any]:
    """What determines a chain's output besides its input: per step (method, version, params), and the
    kNN index plan when a step searches the features. config: a TransductConfig."""
    steps = []
    for name in names:
        method = METHODS.get(name)
        steps.append({"method": name, "version": method.version, "params": method.params(config)})
    identity: dict[str, Any] = {"steps": steps}
    if dim is not None and any(METHODS.get(name).needs_features for name in names):
        identity["knn_index"] = plan_index(num_samples, dim, KnnSettings.from_config(config)).describe()
    return identity


@dataclass(frozen=True)
class Refinement:
    probabilities: np.ndarray  # [N, C] float32, rows sum to 1
    steps: list[dict[str, Any]]  # per method: name, params, seconds


def refine(probabilities: np.ndarray, chain: str | list[str], config: Any, inputs: TransductInputs) -> Refinement:
    """Apply the methods of ``chain`` in order to ``probabilities`` [N, C]; config: a TransductConfig."""
    names = parse_chain(chain) if isinstance(chain, str) else list(chain)
    current = check_probabilities(probabilities)
    steps = []
    for name in names:
        method = METHODS.get(name)
        params = method.params(config)
        if method.needs_features:
            inputs.require_features(name)
        start = time.perf_counter()
        current = check_probabilities(method.apply(current, inputs, params))
        seconds = time.perf_counter() - start
        log.info("%s: %.2f s", name, seconds)
        steps.append({"method": name, "params": params, "seconds": round(seconds, 3)})
    return Refinement(current, steps)
