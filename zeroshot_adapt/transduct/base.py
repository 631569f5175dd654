"""What every training-free transduction method sees, and the registry of methods.

A method refines class probabilities ``[N, C]`` (CLIP's zero-shot ones, or the output of the previous
method in a chain) using, where it needs them, the cached L2-normalised image features ``[N, D]`` and the
text classifier ``[C, D]`` (REFERENCE.md section 6). Features are never loaded whole: a
:class:`FeatureSource` reads them in row chunks (float16 on disk -> float32 per chunk), so a method can
run on a memory-mapped cache larger than RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.registry import Registry

BYTES_PER_MB = 1 << 20
FLOAT32_BYTES = 4
MIN_CHUNK_ROWS = 256  # never read fewer rows at a time (per-call overhead dominates below this)
PROBABILITY_FLOOR = 1e-12  # log(0) guard for probabilities that underflowed to 0


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSource:
    """L2-normalised image features ``[num_samples, dim]``, read by rows on demand.

    read_rows: positions ``[B]`` (sorted, int64) -> ``[B, dim]`` array of any float dtype (a memory-mapped
    float16 cache, an in-memory array...). Every read is converted to float32 chunk by chunk.
    """

    num_samples: int
    dim: int
    read_rows: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def from_array(cls, array: np.ndarray) -> FeatureSource:
        """Wrap an array or np.memmap ``[N, D]``; rows are only read when asked for."""
        if array.ndim != 2:
            raise ValueError(f"features must be [N, D]; got shape {tuple(array.shape)}")

        def read_rows(positions: np.ndarray) -> np.ndarray:
            if len(positions) and positions[-1] - positions[0] + 1 == len(positions):  # contiguous: a slice
                return np.asarray(array[int(positions[0]) : int(positions[-1]) + 1])
            return np.asarray(array[positions])

        return cls(int(array.shape[0]), int(array.shape[1]), read_rows)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """float32 ``[len(positions), dim]`` of the given rows (any order; read in sorted order)."""
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        out[order] = self.read_rows(positions[order])
        return out

    def chunk_rows(self, memory_mb: float) -> int:
        """Rows per chunk so that one float32 chunk takes at most ``memory_mb`` MiB (>= MIN_CHUNK_ROWS)."""
        return max(MIN_CHUNK_ROWS, int(memory_mb * BYTES_PER_MB) // max(1, self.dim * FLOAT32_BYTES))

    def chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 [B, dim]) over all rows in order."""
        for start in range(0, self.num_samples, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.num_samples)
            yield start, np.asarray(self.read_rows(np.arange(start, stop)), dtype=np.float32)

    def materialize(self) -> np.ndarray:
        """All features as one float32 array (tests and small data only)."""
        return self.rows(np.arange(self.num_samples))


# ----------------------------------------------------------------------------- inputs and methods


@dataclass
class TransductInputs:
    """Everything a method may use besides the probabilities it refines.

    features: the image features of the N samples (None when the cache holds none); text_classifier:
    ``[C, D]`` L2-normalised class embeddings (None when unknown); knn: settings of the kNN search;
    graphs: kNN graphs already built in this run, shared by the methods of one chain (k -> graph).
    """

    features: FeatureSource | None = None
    text_classifier: np.ndarray | None = None
    knn: Any = None  # zeroshot_adapt.transduct.knn.KnnSettings (None: defaults)
    graphs: dict[int, Any] = field(default_factory=dict)

    def require_features(self, method: str) -> FeatureSource:
        if self.features is None:
            raise UserError(
                f"method {method!r} needs the cached image features, but this prediction cache holds none; "
                "rebuild the cache with this version (delete it, then run `zsa cache`) or choose a method that "
                "needs only probabilities (zeroshot, debias, prior-em, sinkhorn)"
            )
        return self.features

    def require_text_classifier(self, method: str) -> np.ndarray:
        if self.text_classifier is None:
            raise UserError(f"method {method!r} needs the text classifier [C, D], which was not given")
        return self.text_classifier


@dataclass(frozen=True)
class TransductMethod:
    """One registered method.

    params: the method's parameters read from a ``TransductConfig`` (JSON-serialisable; they key the
    derived prediction set, so every value that changes the result must be here).
    apply: (probabilities [N, C], inputs, params) -> refined probabilities [N, C] (rows sum to 1).
    version: bump when the method's code changes its output, so old derived sets are recomputed.
    """

    name: str
    params: Callable[[Any], dict[str, Any]]
    apply: Callable[[np.ndarray, TransductInputs, Mapping[str, Any]], np.ndarray]
    needs_features: bool = False
    version: int = 1
    description: str = ""


METHODS: Registry[TransductMethod] = Registry("transduction method")


def register_method(method: TransductMethod) -> TransductMethod:
    METHODS.add(method.name, method)
    return method


CHAIN_SEPARATOR = ","


def parse_chain(spec: str) -> list[str]:
    """'label-propagation,sinkhorn' -> ['label-propagation', 'sinkhorn'] (each name checked).

    Raises UserError for an empty chain or element, or an unknown name (listing the valid ones)."""
    names = [part.strip() for part in str(spec).split(CHAIN_SEPARATOR)]
    if not names or any(not name for name in names):
        raise UserError(
            f"transduction method chain {spec!r} has an empty element; give method names separated by commas "
            f"(e.g. label-propagation,sinkhorn); valid: {', '.join(METHODS.names())}"
        )
    for name in names:
        METHODS.get(name)
    return names


def chain_name(names: list[str]) -> str:
    return CHAIN_SEPARATOR.join(names)


# ----------------------------------------------------------------------------- shared math


def normalize_rows(scores: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (non-negative scores -> probabilities); all-zero rows become uniform."""
    totals = scores.sum(axis=1, keepdims=True)
    out = np.divide(scores, totals, out=np.full_like(scores, 1.0 / scores.shape[1]), where=totals > 0)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (max-shifted), [N, C] -> [N, C]."""
    shifted = np.asarray(logits, dtype=np.float32) - np.max(logits, axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def safe_log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probabilities, PROBABILITY_FLOOR))


def check_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """float32 [N, C] with finite, non-negative rows; ValueError otherwise."""
    values = np.asarray(probabilities, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"probabilities must be [N, C]; got shape {tuple(values.shape)}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    return values


UNIFORM = "uniform"


def marginal_param(spec: str, what: str) -> str | list[Any]:
    """A marginal setting as it keys a derived prediction set: 'uniform' (or another keyword), or the
    contents of the JSON file it names (so editing the file changes the key). ``what``: the config key."""
    import json
    from pathlib import Path

    if spec == UNIFORM or not spec.lower().endswith(".json"):
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"{what}={spec!r}: no such JSON file (give 'uniform' or a JSON list with one number per class)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{what}: {spec!r} is not a JSON list of numbers ({error})") from None
    if not isinstance(values, list):
        raise UserError(f"{what}: {spec!r} must hold a JSON list with one number per class")
    return values


def load_marginal(spec: str | list[Any], num_classes: int, what: str) -> np.ndarray:
    """A class marginal [C] from 'uniform' or a list of C non-negative numbers (see :func:`marginal_param`),
    normalised to sum 1. ``what`` names the config key in errors."""
    if isinstance(spec, str):
        if spec == UNIFORM:
            return np.full(num_classes, 1.0 / num_classes)
        raise UserError(f"{what}={spec!r} must be 'uniform' or a JSON file with one number per class")
    values = spec
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{what}: {spec!r} must be a list of {num_classes} non-negative numbers") from None
    if array.shape != (num_classes,) or not np.isfinite(array).all() or (array < 0).any() or array.sum() <= 0:
        raise UserError(
            f"{what}: expected {num_classes} finite non-negative numbers with a positive sum (one per class); "
            f"got {array.tolist() if array.size <= 20 else f'{array.size} values'}"
        )
    return array / array.sum()
