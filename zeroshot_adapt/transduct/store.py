"""The derived prediction store: refined probabilities of a teacher cache, keyed by what made them.

A derived set is keyed by (base cache identity digest, the samples' rows in it, the method chain with
every parameter and code version, the kNN index plan): a re-run with the same key is a hit and
computes nothing; any change is a miss. Layout (the directory appears only once complete: it is
built under a temporary name and renamed into place)::

    <root>/<digest[:16]>/
      identity.json       the key (and its full sha256 digest)
      probabilities.npy   float16 [N, C]  refined probabilities, row i <-> sample i of the base table
      prediction.npy      int64 [N]       argmax of the float32 probabilities (before the float16 cast)
      confidence.npy      float32 [N]     their max
      valid.npy           bool [N]        False for samples no method saw (corrupt images): all-zero rows

The store knows nothing about CLIP or the methods: callers pass the identity and a compute function.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zeroshot_adapt.fileio import atomic_write, atomic_write_text, fsync_directory

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
DIGEST_PREFIX_CHARS = 16
PROBABILITY_DTYPE = np.float16  # as the teacher cache stores logits


def identity_digest(identity: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of {format, identity}."""
    document = {"format_version": STORE_FORMAT_VERSION, "identity": identity}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rows_fingerprint(rows: np.ndarray) -> str:
    """sha256 of an int64 row array (which rows of the base cache, in which order)."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class DerivedPredictions:
    directory: Path
    identity: dict[str, Any]
    probabilities: np.ndarray  # [N, C] float16, memory-mapped
    prediction: np.ndarray  # [N] int64
    confidence: np.ndarray  # [N] float32
    valid: np.ndarray  # [N] bool
    hit: bool  # True when it was read from disk, not computed by this call


def _open(directory: Path, identity: Mapping[str, Any], hit: bool) -> DerivedPredictions:
    stored = json.loads((directory / "identity.json").read_text(encoding="utf-8"))
    if stored.get("digest") != identity_digest(identity):
        raise ValueError(f"{directory}/identity.json does not describe the requested derived set; delete the folder")
    return DerivedPredictions(
        directory=directory,
        identity=stored["identity"],
        probabilities=np.load(directory / "probabilities.npy", mmap_mode="r"),
        prediction=np.load(directory / "prediction.npy"),
        confidence=np.load(directory / "confidence.npy"),
        valid=np.load(directory / "valid.npy"),
        hit=hit,
    )


def open_derived(root: str | Path, identity: Mapping[str, Any]) -> DerivedPredictions | None:
    """The complete derived set of ``identity`` under ``root``, or None."""
    directory = Path(root) / identity_digest(identity)[:DIGEST_PREFIX_CHARS]
    if not (directory / "identity.json").is_file():
        return None
    return _open(directory, identity, hit=True)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_derived(root: str | Path, identity: Mapping[str, Any], probabilities: np.ndarray,
                  valid: np.ndarray) -> DerivedPredictions:
    """Store probabilities [N, C] (rows of invalid samples are stored as zeros) and return the set."""
    root = Path(root)
    digest = identity_digest(identity)
    directory = root / digest[:DIGEST_PREFIX_CHARS]
    valid = np.asarray(valid, dtype=bool)
    values = np.where(valid[:, None], probabilities, 0.0).astype(np.float32)
    building = root / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"
    building.mkdir(parents=True)
    try:
        _save(building / "probabilities.npy", values.astype(PROBABILITY_DTYPE))
        _save(building / "prediction.npy", values.argmax(axis=1).astype(np.int64))
        _save(building / "confidence.npy", values.max(axis=1).astype(np.float32))
        _save(building / "valid.npy", valid)
        document = {"digest": digest, "format_version": STORE_FORMAT_VERSION, "identity": identity}
        atomic_write_text(building / "identity.json", json.dumps(document, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(building, directory)
        except OSError:
            if not (directory / "identity.json").is_file():
                raise
            log.info("derived set %s was completed by another process; using it", directory)
        fsync_directory(root)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return _open(directory, identity, hit=False)


def get_or_compute(root: str | Path, identity: Mapping[str, Any],
                   compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> DerivedPredictions:
    """The stored set of ``identity``, else ``compute() -> (probabilities [N, C], valid [N])`` stored first.

    The identity must be JSON-serialisable (it is round-tripped so the returned one equals a re-read)."""
    identity = json.loads(json.dumps(identity, sort_keys=True))
    found = open_derived(root, identity)
    if found is not None:
        log.info("derived predictions: hit %s", found.directory)
        return found
    probabilities, valid = compute()
    return write_derived(root, identity, probabilities, valid)
