"""`transclip`: TransCLIP (Zanella, Gérin, Ben Ayed, "Boosting Vision-Language Models with Transduction",
NeurIPS 2024), zero-shot setting.

Minimises over the soft assignments ``z`` [N, C], class means ``mu`` [C, D] and a shared diagonal
covariance ``Sigma`` [D] (paper eq. 4)::

    L = - 1/N sum_i z_i^T log p_i                (Gaussian mixture: p_ik ∝ N(f_i; mu_k, Sigma))
        - sum_ij w_ij z_i^T z_j                   (Laplacian regulariser over the kNN graph)
        + sum_i KL_lambda(z_i || yhat_i)          (text anchor: z_i^T log z_i - lambda z_i^T log yhat_i)

by block majorise-minimise: alternating closed-form updates (paper eqs. 5-7; the official solver,
github.com/MaxZanella/transduction-for-vlms, TransCLIP_solver/, gives the constants used here):

- z (5 inner steps):  z_i ∝ yhat_i^lambda ⊙ exp( log p_i / T + (1/2k) sum_j (w_ij + w_ji) z_j ),
  with ``log p_ik = -1/2 sum_d (f_id - mu_kd)^2 / sigma_d^2`` (the shared determinant cancels) and
  ``T = 50`` the solver's temperature on the likelihood term;
- mu:    mu_k = sum_i z_ik f_i / sum_i z_ik, then L2-normalised (features live on the sphere);
- Sigma: sigma_d^2 = sum_ik z_ik (f_id - mu_kd)^2 / sum_ik z_ik   (with the new mu).

Initialisation (official zero-shot setting): ``z = yhat`` = the incoming probabilities (CLIP's softmax at
the model's own logit scale, or the previous method of a chain); ``mu_k`` the normalised z-weighted mean
of the 8 samples most confident for class k; ``sigma_d^2 = 1/D``. Graph: each sample's 3 nearest
neighbours, ``w_ij`` = cosine similarity (not symmetrised: the update uses ``W + W^T``). ``lambda = 1``;
10 outer iterations (mu / Sigma updates), the z step before the first and after the last.

Memory: the likelihood term, z, yhat^lambda and the graph term are each N x C float32; features are
re-read from their source in chunks every outer iteration (two passes), never held whole.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from zeroshot_adapt.transduct.base import (
    FeatureSource,
    TransductInputs,
    TransductMethod,
    register_method,
    safe_log,
    softmax,
)
from zeroshot_adapt.transduct.knn import KnnGraph

log = logging.getLogger(__name__)

LIKELIHOOD_TEMPERATURE = 50.0  # the official solver divides the GMM log-likelihood by 50 in the z update
INIT_MOST_CONFIDENT = 8  # mu init: z-weighted mean of the 8 most confident samples per class
CHUNK_MEMORY_MB = 256  # feature chunk size for the mu / Sigma / likelihood passes


def graph_matrix(graph: KnnGraph) -> sp.csr_matrix:
    """W [N, N] with w_ij = cosine(f_i, f_j) for j among i's k nearest neighbours."""
    num_samples, k = graph.indices.shape
    rows = np.repeat(np.arange(num_samples), k)
    cols = graph.indices.ravel()
    keep = cols >= 0
    return sp.csr_matrix((graph.similarities.ravel()[keep].astype(np.float32), (rows[keep], cols[keep])),
                         shape=(num_samples, num_samples))


def initial_means(features: FeatureSource, z: np.ndarray, count: int = INIT_MOST_CONFIDENT) -> np.ndarray:
    """mu [C, D]: per class, the normalised mean of z_ik f_i over the ``count`` samples with the largest z_ik."""
    count = min(count, z.shape[0])
    top = np.argpartition(-z, count - 1, axis=0)[:count]  # [count, C]
    rows = features.rows(top.T.ravel()).reshape(z.shape[1], count, features.dim)
    weights = np.take_along_axis(z, top, axis=0).T[:, :, None]  # [C, count, 1]
    return _unit_rows((rows * weights).mean(axis=1))


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def log_likelihood(features: FeatureSource, means: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """[N, C]: -1/2 sum_d (f_id - mu_kd)^2 / sigma_d^2, in feature chunks (no [N, C, D] tensor)."""
    inv = (1.0 / variance).astype(np.float32)
    weighted_means = means * inv  # [C, D]
    mean_terms = np.einsum("kd,kd->k", means, weighted_means)  # mu_k^T Sigma^-1 mu_k
    out = np.empty((features.num_samples, len(means)), dtype=np.float32)
    for start, chunk in features.chunks(features.chunk_rows(CHUNK_MEMORY_MB)):
        feature_terms = (chunk * chunk) @ inv  # f^T Sigma^-1 f
        out[start : start + len(chunk)] = -0.5 * (feature_terms[:, None] - 2.0 * chunk @ weighted_means.T
                                                  + mean_terms[None, :])
    return out


def update_gaussians(features: FeatureSource, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [C, D] normalised, sigma^2 [D]) from the soft assignments z [N, C], in one chunked pass."""
    num_classes = z.shape[1]
    weighted_sum = np.zeros((num_classes, features.dim), dtype=np.float64)  # sum_i z_ik f_i
    squares = np.zeros(features.dim, dtype=np.float64)  # sum_i (sum_k z_ik) f_i^2
    for start, chunk in features.chunks(features.chunk_rows(CHUNK_MEMORY_MB)):
        block = z[start : start + len(chunk)]
        weighted_sum += block.T.astype(np.float64) @ chunk
        squares += block.sum(axis=1).astype(np.float64) @ (chunk.astype(np.float64) ** 2)
    mass = z.sum(axis=0, dtype=np.float64)  # n_k
    means = _unit_rows(weighted_sum / np.where(mass > 0, mass, 1.0)[:, None])
    m64 = means.astype(np.float64)
    # sum_ik z_ik (f_id - mu_kd)^2 = sum_i s_i f_id^2 - 2 sum_k mu_kd A_kd + sum_k n_k mu_kd^2
    total = squares - 2.0 * np.einsum("kd,kd->d", m64, weighted_sum) + mass @ (m64 ** 2)
    variance = np.maximum(total / mass.sum(), np.finfo(np.float32).tiny)
    return means, variance.astype(np.float32)


def update_assignments(likelihood: np.ndarray, anchor: np.ndarray, z: np.ndarray, graph: sp.csr_matrix,
                       k: int, steps: int) -> np.ndarray:
    """The z block: ``steps`` fixed-point updates z ∝ anchor ⊙ exp(likelihood / T + (W + W^T) z / 2k).

    anchor: yhat^lambda [N, C]; likelihood: [N, C] Gaussian log-likelihoods (without the determinant)."""
    transpose = graph.T.tocsr()
    for _ in range(steps):
        logits = likelihood / LIKELIHOOD_TEMPERATURE + (graph @ z + transpose @ z) / (2.0 * k)
        z = softmax(logits + safe_log(anchor))
    return z


def transclip(
    probabilities: np.ndarray,
    features: FeatureSource,
    graph: KnnGraph,
    *,
    lam: float,
    iterations: int,
    z_steps: int,
) -> np.ndarray:
    """probabilities: yhat [N, C]; features: [N, D] L2-normalised; graph: kNN over the same samples.
    Returns z [N, C]."""
    anchor = np.power(np.maximum(probabilities, 0.0), lam, dtype=np.float32)  # yhat^lambda
    weights = graph_matrix(graph)
    z = probabilities.astype(np.float32)
    means = initial_means(features, z)
    variance = np.full(features.dim, 1.0 / features.dim, dtype=np.float32)
    for iteration in range(iterations + 1):
        z = update_assignments(log_likelihood(features, means, variance), anchor, z, weights, graph.k, z_steps)
        if iteration == iterations:
            break
        means, variance = update_gaussians(features, z)
    return z


def _params(config: Any) -> dict[str, Any]:
    return {"k": config.transclip_knn, "lambda": config.transclip_lambda,
            "iterations": config.transclip_iterations, "z_steps": config.transclip_z_steps}


def _apply(probabilities: np.ndarray, inputs: TransductInputs, params: Mapping[str, Any]) -> np.ndarray:
    from zeroshot_adapt.transduct.compose import graph_for

    features = inputs.require_features("transclip")
    graph = graph_for(inputs, params["k"], "transduct.transclip_knn")
    return transclip(probabilities, features, graph, lam=params["lambda"], iterations=params["iterations"],
                     z_steps=params["z_steps"])


register_method(TransductMethod(
    name="transclip",
    params=_params,
    apply=_apply,
    needs_features=True,
    description="Gaussian mixture + kNN Laplacian + KL to the text prediction, block MM (TransCLIP)",
))
