"""Training-free transduction methods on hand-made features where the right answer is known, and their
invariants (zeroshot_adapt.transduct)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from zeroshot_adapt.config import TransductConfig
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.transduct import METHODS, FeatureSource, TransductInputs, knn_graph, parse_chain, refine
from zeroshot_adapt.transduct.base import softmax
from zeroshot_adapt.transduct.debias import debias
from zeroshot_adapt.transduct.label_propagation import affinity, label_propagation, symmetric_normalize
from zeroshot_adapt.transduct.prior_em import estimate_prior
from zeroshot_adapt.transduct.sinkhorn import sinkhorn
from zeroshot_adapt.transduct.transclip import (
    LIKELIHOOD_TEMPERATURE,
    graph_matrix,
    log_likelihood,
    update_assignments,
    update_gaussians,
)

ALL_METHODS = ("zeroshot", "debias", "prior-em", "sinkhorn", "label-propagation", "transclip")


def two_clusters(seed: int = 0, per_cluster: int = 100, dim: int = 64, noise: float = 0.1, flip_rate: float = 0.15):
    """Two tight clusters on the unit sphere; CLIP-like probabilities right for most samples but wrong
    (with lower confidence) for a random minority. Returns features [N, D], probabilities [N, 2], labels,
    text embeddings [2, D] (the cluster directions)."""
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:2]
    labels = np.repeat([0, 1], per_cluster)
    features = centers[labels] + noise * rng.standard_normal((2 * per_cluster, dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    flipped = rng.random(2 * per_cluster) < flip_rate
    predicted = np.where(flipped, 1 - labels, labels)
    confidence = np.where(flipped, rng.uniform(0.55, 0.7, 2 * per_cluster), rng.uniform(0.6, 0.95, 2 * per_cluster))
    probabilities = np.where(np.eye(2)[predicted] > 0, confidence[:, None], 1 - confidence[:, None])
    return features.astype(np.float32), probabilities.astype(np.float32), labels, centers.astype(np.float32)


def inputs_for(features: np.ndarray, text: np.ndarray | None = None) -> TransductInputs:
    return TransductInputs(FeatureSource.from_array(features), text)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(1) == labels).mean())


# ----------------------------------------------------------------------------- known answers


def test_label_propagation_fixes_a_mislabelled_minority_inside_each_cluster():
    features, probabilities, labels, text = two_clusters()
    assert accuracy(probabilities, labels) < 0.9  # about 15% of each cluster starts wrong
    refined = refine(probabilities, "label-propagation", TransductConfig(), inputs_for(features, text))
    assert accuracy(refined.probabilities, labels) == 1.0
    without_text = replace(TransductConfig(), lp_text_nodes=False)
    assert accuracy(refine(probabilities, "label-propagation", without_text, inputs_for(features)).probabilities,
                    labels) == 1.0


def test_transclip_moves_the_minority_toward_its_cluster():
    features, probabilities, labels, text = two_clusters(dim=512, noise=0.03)
    before = accuracy(probabilities, labels)
    after = accuracy(refine(probabilities, "transclip", TransductConfig(), inputs_for(features, text)).probabilities,
                     labels)
    assert after >= before + 0.05


def biased_classifier(seed: int = 0, per_class: int = 400, bias: float = 1.5):
    """3 balanced classes whose logits favour class 0 by ``bias``: CLIP-style over-prediction of one class.
    Returns (biased probabilities, the same classifier's probabilities without the bias, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    logits = rng.normal(0.0, 1.0, (len(labels), 3))
    logits[np.arange(len(labels)), labels] += 2.5
    unbiased = softmax(logits)
    logits[:, 0] += bias
    return softmax(logits), unbiased, labels


def test_sinkhorn_undoes_a_biased_marginal():
    probabilities, unbiased, labels = biased_classifier()
    predicted = np.bincount(probabilities.argmax(1), minlength=3) / len(labels)
    assert predicted[0] > 0.45  # the bias: nearly half the samples go to class 0 (a third belong there)
    result = sinkhorn(probabilities, np.full(3, 1 / 3), epsilon=1.0, max_iterations=1000, tolerance=1e-6)
    assert result.converged and result.marginal_error < 1e-6
    np.testing.assert_allclose(result.probabilities.mean(axis=0), 1 / 3, atol=1e-6)
    # the known answer: the classifier without its bias (q ∝ p * v with v ≈ exp(-bias) on class 0)
    assert (result.probabilities.argmax(1) == unbiased.argmax(1)).mean() > 0.98
    assert (probabilities.argmax(1) == unbiased.argmax(1)).mean() < 0.9
    assert accuracy(result.probabilities, labels) > accuracy(probabilities, labels) + 0.05


def test_sinkhorn_toward_a_given_marginal_and_epsilon_to_zero_is_a_hard_assignment(tmp_path):
    probabilities, _, _ = biased_classifier(per_class=100)
    target = np.array([0.2, 0.3, 0.5])
    soft = sinkhorn(probabilities, target, epsilon=1.0, max_iterations=2000, tolerance=1e-7)
    np.testing.assert_allclose(soft.probabilities.mean(axis=0), target, atol=1e-6)
    hard = sinkhorn(probabilities, np.full(3, 1 / 3), epsilon=0.05, max_iterations=5000, tolerance=1e-4)
    assert hard.probabilities.max(axis=1).mean() > 0.95  # rows nearly one-hot (OTTER's exact plan as eps -> 0)
    path = tmp_path / "marginal.json"
    path.write_text("[2, 3, 5]")
    config = replace(TransductConfig(), sinkhorn_marginal=str(path), sinkhorn_tolerance=1e-7)
    refined = refine(probabilities, "sinkhorn", config, TransductInputs()).probabilities
    np.testing.assert_allclose(refined.mean(axis=0), target, atol=1e-6)


def gaussian_posteriors(class_prior: np.ndarray, source_prior: np.ndarray, num: int = 3000, seed: int = 0):
    """Samples from 3 one-dimensional Gaussians (means 0, 2, 4, sd 1) drawn with ``class_prior``; the exact
    Bayes posteriors of a classifier calibrated under ``source_prior``, and the Bayes-optimal decisions
    under the true ``class_prior``."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=num, p=class_prior)
    x = rng.normal(2.0 * labels, 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - 2.0 * np.arange(3)[None, :]) ** 2)
    posterior = likelihood * source_prior
    bayes = (likelihood * class_prior).argmax(axis=1)
    return (posterior / posterior.sum(axis=1, keepdims=True)).astype(np.float32), labels, bayes


def test_prior_em_recovers_the_prior_of_the_data():
    skewed, uniform = np.array([0.6, 0.3, 0.1]), np.full(3, 1 / 3)
    posteriors, labels, bayes = gaussian_posteriors(skewed, uniform)  # data imbalanced, classifier not
    result = estimate_prior(posteriors, uniform, max_iterations=1000, tolerance=1e-8)
    assert result.converged
    np.testing.assert_allclose(result.prior, np.bincount(labels) / len(labels), atol=0.03)
    assert (result.probabilities.argmax(1) == bayes).mean() > 0.97  # the Bayes decisions under the true prior
    assert (posteriors.argmax(1) == bayes).mean() < 0.9


def test_prior_em_undoes_a_known_source_bias(tmp_path):
    source = np.array([0.7, 0.2, 0.1])
    posteriors, labels, bayes = gaussian_posteriors(np.full(3, 1 / 3), source)  # classifier biased, data balanced
    path = tmp_path / "source.json"
    path.write_text("[0.7, 0.2, 0.1]")
    config = replace(TransductConfig(), prior_em_source_prior=str(path), prior_em_tolerance=1e-8)
    refined = refine(posteriors, "prior-em", config, TransductInputs()).probabilities
    np.testing.assert_allclose(refined.mean(axis=0), 1 / 3, atol=0.03)
    assert (refined.argmax(1) == bayes).mean() > 0.97
    assert (posteriors.argmax(1) == bayes).mean() < 0.9


def test_debias_divides_by_the_predicted_marginal():
    probabilities = np.array([[0.6, 0.4], [0.8, 0.2], [0.4, 0.6]], dtype=np.float32)
    marginal = probabilities.mean(axis=0)  # [0.6, 0.4]
    expected = probabilities / marginal
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(debias(probabilities, 1.0), expected, rtol=1e-5)
    half = probabilities / np.sqrt(marginal)
    np.testing.assert_allclose(debias(probabilities, 0.5), half / half.sum(1, keepdims=True), rtol=1e-5)


# ----------------------------------------------------------------------------- invariants


def random_problem(seed: int = 0, num: int = 60, classes: int = 4, dim: int = 8):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((num, dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    text = rng.standard_normal((classes, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return features, softmax(5.0 * features @ text.T), text


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_returns_probabilities(method):
    features, probabilities, text = random_problem()
    refined = refine(probabilities, method, TransductConfig(), inputs_for(features, text)).probabilities
    assert refined.shape == probabilities.shape and refined.dtype == np.float32
    assert (refined >= 0).all()
    np.testing.assert_allclose(refined.sum(axis=1), 1.0, atol=1e-5)


def test_zeroshot_is_the_identity_and_chains_apply_in_order():
    features, probabilities, text = random_problem()
    config = TransductConfig()
    np.testing.assert_array_equal(refine(probabilities, "zeroshot", config, TransductInputs()).probabilities,
                                  probabilities)
    chained = refine(probabilities, "debias, sinkhorn", config, TransductInputs())
    by_hand = sinkhorn(debias(probabilities, config.debias_tau), np.full(4, 0.25), epsilon=1.0,
                       max_iterations=config.sinkhorn_max_iterations, tolerance=config.sinkhorn_tolerance)
    np.testing.assert_allclose(chained.probabilities, by_hand.probabilities, rtol=1e-6)
    assert [step["method"] for step in chained.steps] == ["debias", "sinkhorn"]


def test_label_propagation_with_alpha_zero_returns_the_zero_shot_labels():
    features, probabilities, text = random_problem()
    config = replace(TransductConfig(), lp_alpha=0.0)
    refined = refine(probabilities, "label-propagation", config, inputs_for(features, text)).probabilities
    np.testing.assert_array_equal(refined.argmax(1), probabilities.argmax(1))
    np.testing.assert_allclose(refined, probabilities, atol=1e-6)


def test_label_propagation_solves_the_linear_system():
    features, probabilities, text = random_problem(num=30, classes=3)
    graph = knn_graph(FeatureSource.from_array(features), 4)
    normalized = symmetric_normalize(affinity(graph, 3.0)).toarray()
    assert np.allclose(normalized, normalized.T)
    direct = np.linalg.solve(np.eye(30) - 0.9 * normalized, probabilities.astype(np.float64))
    expected = direct / direct.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(label_propagation(probabilities, graph, alpha=0.9, gamma=3.0), expected, atol=1e-5)
    # a solver block of one column gives the same answer (the block size follows the memory budget)
    tiny_budget = label_propagation(probabilities, graph, alpha=0.9, gamma=3.0, memory_mb=1e-6)
    np.testing.assert_allclose(tiny_budget, expected, atol=1e-5)


def test_affinity_weights_and_text_nodes():
    features = np.eye(3, dtype=np.float32)[[0, 0, 1, 1]] + np.array([[0, 0.1, 0]] * 4, dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    graph = knn_graph(FeatureSource.from_array(features), 1)
    text = (np.array([[0.5], [0.5], [0.2], [0.2]], dtype=np.float32), np.array([[1], [1], [0], [0]]))
    matrix = affinity(graph, 2.0, text, num_classes=2, text_gamma=3.0).toarray()
    assert matrix.shape == (6, 6) and np.allclose(matrix, matrix.T)
    assert matrix[0, 1] == pytest.approx(2 * 1.0**2, abs=1e-5)  # duplicates: each is the other's neighbour
    assert matrix[0, 4 + 1] == pytest.approx(0.5**3) and matrix[2, 4 + 0] == pytest.approx(0.2**3)


def test_debias_with_a_uniform_predicted_marginal_changes_nothing():
    row = np.array([0.7, 0.2, 0.1], dtype=np.float32)
    probabilities = np.stack([np.roll(row, shift) for shift in range(3)] * 5)  # every class predicted equally
    np.testing.assert_allclose(probabilities.mean(axis=0), 1 / 3, atol=1e-7)
    np.testing.assert_allclose(debias(probabilities, 1.0), probabilities, atol=1e-6)
    already_balanced = sinkhorn(probabilities, np.full(3, 1 / 3), epsilon=1.0, max_iterations=10, tolerance=1e-6)
    assert already_balanced.iterations == 0
    np.testing.assert_allclose(already_balanced.probabilities, probabilities, atol=1e-6)


def test_transclip_gaussian_updates_match_their_definitions():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((20, 5)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    z = softmax(rng.standard_normal((20, 3)))
    source = FeatureSource.from_array(features)
    means, variance = update_gaussians(source, z)
    raw = z.T @ features / z.sum(0)[:, None]
    np.testing.assert_allclose(means, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5)
    diffs = features[:, None, :] - means[None, :, :]  # [N, C, D]
    np.testing.assert_allclose(variance, np.einsum("ik,ikd->d", z, diffs**2) / z.sum(), rtol=1e-4)
    expected = -0.5 * np.einsum("ikd,d->ik", diffs**2, 1.0 / variance)
    np.testing.assert_allclose(log_likelihood(source, means, variance), expected, rtol=1e-4, atol=1e-4)
    graph = knn_graph(source, 3)
    weights = graph_matrix(graph).toarray()
    step = update_assignments(expected.astype(np.float32), z, z, graph_matrix(graph), 3, 1)
    logits = expected / LIKELIHOOD_TEMPERATURE + (weights @ z + weights.T @ z) / 6 + np.log(z)
    np.testing.assert_allclose(step, softmax(logits), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown transduction method 'lp'; valid: .*label-propagation.*transclip"):
        parse_chain("lp")
    with pytest.raises(UserError, match="empty element"):
        parse_chain("debias,,sinkhorn")
    assert parse_chain("label-propagation, sinkhorn") == ["label-propagation", "sinkhorn"]
    assert set(ALL_METHODS) == set(METHODS.names())


@pytest.mark.parametrize(("k", "message"), [(0, "must be a whole number >= 1"), (60, "must be below the number")])
def test_k_out_of_range_is_a_user_error(k, message):
    features, probabilities, text = random_problem(num=60)
    config = replace(TransductConfig(), lp_knn=k)
    with pytest.raises(UserError, match=f"transduct.lp_knn={k} {message}"):
        refine(probabilities, "label-propagation", config, inputs_for(features, text))


@pytest.mark.parametrize("method", ["label-propagation", "transclip"])
def test_a_cache_without_features_is_a_user_error(method):
    _, probabilities, _ = random_problem()
    with pytest.raises(UserError, match=f"method {method!r} needs the cached image features"):
        refine(probabilities, method, TransductConfig(), TransductInputs(features=None))


def test_bad_marginal_files_are_user_errors(tmp_path):
    _, probabilities, _ = random_problem(classes=4)
    wrong_length = tmp_path / "three.json"
    wrong_length.write_text("[1, 1, 1]")
    for spec, message in ((str(wrong_length), "expected 4 finite non-negative numbers"),
                          (str(tmp_path / "missing.json"), "no such JSON file"),
                          ("skewed", "must be 'uniform' or a JSON file")):
        with pytest.raises(UserError, match=message):
            refine(probabilities, "sinkhorn", replace(TransductConfig(), sinkhorn_marginal=spec), TransductInputs())
