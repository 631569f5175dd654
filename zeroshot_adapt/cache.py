"""The on-disk prediction dictionary: sample key -> per-sample arrays (logits, features, ...).

The teacher predicts every sample of a dataset once; training then reads the predictions by sample key
and never runs the teacher again. This module knows nothing about CLIP: callers pass a ``compute``
function that maps sample indices to arrays.

On-disk layout (``root/<digest[:16]>/`` exists only once complete; it is renamed into place atomically)::

    root/
      3f2a9c0d1e4b5a67/              the cache of one identity
        identity.json                the caller's identity mapping, FORMAT_VERSION and the full digest
        meta.json                    number of samples, sha256 of the key list, dtype and shape per field
        keys_offsets.npy             int64 [N + 1]  byte offsets of key i in keys_blob: [off[i], off[i+1])
        keys_blob.npy                uint8 [total]  UTF-8 bytes of all keys, concatenated in row order
        index_hash.npy               uint64 [N]     blake2b-8 hash of every key, sorted ascending
        index_row.npy                int64 [N]      row of the key whose hash is index_hash[j]
        fields/<name>.npy            [N, ...]       one file per field returned by ``compute``
        attachments/<name>.npy       [...]          whole-cache arrays given to build_cache (e.g. the text
                                                    classifier a teacher's logits were computed with)
      3f2a9c0d1e4b5a67.partial/      only while building (removed once the cache is complete)
        identity.json, plan.json     what is being built: number of samples, key list sha256, shard size
        shards/shard-000000.npz      one finished shard (written to a temp name, then os.replace'd)
        merge-<pid>-<token>/         the merge in progress; renamed to ../3f2a9c0d1e4b5a67 when done

Row ``i`` of every array holds the sample ``keys[i]``: the order of ``keys`` given to
:func:`build_cache` is the canonical order (the pipeline passes the dataset's order,
``SampleTable.keys``). Every file of a complete cache depends only on the identity, the keys and what
``compute`` returns, not on the shard size, the number of processes or on interruptions, so a resumed
or multi-process build is byte-for-byte equal to an uninterrupted single-process one.

Opening memory-maps every file; nothing is read until it is indexed. A lookup hashes the query keys,
binary-searches the sorted hash array and then verifies the stored key bytes, so a hash collision can
never return the wrong row.

Concurrency: the processes of one job cooperate (shard ``i`` is computed by process
``i % num_processes``; they meet at ``wait_for_everyone``). Two independent jobs must not build the
same identity at the same moment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, overload

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Version of the on-disk format; part of every identity digest, so bumping it invalidates all caches."""

DIGEST_PREFIX_CHARS = 16
"""Hex characters of the identity digest used as the directory name (64 bits)."""

KEY_HASH_BYTES = 8
"""blake2b digest size of the key index (one little-endian uint64 per key)."""

_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMERIC_KINDS = "biuf"  # bool, signed int, unsigned int, float
_SHARD_NAME = "shard-{:06d}.npz"
_SHARD_MEMBER_PREFIX = "field_"


class CacheMiss(Exception):
    """No complete cache exists for this identity (absent, or only partly built)."""


class CacheCorruptError(Exception):
    """A complete-looking cache directory whose files disagree with each other or with its identity."""


# --------------------------------------------------------------------------------------------------
# Identity


def _canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"the cache identity must be JSON-serialisable (str, int, float, bool, None, lists, dicts "
            f"with str keys; no NaN): {err}"
        ) from err


def cache_identity_digest(identity: Mapping[str, Any]) -> str:
    """sha256 hex digest of ``{"format_version": FORMAT_VERSION, "identity": identity}`` as canonical JSON.

    ``identity`` holds everything that changes the cached result (model, weights, templates, class names,
    dataset and split fingerprint, preprocessing). Tuples and lists hash the same (JSON has only lists).
    """
    if not isinstance(identity, Mapping):
        raise TypeError(f"identity must be a mapping, got {type(identity).__name__}")
    document = {"format_version": FORMAT_VERSION, "identity": dict(identity)}
    return hashlib.sha256(_canonical_json(document).encode("utf-8")).hexdigest()


def cache_directory(root: Path | str, identity: Mapping[str, Any]) -> Path:
    """Where the complete cache of ``identity`` lives under ``root``."""
    return Path(root) / cache_identity_digest(identity)[:DIGEST_PREFIX_CHARS]


def _identity_document(identity: Mapping[str, Any]) -> dict[str, Any]:
    # Round-trip through JSON so the in-memory identity equals what a later open() reads back.
    return {
        "digest": cache_identity_digest(identity),
        "format_version": FORMAT_VERSION,
        "identity": json.loads(_canonical_json(dict(identity))),
    }


def _pretty_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# Keys


def _hash_keys(encoded: Sequence[bytes]) -> np.ndarray:
    """uint64 [len(encoded)]: blake2b-8 of each encoded key, read little-endian."""
    joined = b"".join([hashlib.blake2b(key, digest_size=KEY_HASH_BYTES).digest() for key in encoded])
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64)


def _encode_keys(keys: Sequence[str], what: str) -> list[bytes]:
    """UTF-8 bytes of every key; a TypeError names the first key that is not a str."""
    encoded = [key.encode("utf-8") for key in keys if isinstance(key, str)]
    if len(encoded) != len(keys):
        position, key = next((i, k) for i, k in enumerate(keys) if not isinstance(k, str))
        raise TypeError(f"{what}[{position}] is {type(key).__name__} {key!r}; sample keys must be str")
    return encoded


@dataclass(frozen=True)
class _KeyTable:
    """The key list of a build, in row order, with its lookup index."""

    offsets: np.ndarray  # int64 [N + 1]
    blob: np.ndarray  # uint8 [total]
    index_hash: np.ndarray  # uint64 [N], sorted
    index_row: np.ndarray  # int64 [N]
    sha256: str

    @property
    def num_samples(self) -> int:
        return len(self.index_row)

    @classmethod
    def from_keys(cls, keys: Sequence[str]) -> _KeyTable:
        encoded = _encode_keys(keys, "keys")
        if not encoded:
            raise ValueError("cannot build a prediction cache over zero keys")
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        if (lengths == 0).any():
            raise ValueError(f"keys[{int(np.argmin(lengths))}] is the empty string; sample keys must be non-empty")
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        hashes = _hash_keys(encoded)
        order = np.argsort(hashes, kind="stable").astype(np.int64)
        index_hash = hashes[order]
        _raise_on_duplicates(encoded, index_hash, order)
        digest = hashlib.sha256()
        digest.update(offsets.astype("<i8").tobytes())
        digest.update(blob.tobytes())
        return cls(offsets, blob, index_hash, order, digest.hexdigest())


def _raise_on_duplicates(encoded: Sequence[bytes], index_hash: np.ndarray, order: np.ndarray) -> None:
    """Keys are unique iff no run of equal hashes holds two equal strings (a true collision is fine)."""
    same_as_next = np.flatnonzero(index_hash[1:] == index_hash[:-1])
    if not len(same_as_next):
        return
    for run in np.split(same_as_next, np.flatnonzero(np.diff(same_as_next) != 1) + 1):
        seen: dict[bytes, int] = {}
        for row in sorted(int(r) for r in order[run[0] : run[-1] + 2]):
            if encoded[row] in seen:
                raise ValueError(
                    f"duplicate sample key {encoded[row].decode('utf-8')!r} at positions {seen[encoded[row]]} "
                    f"and {row}; the keys of a prediction cache must be unique"
                )
            seen[encoded[row]] = row


class _KeySequence(Sequence[str]):
    """The cached keys in row order, decoded lazily from the memory-mapped offsets + blob pair."""

    def __init__(self, offsets: np.ndarray, blob: np.ndarray) -> None:
        self._offsets = offsets
        self._blob = blob

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._decode_range(start, stop)
            return [self[i] for i in range(start, stop, step)]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"key index {index} out of range for {n} keys")
        start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
        return self._blob[start:stop].tobytes().decode("utf-8")

    def _decode_range(self, first: int, stop: int) -> list[str]:
        if stop <= first:
            return []
        offsets = np.asarray(self._offsets[first : stop + 1]).tolist()
        base = offsets[0]
        data = self._blob[base : offsets[-1]].tobytes()
        return [data[a - base : b - base].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def __iter__(self) -> Iterator[str]:
        chunk = 65536
        for first in range(0, len(self), chunk):
            yield from self._decode_range(first, min(first + chunk, len(self)))


# --------------------------------------------------------------------------------------------------
# Read side


def _load_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class PredictionCache:
    """A complete prediction cache, memory-mapped read-only. Use :meth:`open` or :func:`build_cache`.

    keys:   the sample keys in row order (lazy Sequence[str]).
    arrays: field name -> np.memmap [N, ...] (e.g. "logits" [N, C] float16, "features" [N, D] float16).
    attachments: name -> read-only array [...] stored once for the whole cache (see :func:`build_cache`).
    identity: the identity mapping it was built for; meta: sample count, key-list sha256, field specs.
    """

    def __init__(self, directory: Path) -> None:
        """Map the cache in ``directory``; prefer :meth:`open`, which checks the identity first."""
        self.directory = Path(directory)
        try:
            identity_doc = _load_json(self.directory / "identity.json")
            self.meta: dict[str, Any] = _load_json(self.directory / "meta.json")
        except FileNotFoundError as err:
            raise CacheMiss(f"no complete prediction cache in {self.directory}: {err.filename} is missing") from err
        self.identity: dict[str, Any] = identity_doc["identity"]
        self.digest: str = identity_doc["digest"]
        self._offsets = self._map("keys_offsets.npy")
        self._blob = self._map("keys_blob.npy")
        self._index_hash = self._map("index_hash.npy")
        self._index_row = self._map("index_row.npy")
        n = int(self.meta["num_samples"])
        fields = {}
        for name, spec in self.meta["fields"].items():
            array = self._map(f"fields/{name}.npy")
            expected = (n, *spec["shape"])
            if array.shape != expected or array.dtype.str != spec["dtype"]:
                raise CacheCorruptError(
                    f"{self.directory}/fields/{name}.npy is {array.dtype.str} {array.shape}, meta.json says "
                    f"{spec['dtype']} {expected}; delete {self.directory} and rebuild"
                )
            fields[name] = array
        self._arrays = MappingProxyType(fields)
        attachments = {}
        for name, spec in self.meta.get("attachments", {}).items():
            array = self._map(f"attachments/{name}.npy")
            if list(array.shape) != spec["shape"] or array.dtype.str != spec["dtype"]:
                raise CacheCorruptError(
                    f"{self.directory}/attachments/{name}.npy is {array.dtype.str} {array.shape}, meta.json says "
                    f"{spec['dtype']} {spec['shape']}; delete {self.directory} and rebuild"
                )
            attachments[name] = array
        self.attachments: Mapping[str, np.ndarray] = MappingProxyType(attachments)
        sizes = {len(self._offsets) - 1, len(self._index_hash), len(self._index_row)}
        if sizes != {n}:
            raise CacheCorruptError(
                f"the key index in {self.directory} does not hold {n} keys; delete the directory and rebuild"
            )
        self.keys: Sequence[str] = _KeySequence(self._offsets, self._blob)

    def _map(self, relative: str) -> np.memmap:
        try:
            return np.load(self.directory / relative, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as err:
            raise CacheCorruptError(f"{self.directory} lacks {relative}; delete the directory and rebuild") from err

    @classmethod
    def open(cls, root: Path | str, identity: Mapping[str, Any]) -> PredictionCache:
        """The complete cache of ``identity`` under ``root``; raises CacheMiss if there is none."""
        directory = cache_directory(root, identity)
        if not directory.is_dir():
            partial = directory.with_name(directory.name + ".partial")
            state = f" (a partial build is in {partial})" if partial.is_dir() else ""
            raise CacheMiss(f"no prediction cache for this identity at {directory}{state}")
        cache = cls(directory)
        expected = _identity_document(identity)
        if cache.digest != expected["digest"] or cache.identity != expected["identity"]:
            raise CacheCorruptError(
                f"{directory}/identity.json does not describe the requested identity (digest "
                f"{cache.digest[:16]}... vs {expected['digest'][:16]}...); delete {directory} and rebuild"
            )
        return cache

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """Field name -> read-only np.memmap [N, ...]; indexing reads only the pages it touches (+ OS read-ahead)."""
        return self._arrays

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._arrays)

    def __len__(self) -> int:
        return len(self._index_row)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return bool(self._find([key])[0] >= 0)

    def __repr__(self) -> str:
        specs = ", ".join(f"{name}={a.dtype}{list(a.shape[1:])}" for name, a in self._arrays.items())
        return f"PredictionCache({str(self.directory)!r}, {len(self)} samples, {specs})"

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """int64 [len(keys)]: the row of each key; raises KeyError naming the first key not cached."""
        rows = self._find(keys)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            first = keys[int(missing[0])]
            raise KeyError(
                f"sample key {first!r} is not in the prediction cache at {self.directory} "
                f"({len(missing)} of {len(rows)} requested keys missing)"
            )
        return rows

    def get(self, keys: Sequence[str], fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Field name -> in-memory array [len(keys), ...] of the rows of ``keys`` (all fields by default)."""
        names = list(self._arrays) if fields is None else list(fields)
        unknown = [name for name in names if name not in self._arrays]
        if unknown:
            raise KeyError(f"unknown field(s) {unknown}; this cache holds {sorted(self._arrays)}")
        rows = self.lookup(keys)
        # Read in row order (sequential on disk), then put the rows back in query order.
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = {}
        for name in names:
            source = self._arrays[name]
            values = np.empty((len(rows), *source.shape[1:]), dtype=source.dtype)
            values[order] = source[sorted_rows]
            out[name] = values
        return out

    def _find(self, keys: Sequence[str]) -> np.ndarray:
        """int64 [len(keys)]: row of each key, -1 where absent."""
        encoded = _encode_keys(keys, "keys")
        if not encoded:
            return np.zeros(0, dtype=np.int64)
        query_hash = _hash_keys(encoded)
        n = len(self._index_hash)
        position = np.searchsorted(self._index_hash, query_hash, side="left")
        clipped = np.minimum(position, n - 1)
        rows = np.asarray(self._index_row[clipped], dtype=np.int64)
        candidate = (position < n) & (np.asarray(self._index_hash[clipped]) == query_hash)

        # Verify the stored key bytes of every candidate row (vectorised over all queries).
        query_len = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        starts = np.asarray(self._offsets[rows], dtype=np.int64)
        stored_len = np.asarray(self._offsets[rows + 1], dtype=np.int64) - starts
        verified = candidate & (stored_len == query_len)
        check = np.flatnonzero(verified & (query_len > 0))
        if len(check):
            lengths = query_len[check]
            seg_begin = np.zeros(len(check), dtype=np.int64)
            np.cumsum(lengths[:-1], out=seg_begin[1:])
            byte_pos = np.repeat(starts[check] - seg_begin, lengths) + np.arange(int(lengths.sum()))
            query_bytes = np.frombuffer(b"".join(encoded[i] for i in check), dtype=np.uint8)
            differs = np.add.reduceat((self._blob[byte_pos] != query_bytes).astype(np.int64), seg_begin)
            verified[check[differs > 0]] = False

        # A hash present but the bytes differ: a 64-bit collision; scan the run of equal hashes.
        for i in np.flatnonzero(candidate & ~verified):
            rows[i] = self._scan_equal_hashes(int(position[i]), query_hash[i], encoded[i])
            verified[i] = rows[i] >= 0
        rows[~verified] = -1
        return rows

    def _scan_equal_hashes(self, position: int, key_hash: np.uint64, key: bytes) -> int:
        while position < len(self._index_hash) and self._index_hash[position] == key_hash:
            row = int(self._index_row[position])
            if self._blob[int(self._offsets[row]) : int(self._offsets[row + 1])].tobytes() == key:
                return row
            position += 1
        return -1


# --------------------------------------------------------------------------------------------------
# Write side: small atomic-file helpers


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _fsync_path(path: Path) -> None:
    """Flush a file (or, where the OS allows, a directory entry) to stable storage."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temp = _temp_name(path)
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# Write side: shards


@dataclass(frozen=True)
class _FieldSpec:
    dtype: str  # numpy dtype string, e.g. "<f2"
    shape: tuple[int, ...]  # per-sample shape (all dims but the first)

    def describe(self) -> str:
        return f"{np.dtype(self.dtype).name} {list(self.shape)}"


def _specs_of(arrays: Mapping[str, np.ndarray]) -> dict[str, _FieldSpec]:
    return {name: _FieldSpec(a.dtype.str, tuple(int(d) for d in a.shape[1:])) for name, a in arrays.items()}


def _validate_compute_output(output: Any, num_rows: int, where: str) -> dict[str, np.ndarray]:
    """The arrays ``compute`` returned for ``num_rows`` samples, checked; errors say what is wrong."""
    if not isinstance(output, Mapping) or not output:
        raise TypeError(
            f"compute must return a non-empty mapping field name -> array, got {type(output).__name__} ({where})"
        )
    arrays = {}
    for name, value in output.items():
        if not isinstance(name, str) or not _FIELD_NAME.match(name):
            raise ValueError(
                f"compute returned field name {name!r} ({where}); field names must match {_FIELD_NAME.pattern}"
            )
        array = np.asarray(value)
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(
                f"compute returned field {name!r} with dtype {array.dtype} ({where}); "
                "only bool, integer and floating-point arrays can be cached"
            )
        if array.ndim == 0 or array.shape[0] != num_rows:
            raise ValueError(
                f"compute returned field {name!r} with shape {list(array.shape)} for {num_rows} samples "
                f"({where}); the first dimension must equal the number of indices"
            )
        arrays[name] = np.ascontiguousarray(array)
    return arrays


def _check_same_fields(expected: Mapping[str, _FieldSpec], actual: Mapping[str, _FieldSpec], where: str) -> None:
    if set(expected) != set(actual):
        raise ValueError(f"inconsistent fields: {where} has {sorted(actual)}, earlier shards have {sorted(expected)}")
    for name, spec in expected.items():
        if actual[name] != spec:
            raise ValueError(
                f"inconsistent field {name!r}: {where} has {actual[name].describe()}, "
                f"earlier shards have {spec.describe()}"
            )


def _write_shard(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one shard atomically: temp file, fsync, os.replace. Removes stale temps of this shard first."""
    for stale in path.parent.glob(f"{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    temp = _temp_name(path)
    with open(temp, "wb") as f:
        # Prefixed member names: a field called "file" must not clash with np.savez's own arguments.
        np.savez(f, **{_SHARD_MEMBER_PREFIX + name: array for name, array in arrays.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as shard:
        return {member.removeprefix(_SHARD_MEMBER_PREFIX): shard[member] for member in shard.files}


def _shard_bounds(shard: int, shard_size: int, num_samples: int) -> tuple[int, int]:
    start = shard * shard_size
    return start, min(start + shard_size, num_samples)


# --------------------------------------------------------------------------------------------------
# Write side: merge


def _copy_shard_into(
    shard_path: Path, outputs: Mapping[str, np.ndarray], start: int, stop: int, specs: Mapping[str, _FieldSpec]
) -> None:
    """Copy one finished shard into rows [start, stop) of the merged memmaps, checking it first."""
    arrays = _read_shard(shard_path)
    _check_same_fields(specs, _specs_of(arrays), f"shard {shard_path.name}")
    for name, array in arrays.items():
        if array.shape[0] != stop - start:
            raise CacheCorruptError(
                f"{shard_path} holds {array.shape[0]} rows of {name!r}, expected {stop - start}; "
                "delete it and build again"
            )
        outputs[name][start:stop] = array


def _merge_shards(
    build_dir: Path,
    final_dir: Path,
    plan: Mapping[str, int],
    key_table: _KeyTable,
    identity_doc: Mapping[str, Any],
    progress: bool,
    attachments: Mapping[str, np.ndarray],
) -> None:
    """Merge all shards (and the attachments) into a new directory and rename it to ``final_dir`` (atomic)."""
    for stale in build_dir.glob("merge-*"):
        shutil.rmtree(stale, ignore_errors=True)
    num_samples, shard_size = plan["num_samples"], plan["shard_size"]
    num_shards = -(-num_samples // shard_size)
    shard_dir = build_dir / "shards"
    missing = [i for i in range(num_shards) if not (shard_dir / _SHARD_NAME.format(i)).is_file()]
    if missing:
        raise RuntimeError(
            f"cannot merge {build_dir}: shards {missing[:10]}{'...' if len(missing) > 10 else ''} are missing; "
            "did every process run build_cache and does wait_for_everyone really wait for all of them?"
        )

    merge_dir = build_dir / f"merge-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (merge_dir / "fields").mkdir(parents=True)
    specs = _specs_of(_read_shard(shard_dir / _SHARD_NAME.format(0)))
    outputs = {
        name: np.lib.format.open_memmap(
            merge_dir / "fields" / f"{name}.npy",
            mode="w+",
            dtype=np.dtype(spec.dtype),
            shape=(num_samples, *spec.shape),
        )
        for name, spec in sorted(specs.items())
    }
    for shard in tqdm(range(num_shards), desc="merging prediction cache", unit="shard", disable=not progress):
        start, stop = _shard_bounds(shard, shard_size, num_samples)
        _copy_shard_into(shard_dir / _SHARD_NAME.format(shard), outputs, start, stop, specs)
    for output in outputs.values():
        output.flush()
    del outputs
    for name in specs:
        _fsync_path(merge_dir / "fields" / f"{name}.npy")

    _save_npy(merge_dir / "keys_offsets.npy", key_table.offsets.astype("<i8"))
    _save_npy(merge_dir / "keys_blob.npy", key_table.blob)
    _save_npy(merge_dir / "index_hash.npy", key_table.index_hash.astype("<u8"))
    _save_npy(merge_dir / "index_row.npy", key_table.index_row.astype("<i8"))
    if attachments:
        (merge_dir / "attachments").mkdir()
        for name, array in attachments.items():
            _save_npy(merge_dir / "attachments" / f"{name}.npy", array)
        _fsync_path(merge_dir / "attachments")
    meta = {
        "format_version": FORMAT_VERSION,
        "num_samples": num_samples,
        "keys_sha256": key_table.sha256,
        "fields": {name: {"dtype": spec.dtype, "shape": list(spec.shape)} for name, spec in sorted(specs.items())},
        "attachments": {
            name: {"dtype": array.dtype.str, "shape": list(array.shape)} for name, array in sorted(attachments.items())
        },
    }
    _atomic_write_bytes(merge_dir / "meta.json", _pretty_json(meta))
    _atomic_write_bytes(merge_dir / "identity.json", _pretty_json(identity_doc))
    _fsync_path(merge_dir / "fields")
    _fsync_path(merge_dir)
    os.rename(merge_dir, final_dir)
    _fsync_path(final_dir.parent)


def _check_attachments(attachments: Mapping[str, Any]) -> dict[str, np.ndarray]:
    checked = {}
    for name, value in attachments.items():
        if not isinstance(name, str) or not _FIELD_NAME.match(name):
            raise ValueError(f"attachment name {name!r} must match {_FIELD_NAME.pattern}")
        array = np.array(value, order="C")  # (np.ascontiguousarray would turn a scalar into shape [1])
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"attachment {name!r} has dtype {array.dtype}; only numeric arrays can be cached")
        checked[name] = array
    return checked


def _remove_build_dir(build_dir: Path) -> None:
    shutil.rmtree(build_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# build_cache


def _no_barrier() -> None:
    """Default ``wait_for_everyone`` for a single process."""


def _check_complete_cache(cache: PredictionCache, key_table: _KeyTable) -> PredictionCache:
    if cache.meta["keys_sha256"] != key_table.sha256 or len(cache) != key_table.num_samples:
        raise ValueError(
            f"the prediction cache at {cache.directory} was built for a different key list "
            f"({len(cache)} keys) than the {key_table.num_samples} keys given, under the same identity. "
            "The identity must include the dataset/split fingerprint; fix it or delete the directory."
        )
    return cache


def _prepare_build_dir(build_dir: Path, identity_doc: Mapping[str, Any], key_table: _KeyTable, shard_size: int) -> None:
    """Process 0: create the partial directory and its plan, or check an existing plan matches."""
    (build_dir / "shards").mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(build_dir / "identity.json", _pretty_json(identity_doc))
    plan_path = build_dir / "plan.json"
    if plan_path.is_file():
        plan = _load_json(plan_path)
        if plan["keys_sha256"] != key_table.sha256 or plan["num_samples"] != key_table.num_samples:
            raise ValueError(
                f"the partial build in {build_dir} is for a different key list ({plan['num_samples']} keys) "
                f"than the {key_table.num_samples} keys given, under the same identity. The identity must "
                "include the dataset/split fingerprint; fix it or delete the partial directory."
            )
        if plan["shard_size"] != shard_size:
            logger.warning(
                "resuming %s with its original shard size %d (asked for %d; the result is the same)",
                build_dir,
                plan["shard_size"],
                shard_size,
            )
        return
    plan = {"num_samples": key_table.num_samples, "keys_sha256": key_table.sha256, "shard_size": shard_size}
    _atomic_write_bytes(plan_path, _pretty_json(plan))


def build_cache(
    root: Path | str,
    identity: Mapping[str, Any],
    keys: Sequence[str],
    compute: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    *,
    shard_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] = _no_barrier,
    progress: bool = True,
    attachments: Mapping[str, np.ndarray] | None = None,
) -> PredictionCache:
    """Build (or resume, or just open) the prediction cache of ``identity`` under ``root``.

    keys:       unique sample keys; row i of the cache holds keys[i] (pass the dataset's own order).
                Every process must pass the same keys in the same order.
    compute:    int64 [n] sample indices of one shard -> {field: array [n, ...]} (numpy, numeric);
                called once per shard, so the caller batches inside it. Must return the same fields,
                dtypes and per-sample shapes for every shard.
    shard_size: samples per shard (the unit of resumption). A resumed build keeps its first shard size.
    attachments: whole-cache arrays stored next to the fields (name -> numeric array of any shape), read
                back as ``cache.attachments``; they must follow from the identity (the merging process's are
                written). A complete cache is opened as it is.
    process_index, num_processes, wait_for_everyone: for multi-process builds (e.g. from Accelerate:
                ``accelerator.process_index``, ``accelerator.num_processes``,
                ``accelerator.wait_for_everyone``). Shard i is computed by process i % num_processes;
                process 0 merges. Every process must call build_cache.

    A complete cache is returned at once. Otherwise finished shards are kept, missing ones computed,
    and everything merged; an interrupted build resumes where it stopped and ends byte-for-byte equal
    to an uninterrupted one. Returns the opened cache on every process.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"need 0 <= process_index < num_processes, got {process_index} and {num_processes}")
    if num_processes > 1 and wait_for_everyone is _no_barrier:
        raise ValueError(
            "a build with num_processes > 1 needs a real barrier: pass wait_for_everyone "
            "(e.g. accelerator.wait_for_everyone)"
        )
    root = Path(root)
    final_dir = cache_directory(root, identity)
    build_dir = final_dir.with_name(final_dir.name + ".partial")
    identity_doc = _identity_document(identity)
    key_table = _KeyTable.from_keys(keys)
    is_main = process_index == 0

    if final_dir.is_dir():
        cache = _check_complete_cache(PredictionCache.open(root, identity), key_table)
        if is_main and build_dir.exists():
            _remove_build_dir(build_dir)  # left over by a build killed after its final rename
        return cache

    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        _prepare_build_dir(build_dir, identity_doc, key_table, shard_size)
    wait_for_everyone()
    plan = _load_json(build_dir / "plan.json")
    if plan["keys_sha256"] != key_table.sha256:
        raise ValueError(
            f"process {process_index} was given a different key list than process 0 ({build_dir}/plan.json); "
            "every process must pass the same keys in the same order"
        )
    shard_size = int(plan["shard_size"])
    num_samples = key_table.num_samples
    num_shards = -(-num_samples // shard_size)
    shard_dir = build_dir / "shards"
    mine = range(process_index, num_shards, num_processes)
    todo = [s for s in mine if not (shard_dir / _SHARD_NAME.format(s)).is_file()]
    if is_main:
        logger.info(
            "building prediction cache %s: %d samples in %d shards of %d, %d of this process's %d shards done",
            final_dir,
            num_samples,
            num_shards,
            shard_size,
            len(mine) - len(todo),
            len(mine),
        )

    specs: dict[str, _FieldSpec] | None = None
    with tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc="predicting",
        unit="shard",
        disable=not (progress and is_main),
    ) as bar:
        for shard in todo:
            start, stop = _shard_bounds(shard, shard_size, num_samples)
            where = f"shard {shard}, samples {start}..{stop - 1}"
            arrays = _validate_compute_output(compute(np.arange(start, stop, dtype=np.int64)), stop - start, where)
            if specs is None:
                specs = _specs_of(arrays)
            else:
                _check_same_fields(specs, _specs_of(arrays), where)
            _write_shard(shard_dir / _SHARD_NAME.format(shard), arrays)
            bar.update(1)

    wait_for_everyone()
    if is_main:
        if not final_dir.is_dir():
            logger.info("merging %d shards into %s", num_shards, final_dir)
            _merge_shards(
                build_dir, final_dir, plan, key_table, identity_doc, progress, _check_attachments(attachments or {})
            )
        _remove_build_dir(build_dir)
        logger.info("prediction cache ready: %s", final_dir)
    wait_for_everyone()
    return PredictionCache.open(root, identity)
