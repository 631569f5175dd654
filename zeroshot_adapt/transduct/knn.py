"""k-nearest-neighbour graphs over L2-normalised features with faiss, from a thousand images to ImageNet.

Cosine similarity = inner product of unit vectors, so every index uses ``METRIC_INNER_PRODUCT``.

- Up to ``exact_max_samples`` samples (and while the float32 index fits the memory budget): exact search,
  ``IndexFlatIP`` (recall 1). Its graph time grows as N^2 D; IVF's as about N^1.3 (benchmarks/transduct.py,
  1024-d features on 2 CPU cores: the two cross near 4,000 samples, where the default sits; IVF recall@5
  was 0.99 there). The crossover hardly depends on D (both costs are linear in it).
- Above: an inverted-file index, ``IVF{nlist},SQ8`` (8-bit scalar-quantised codes: N x D bytes instead
  of 4 N x D), ``nlist = 4 sqrt(N)`` lists (the low end of faiss's 4..16 sqrt(N) guideline: longer lists,
  better recall per probe), trained on ``64 nlist`` sampled points (faiss asks for 30..256 per list),
  searched with ``nprobe`` lists per query. If the codes exceed the memory budget it falls back to
  product quantisation ``IVF{nlist},PQ{m}`` with the largest ``m`` that fits.
- Features are read from their source (typically a memory-mapped float16 cache) in chunks bounded by the
  memory budget, converted to float32 one chunk at a time; queries run in batches of the same size.
- GPU faiss when present (``faiss.get_num_gpus() > 0``, i.e. the ``faiss-gpu`` package on a CUDA machine);
  ``faiss-cpu`` is the default dependency.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.transduct.base import BYTES_PER_MB, FLOAT32_BYTES, FeatureSource

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
IVF_LISTS_PER_SQRT_N = 4  # faiss wiki ("Guidelines to choose an index"): nlist between 4 and 16 sqrt(N)
IVF_TRAIN_POINTS_PER_LIST = 64  # faiss k-means wants 30..256 training points per centroid
IVF_MIN_POINTS_PER_LIST = 39  # below this faiss warns that the clustering is under-trained
SQ8_ID_BYTES = 8  # an IVF list stores an int64 id next to each code
PQ_CODE_SIZES = (128, 64, 32, 16, 8)  # bytes per vector tried (largest first) when SQ8 exceeds the budget
QUERY_SHARE_OF_BUDGET = 8  # one query batch (float32 rows + results) takes at most 1/8 of the budget
TRAIN_SEED = 0


@dataclass(frozen=True)
class KnnSettings:
    """How to search (not what): exact_max_samples, nprobe (IVF lists visited per query), memory_mb (budget
    for the index and one batch of rows), device ('auto', 'cpu' or 'gpu')."""

    exact_max_samples: int = 4_000
    nprobe: int = 32
    memory_mb: int = 4096
    device: str = "auto"

    @classmethod
    def from_config(cls, config: Any) -> KnnSettings:
        return cls(exact_max_samples=config.knn_exact_max_samples, nprobe=config.knn_nprobe,
                   memory_mb=config.knn_memory_mb, device=config.knn_device)


@dataclass(frozen=True)
class IndexPlan:
    """The index a search over ``num_samples`` x ``dim`` vectors will use."""

    factory: str  # faiss index_factory string: "Flat", "IVF4096,SQ8", "IVF4096,PQ64"
    nlist: int
    nprobe: int
    train_size: int
    index_bytes: int

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"

    def describe(self) -> dict[str, Any]:
        """What changes the neighbours found (it keys derived predictions); nothing for exact search."""
        return {"index": "exact"} if self.exact else {"index": self.factory, "nprobe": self.nprobe,
                                                      "train_size": self.train_size, "train_seed": TRAIN_SEED}


def plan_index(num_samples: int, dim: int, settings: KnnSettings) -> IndexPlan:
    """Exact below the size threshold (when it fits), else IVF-SQ8, else IVF-PQ within the budget."""
    budget = settings.memory_mb * BYTES_PER_MB
    flat_bytes = num_samples * dim * FLOAT32_BYTES
    if num_samples <= settings.exact_max_samples and flat_bytes <= budget:
        return IndexPlan("Flat", 0, 0, 0, flat_bytes)
    nlist = max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(num_samples)),
                       num_samples // IVF_MIN_POINTS_PER_LIST))
    train_size = min(num_samples, IVF_TRAIN_POINTS_PER_LIST * nlist)
    centroid_bytes = nlist * dim * FLOAT32_BYTES
    nprobe = min(settings.nprobe, nlist)
    sq8_bytes = num_samples * (dim + SQ8_ID_BYTES) + centroid_bytes
    if sq8_bytes <= budget:
        return IndexPlan(f"IVF{nlist},SQ8", nlist, nprobe, train_size, sq8_bytes)
    for code in PQ_CODE_SIZES:
        pq_bytes = num_samples * (code + SQ8_ID_BYTES) + centroid_bytes
        if dim % code == 0 and pq_bytes <= budget:
            return IndexPlan(f"IVF{nlist},PQ{code}", nlist, nprobe, train_size, pq_bytes)
    raise UserError(
        f"a kNN index over {num_samples} x {dim} features does not fit transduct.knn_memory_mb="
        f"{settings.memory_mb} (even 8-byte PQ codes need about {(num_samples * 16) // BYTES_PER_MB} MiB); "
        "raise it with --set transduct.knn_memory_mb=..."
    )


def _faiss():
    import faiss

    return faiss


def _use_gpu(settings: KnnSettings) -> bool:
    if settings.device not in DEVICES:
        raise UserError(f"transduct.knn_device={settings.device!r} must be one of {', '.join(DEVICES)}")
    faiss = _faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if settings.device == "gpu" and gpus == 0:
        raise UserError("transduct.knn_device=gpu, but faiss sees no GPU: install faiss-gpu on a CUDA machine, "
                        "or use auto / cpu")
    return settings.device != "cpu" and gpus > 0


def _rows_per_batch(dim: int, k: int, settings: KnnSettings) -> int:
    share = settings.memory_mb * BYTES_PER_MB // QUERY_SHARE_OF_BUDGET
    per_row = dim * FLOAT32_BYTES + k * (FLOAT32_BYTES + 8)
    return max(1, share // per_row)


def build_index(source: FeatureSource, plan: IndexPlan, settings: KnnSettings, *, progress: bool = False):
    """A faiss index over every row of ``source`` (trained first when approximate), on GPU when asked."""
    faiss = _faiss()
    index = faiss.index_factory(source.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    gpu = _use_gpu(settings)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not plan.exact:
        rng = np.random.default_rng(TRAIN_SEED)
        sample = np.sort(rng.choice(source.num_samples, size=plan.train_size, replace=False))
        log.info("training %s on %d sampled features", plan.factory, len(sample))
        index.train(np.ascontiguousarray(source.rows(sample)))
        if gpu:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", plan.nprobe)
        else:
            faiss.extract_index_ivf(index).nprobe = plan.nprobe
    batch = _rows_per_batch(source.dim, 0, settings)
    chunks = source.chunks(batch)
    if progress:
        chunks = tqdm(chunks, total=math.ceil(source.num_samples / batch), desc="kNN index", unit="chunk")
    for _, chunk in chunks:
        index.add(np.ascontiguousarray(chunk))
    return index


def search(index, queries: FeatureSource, k: int, settings: KnnSettings, *, progress: bool = False,
           desc: str = "kNN search") -> tuple[np.ndarray, np.ndarray]:
    """(similarities float32 [Q, k], indices int64 [Q, k]) of every query row, in batches; -1 = none found."""
    similarities = np.empty((queries.num_samples, k), dtype=np.float32)
    indices = np.empty((queries.num_samples, k), dtype=np.int64)
    batch = _rows_per_batch(queries.dim, k, settings)
    chunks = queries.chunks(batch)
    if progress:
        chunks = tqdm(chunks, total=math.ceil(queries.num_samples / batch), desc=desc, unit="batch")
    for start, chunk in chunks:
        found_sim, found_idx = index.search(np.ascontiguousarray(chunk), k)
        similarities[start : start + len(chunk)] = found_sim
        indices[start : start + len(chunk)] = found_idx
    return similarities, indices


@dataclass(frozen=True)
class KnnGraph:
    """Each sample's k nearest other samples, most similar first (-1 where fewer were found)."""

    indices: np.ndarray  # [N, k] int64
    similarities: np.ndarray  # [N, k] float32 cosine similarity (0 where indices is -1)
    plan: IndexPlan

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def truncate(self, k: int) -> KnnGraph:
        return KnnGraph(self.indices[:, :k], self.similarities[:, :k], self.plan)


def check_k(k: int, num_samples: int, what: str) -> int:
    """k as an int, or UserError unless 1 <= k < num_samples."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise UserError(f"{what}={k!r} must be a whole number >= 1")
    if k >= num_samples:
        raise UserError(f"{what}={k} must be below the number of samples ({num_samples}): each sample needs k "
                        "other samples as neighbours")
    return int(k)


def drop_self(indices: np.ndarray, similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row, remove the row's own index (wherever it is; the last result if absent)."""
    rows = np.arange(len(indices))[:, None]
    is_self = indices == rows
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # self moves behind every other result
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(similarities, order, axis=1)


def knn_graph(source: FeatureSource, k: int, settings: KnnSettings | None = None, *, progress: bool = False,
              what: str = "k") -> KnnGraph:
    """The k-nearest-neighbour graph of the rows of ``source`` (self excluded), exact or IVF per the plan."""
    settings = settings or KnnSettings()
    k = check_k(k, source.num_samples, what)
    plan = plan_index(source.num_samples, source.dim, settings)
    log.info("kNN graph: %d x %d features, k=%d, index %s%s", source.num_samples, source.dim, k, plan.factory,
             "" if plan.exact else f" (nprobe {plan.nprobe})")
    index = build_index(source, plan, settings, progress=progress)
    similarities, indices = search(index, source, k + 1, settings, progress=progress)
    del index
    indices, similarities = drop_self(indices, similarities, k)
    similarities[indices < 0] = 0.0
    return KnnGraph(indices, similarities, plan)


def nearest_rows(database: np.ndarray, queries: FeatureSource, k: int, settings: KnnSettings | None = None,
                 *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of a small in-memory database (e.g. C text embeddings) for every query row.

    Returns (similarities float32 [Q, k], indices int64 [Q, k])."""
    settings = settings or KnnSettings()
    faiss = _faiss()
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    return search(index, queries, min(k, len(database)), settings, progress=progress, desc="kNN to text")


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact k neighbours that ``found`` also lists ([Q, k] each; -1 never counts)."""
    hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found, exact, strict=True)]
    return float(np.sum(hits) / exact.size)
