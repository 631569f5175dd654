"""`label-propagation`: smooth the predictions over a kNN graph of the image features.

Zhou, Bousquet, Lal, Weston, Schölkopf, "Learning with local and global consistency" (NeurIPS 2004):
with ``S = D^-1/2 W D^-1/2`` the symmetrically normalised affinity of a graph and ``Y`` the initial
labels, the propagated labels solve ``(I - alpha S) Z = Y``. Here ``Y`` holds the incoming (zero-shot)
probabilities of every image, so each prediction is pulled toward those of its graph neighbourhood:
a mislabelled minority inside a cluster is out-voted.

Graph, as ZLaP (Stojnic, Kalantidis, Tolias, "Label Propagation for Zero-shot Classification with
Vision-Language Models", CVPR 2024) builds it:

- k nearest neighbours of every image by cosine similarity (faiss, see ``knn``), negatives clipped to 0,
  similarities raised to the power ``gamma``; ``W = W + W^T``.
- optionally (``text_nodes``) the C class text embeddings as extra nodes, each image linked to its
  ``min(k, C)`` most similar ones with weight ``cosine ** text_gamma`` (ZLaP raises only these edges,
  by 5 in its transductive setting, which keeps the text hubs from dominating), with one-hot label rows
  in ``Y`` (ZLaP's labelled nodes).
- ``Z`` by conjugate gradient on the sparse SPD system (ZLaP and Iscen et al. CVPR 2019 do the same);
  the image rows of ``Z`` (non-negative) are normalised to probabilities.

Defaults (``TransductConfig``): ``k = 5`` (ZLaP's transductive setting), ``gamma = 3`` (Iscen, Tolias,
Avrithis, Chum, "Label propagation for deep semi-supervised learning", CVPR 2019; the low end of ZLaP's
3-5), ``alpha = 0.99`` (Zhou et al. 2004; Iscen et al. 2019). ``alpha = 0`` returns ``Y`` unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.transduct.base import (
    BYTES_PER_MB,
    FeatureSource,
    TransductInputs,
    TransductMethod,
    normalize_rows,
    register_method,
)
from zeroshot_adapt.transduct.knn import KnnGraph, KnnSettings, nearest_rows

log = logging.getLogger(__name__)

CG_TOLERANCE = 1e-6  # relative residual per column (ZLaP's cg tol)
CG_MAX_ITERATIONS = 300  # CG needs ~sqrt(cond) / 2 * ln(2 / tol) ≈ 100 at alpha 0.99 (cond = 1.99 / 0.01)
FLOAT64_BYTES = 8
CG_ARRAYS = 5  # X, R, P, A P and Y blocks held at once by the block solver


def affinity(graph: KnnGraph, gamma: float, text: tuple[np.ndarray, np.ndarray] | None = None,
             num_classes: int = 0, text_gamma: float = 1.0) -> sp.csr_matrix:
    """Symmetric sparse affinity W [(N + T), (N + T)], T = num_classes text nodes (rows N..N+T-1) or 0.

    graph: each image's kNN; text: (similarities [N, kt], class indices [N, kt]) of each image to its
    nearest text embeddings, or None. Edge weight = max(0, cosine) ** gamma (image-image) or
    ** text_gamma (image-text); W = W + W^T."""
    num_images = graph.indices.shape[0]
    num_nodes = num_images + (num_classes if text is not None else 0)
    rows = [np.repeat(np.arange(num_images), graph.k)]
    cols = [graph.indices.ravel()]
    weights = [_edge_weights(graph.similarities.ravel(), gamma)]
    if text is not None:
        text_sims, text_idx = text
        rows.append(np.repeat(np.arange(num_images), text_idx.shape[1]))
        cols.append(text_idx.ravel() + num_images)
        weights.append(_edge_weights(text_sims.ravel(), text_gamma))
    row, col, weight = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    keep = (col >= 0) & (col != row) & (weight > 0)
    matrix = sp.csr_matrix((weight[keep], (row[keep], col[keep])), shape=(num_nodes, num_nodes))
    return (matrix + matrix.T).tocsr()


def _edge_weights(similarities: np.ndarray, power: float) -> np.ndarray:
    return np.maximum(similarities.astype(np.float64), 0.0) ** power


def symmetric_normalize(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """S = D^-1/2 W D^-1/2 (isolated nodes keep an all-zero row)."""
    degree = np.asarray(matrix.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)
    scale = sp.diags(inv_sqrt)
    return (scale @ matrix @ scale).tocsr()


def solve_propagation(normalized: sp.csr_matrix, labels: np.ndarray, alpha: float, *, memory_mb: float,
                      tolerance: float = CG_TOLERANCE, max_iterations: int = CG_MAX_ITERATIONS) -> np.ndarray:
    """Z [M, C] float32 solving (I - alpha S) Z = Y column by column, by conjugate gradient (float64 inside).

    scipy.sparse.linalg.cg takes one right-hand side at a time; this is the same CG run on a block of
    columns at once (one sparse-times-dense product per iteration instead of one per class), each
    column with its own step sizes and stopping test, blocks sized to ``memory_mb``."""
    num_nodes, num_classes = labels.shape
    if not 0.0 <= alpha < 1.0:
        raise UserError(f"label propagation alpha={alpha} must be in [0, 1) (I - alpha S must stay invertible)")
    block = max(1, int(memory_mb * BYTES_PER_MB) // (CG_ARRAYS * FLOAT64_BYTES * num_nodes))
    out = np.empty((num_nodes, num_classes), dtype=np.float32)

    def apply(x: np.ndarray) -> np.ndarray:
        return x - alpha * (normalized @ x)

    worst = 0
    for first in range(0, num_classes, block):
        columns = slice(first, min(first + block, num_classes))
        rhs = labels[:, columns].astype(np.float64)
        x = rhs.copy()  # start from Y: exact at alpha = 0
        residual = rhs - apply(x)
        direction = residual.copy()
        squared = np.einsum("ij,ij->j", residual, residual)
        target = (tolerance * np.linalg.norm(rhs, axis=0)) ** 2
        iterations = 0
        while iterations < max_iterations and (squared > target).any():
            iterations += 1
            active = squared > target
            product = apply(direction)
            curvature = np.einsum("ij,ij->j", direction, product)
            step = np.where(active & (curvature > 0), squared / np.where(curvature > 0, curvature, 1.0), 0.0)
            x += direction * step
            residual -= product * step
            new_squared = np.einsum("ij,ij->j", residual, residual)
            beta = np.where(active, new_squared / np.where(squared > 0, squared, 1.0), 0.0)
            direction = residual + direction * beta
            squared = np.where(active, new_squared, squared)
        worst = max(worst, iterations)
        if (squared > target).any():
            log.warning("label propagation: CG stopped at %d iterations above tolerance %g for %d columns",
                        iterations, tolerance, int((squared > target).sum()))
        out[:, columns] = x
    log.info("label propagation: conjugate gradient converged in %d iterations", worst)
    return out


def label_propagation(
    probabilities: np.ndarray,
    graph: KnnGraph,
    *,
    alpha: float,
    gamma: float,
    text: tuple[np.ndarray, np.ndarray] | None = None,
    text_gamma: float = 1.0,
    memory_mb: float = KnnSettings().memory_mb,
) -> np.ndarray:
    """probabilities: [N, C] (Y of the images); graph over the same N samples; text: see :func:`affinity`.
    Returns the propagated probabilities [N, C] (rows sum to 1)."""
    num_images, num_classes = probabilities.shape
    normalized = symmetric_normalize(affinity(graph, gamma, text, num_classes, text_gamma))
    labels = np.asarray(probabilities, dtype=np.float32)
    if text is not None:
        labels = np.concatenate([labels, np.eye(num_classes, dtype=np.float32)])  # ZLaP: text nodes label classes
    propagated = solve_propagation(normalized, labels, alpha, memory_mb=memory_mb)[:num_images]
    return normalize_rows(np.maximum(propagated, 0.0, out=propagated))


def text_neighbours(features: FeatureSource, text_classifier: np.ndarray, k: int,
                    settings: KnnSettings) -> tuple[np.ndarray, np.ndarray]:
    """Each image's min(k, C) most similar class text embeddings: (similarities [N, kt], classes [N, kt])."""
    return nearest_rows(text_classifier, features, k, settings)


def _params(config: Any) -> dict[str, Any]:
    params = {"k": config.lp_knn, "gamma": config.lp_gamma, "alpha": config.lp_alpha,
              "text_nodes": config.lp_text_nodes}
    if config.lp_text_nodes:
        params["text_gamma"] = config.lp_text_gamma
    return params


def _apply(probabilities: np.ndarray, inputs: TransductInputs, params: Mapping[str, Any]) -> np.ndarray:
    from zeroshot_adapt.transduct.compose import graph_for

    features = inputs.require_features("label-propagation")
    graph = graph_for(inputs, params["k"], "transduct.lp_knn")
    settings = inputs.knn or KnnSettings()
    text = None
    if params["text_nodes"]:
        classifier = inputs.require_text_classifier("label-propagation")
        text = text_neighbours(features, classifier, params["k"], settings)
    return label_propagation(probabilities, graph, alpha=params["alpha"], gamma=params["gamma"], text=text,
                             text_gamma=params.get("text_gamma", 1.0), memory_mb=settings.memory_mb)


register_method(TransductMethod(
    name="label-propagation",
    params=_params,
    apply=_apply,
    needs_features=True,
    description="propagate the predictions over a kNN graph of image (+ text) features (Zhou 2004, ZLaP)",
))
