"""The faiss kNN graph: exact below the size threshold, IVF above it, chunked reads, memory-bounded plans."""

from __future__ import annotations

import numpy as np
import pytest

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.transduct import FeatureSource, KnnSettings, knn_graph
from zeroshot_adapt.transduct.knn import drop_self, plan_index, recall_at_k


def unit_rows(num: int, dim: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if clusters:
        centers = rng.standard_normal((clusters, dim))
        values = centers[rng.integers(0, clusters, num)] + 0.5 * rng.standard_normal((num, dim))
    else:
        values = rng.standard_normal((num, dim))
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float32)


def brute_force(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)


def test_exact_graph_equals_brute_force_and_excludes_self():
    features = unit_rows(300, 16)
    graph = knn_graph(FeatureSource.from_array(features), 7)
    expected, similarities = brute_force(features, 7)
    assert graph.plan.exact and graph.indices.shape == (300, 7)
    assert not (graph.indices == np.arange(300)[:, None]).any()
    np.testing.assert_array_equal(graph.indices, expected)
    np.testing.assert_allclose(graph.similarities, similarities, atol=1e-5)
    np.testing.assert_array_equal(graph.truncate(3).indices, expected[:, :3])


def test_approximate_index_above_the_threshold_keeps_recall():
    features = unit_rows(3000, 32, clusters=20)
    settings = KnnSettings(exact_max_samples=1000, nprobe=8)
    graph = knn_graph(FeatureSource.from_array(features), 10, settings)
    assert not graph.plan.exact and graph.plan.factory.startswith("IVF") and graph.plan.factory.endswith(",SQ8")
    exact, _ = brute_force(features, 10)
    assert recall_at_k(graph.indices, exact) > 0.9
    full_probe = knn_graph(FeatureSource.from_array(features), 10, KnnSettings(exact_max_samples=1000, nprobe=10**6))
    assert recall_at_k(full_probe.indices, exact) >= recall_at_k(graph.indices, exact)


def test_index_plans_follow_size_and_memory_budget():
    assert plan_index(4_000, 1024, KnnSettings()).exact and not plan_index(4_001, 1024, KnnSettings()).exact
    ivf = plan_index(1_000_000, 64, KnnSettings(exact_max_samples=50_000))
    assert ivf.factory == "IVF4000,SQ8" and ivf.train_size == 64 * 4000 and ivf.nprobe == 32
    # codes of 1M x 64 dims: SQ8 needs 72 MB; a 32 MiB budget falls back to 16-byte PQ codes (24 MB)
    assert plan_index(1_000_000, 64, KnnSettings(memory_mb=32)).factory == "IVF4000,PQ16"
    # an exact-sized set whose float32 index exceeds the budget goes approximate too
    assert not plan_index(10_000, 1024, KnnSettings(memory_mb=16)).exact
    with pytest.raises(UserError, match="does not fit transduct.knn_memory_mb=16"):
        plan_index(1_000_000, 64, KnnSettings(memory_mb=16))
    assert plan_index(10, 4, KnnSettings()).describe() == {"index": "exact"}


def test_features_are_read_in_bounded_chunks_from_a_float16_memmap(tmp_path):
    features = unit_rows(2000, 64, clusters=5)
    path = tmp_path / "features.npy"
    np.save(path, features.astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    reads: list[int] = []
    base = FeatureSource.from_array(mapped)

    def counting(positions: np.ndarray) -> np.ndarray:
        reads.append(len(positions))
        return base.read_rows(positions)

    source = FeatureSource(base.num_samples, base.dim, counting)
    settings = KnnSettings(memory_mb=1)  # one query batch: 1/8 MiB -> about 470 rows of 64 float32 + results
    graph = knn_graph(source, 5, settings)
    assert max(reads) < 2000 and len(reads) > 4
    reference = knn_graph(FeatureSource.from_array(mapped.astype(np.float32)), 5)
    np.testing.assert_array_equal(graph.indices, reference.indices)


def test_drop_self_wherever_it_is():
    indices = np.array([[3, 0, 5], [1, 2, 0], [4, 0, 1]])
    similarities = np.array([[1.0, 1.0, 0.5], [1.0, 0.9, 0.8], [0.9, 0.8, 0.7]], dtype=np.float32)
    kept, sims = drop_self(indices, similarities, 2)
    np.testing.assert_array_equal(kept, [[3, 5], [2, 0], [4, 0]])  # row 2: self absent, the last result goes
    np.testing.assert_array_equal(sims, np.float32([[1.0, 0.5], [0.9, 0.8], [0.9, 0.8]]))


def test_bad_k_and_device_are_user_errors():
    source = FeatureSource.from_array(unit_rows(10, 4))
    with pytest.raises(UserError, match="k=0 must be a whole number >= 1"):
        knn_graph(source, 0)
    with pytest.raises(UserError, match="k=10 must be below the number of samples \\(10\\)"):
        knn_graph(source, 10)
    import faiss

    if faiss.get_num_gpus() == 0:
        with pytest.raises(UserError, match="faiss sees no GPU"):
            knn_graph(source, 3, KnnSettings(device="gpu"))
    with pytest.raises(UserError, match="knn_device='tpu' must be one of auto, cpu, gpu"):
        knn_graph(source, 3, KnnSettings(device="tpu"))
