"""The on-disk prediction dictionary: (sample key, content id) -> per-sample arrays (logits, features, ...).

The teacher predicts every sample once; training then reads the predictions by sample key and never runs
the teacher again. This module knows nothing about CLIP: callers pass a ``compute`` function that maps
sample indices to arrays.

Identity, family and per-sample reuse
    A cache is the complete, immutable result for one ``identity`` (everything that changes the result:
    model, weights, templates, class names, preprocessing, compute settings, dataset, split and the split's
    fingerprint). Its ``family`` is the part of the identity that fixes what ``compute`` returns for ONE
    sample (the teacher: everything but the sample list). When a build starts, every complete cache of the
    same family under the root lends the rows it holds for the same (key, content id) pair, so a dataset
    that gains or loses samples re-predicts only the new ones, and a sample whose content id changed is
    re-predicted. Lent rows are copied into the new cache (each cache stays self-contained; older ones are
    listed as superseded and can be pruned). Rows whose ``retry_field`` is 0 (e.g. images that could not
    be decoded) are never lent: they are tried again.

On-disk layout (``root/<digest[:16]>/`` exists only once complete; it is renamed into place atomically)::

    root/
      3f2a9c0d1e4b5a67/              the cache of one identity (immutable once renamed into place)
        identity.json                identity, family, their digests, FORMAT_VERSION
        meta.json                    samples, key-list sha256, dtype + shape per field, and the manifest:
                                     bytes + xxh3-128 checksum of every file, which files are checked at open
        build.json                   when and how it was built (rows computed / reused); informational only
        keys_offsets.npy             int64 [N + 1]  byte offsets of key i in keys_blob: [off[i], off[i+1])
        keys_blob.npy                uint8 [total]  UTF-8 bytes of all keys, concatenated in row order
        index_hash.npy               uint64 [N]     blake2b-8 hash of every key, sorted ascending
        index_row.npy                int64 [N]      row of the key whose hash is index_hash[j]
        content_digest.npy           uint8 [N, 16]  blake2b-16 of every sample's content id
        fields/<name>.npy            [N, ...]       one file per field returned by ``compute``
        attachments/<name>.npy       [...]          whole-cache arrays (e.g. the text classifier)
      3f2a9c0d1e4b5a67.partial/      only while building (removed once the cache is complete)
        identity.json, plan.json     what is being built: keys, shard size, the caches rows are reused from
        sources.npy                  int64 [N, 2]   per row: (index of the lending cache, its row); -1: compute
        shards/shard-000000.npz      one finished shard of the computed rows (atomic writes)
        merge-<pid>-<token>/         the merge in progress; renamed to ../3f2a9c0d1e4b5a67 when done
      .locks/3f2a9c0d1e4b5a67.build  held (exclusive) by the process building that identity
      .locks/3f2a9c0d1e4b5a67.use    held (shared) by every process that has the cache open

Row ``i`` of every array holds the sample ``keys[i]`` (the caller's order, e.g. ``SampleTable.keys``).
Every file but build.json depends only on the identity, the keys and what ``compute`` returns: not on the
shard size (shards are whole numbers of ``batch_size`` rows on a fixed grid, so batch boundaries never
depend on it), the number of processes, interruptions, or which rows were reused.

Integrity: opening checks, cheaply, that every file of the manifest exists with its recorded size, dtype
and shape, and the checksums of the small per-sample fields (at most OPEN_CHECK_MAX_ROW_BYTES bytes per
row: prediction, confidence, valid) and of the attachments (0.1 s at ImageNet size). The large fields are
checked in full the first time :meth:`PredictionCache.verified` reads them, and everything by
:meth:`PredictionCache.verify` (``zsa cache --verify``). Lookups compare the stored key bytes, so a
damaged key index can miss a key but never return another key's row. Any damage is a
:class:`CacheDamagedError` naming the cache and the file: delete it or rebuild.

Concurrency: the processes of one job cooperate (shard ``i`` is computed by process ``i % num_processes``;
they meet at ``wait_for_everyone``; process 0 plans, merges and holds the build lock). A second job that
wants the same identity waits for the build lock (with a message), then opens the finished cache. Merges
check free space first, write with ordinary writes (never through a memory map, so a full disk is an
error, not a SIGBUS) and remove their partial files on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, overload

import numpy as np
import xxhash
from tqdm.auto import tqdm

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.fileio import DiskFullError, atomic_write, fsync_directory, is_disk_full

try:  # shared "in use" locks; not available on Windows (then caches are never reported in use)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
"""Version of the on-disk format; part of every identity digest, so bumping it invalidates all caches.
3: manifest with checksums, content ids, per-sample reuse within a family, build.json."""

DIGEST_PREFIX_CHARS = 16
"""Hex characters of the identity digest used as the directory name (64 bits)."""

KEY_HASH_BYTES = 8
"""blake2b digest size of the key index (one little-endian uint64 per key)."""

CONTENT_DIGEST_BYTES = 16
"""blake2b digest size of a sample's content id (a 128-bit digest: a changed content id never matches)."""

CHECKSUM = "xxh3_128"
"""File checksum of the manifest: xxHash3-128 (5-6 GB/s on one core, vs 0.7 for sha256, 1.1 for crc32)."""

OPEN_CHECK_MAX_ROW_BYTES = 16
"""Per-sample fields with at most this many bytes per row (prediction, confidence, valid) are checksummed at
every open; larger ones (logits, features) on their first full read and by verify()."""

READ_CHUNK_BYTES = 16 << 20
"""Bytes read at a time when checksumming a file."""

MERGE_CHUNK_BYTES = 64 << 20
"""About this many bytes of rows (all fields) are gathered in memory at a time while merging."""

FREE_SPACE_SLACK_BYTES = 1 << 20
"""Free space wanted beyond the exact size of the merged files (JSON files, directory entries)."""

LOCKS_DIR = ".locks"
PARTIAL_SUFFIX = ".partial"
TRASH_MARK = ".deleting-"
_NAME = re.compile(rf"^[0-9a-f]{{{DIGEST_PREFIX_CHARS}}}$")
_OURS = re.compile(  # a cache, a partial build, or a cache being deleted
    rf"^[0-9a-f]{{{DIGEST_PREFIX_CHARS}}}({re.escape(PARTIAL_SUFFIX)}|{re.escape(TRASH_MARK)}[0-9a-f]{{8}})?$"
)
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMERIC_KINDS = "biuf"  # bool, signed int, unsigned int, float
_SHARD_NAME = "shard-{:06d}.npz"
_SHARD_MEMBER_PREFIX = "field_"
_KEY_FILES = ("keys_offsets.npy", "keys_blob.npy", "index_hash.npy", "index_row.npy", "content_digest.npy")


class CacheMiss(Exception):
    """No complete cache exists for this identity (absent, or only partly built)."""


class CacheDamagedError(UserError):
    """A cache directory whose files are missing, truncated, unreadable or fail their checksum."""

    def __init__(self, directory: Path | str, what: str, detail: str = "") -> None:
        self.directory = Path(directory)
        self.what = what
        super().__init__(
            f"prediction cache {self.directory} is damaged ({what}{': ' + detail if detail else ''}): "
            "delete it or run with --rebuild"
        )


CacheCorruptError = CacheDamagedError  # the name before format 3


class CacheInUseError(UserError):
    """A cache cannot be deleted: another process has it open or is building it."""


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


def family_digest(family: Mapping[str, Any]) -> str:
    """sha256 hex digest of a family (the per-sample part of an identity), format version included."""
    document = {"format_version": FORMAT_VERSION, "family": dict(family)}
    return hashlib.sha256(_canonical_json(document).encode("utf-8")).hexdigest()


def cache_directory(root: Path | str, identity: Mapping[str, Any]) -> Path:
    """Where the complete cache of ``identity`` lives under ``root``."""
    return Path(root) / cache_identity_digest(identity)[:DIGEST_PREFIX_CHARS]


def _identity_document(identity: Mapping[str, Any], family: Mapping[str, Any] | None) -> dict[str, Any]:
    # Round-trip through JSON so the in-memory identity equals what a later open() reads back.
    document = {
        "digest": cache_identity_digest(identity),
        "format_version": FORMAT_VERSION,
        "identity": json.loads(_canonical_json(dict(identity))),
    }
    if family is not None:
        document["family"] = json.loads(_canonical_json(dict(family)))
        document["family_digest"] = family_digest(family)
    return document


def _pretty_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# Keys and content ids


def _hash_keys(encoded: Sequence[bytes]) -> np.ndarray:
    """uint64 [len(encoded)]: blake2b-8 of each encoded key, read little-endian."""
    joined = b"".join([hashlib.blake2b(key, digest_size=KEY_HASH_BYTES).digest() for key in encoded])
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64)


def _content_digests(content_ids: Sequence[str]) -> np.ndarray:
    """uint8 [N, CONTENT_DIGEST_BYTES]: blake2b-16 of each content id."""
    joined = b"".join(
        [hashlib.blake2b(c.encode("utf-8"), digest_size=CONTENT_DIGEST_BYTES).digest() for c in content_ids]
    )
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(content_ids), CONTENT_DIGEST_BYTES)


def _encode_keys(keys: Sequence[str], what: str) -> list[bytes]:
    """UTF-8 bytes of every key; a TypeError names the first key that is not a str."""
    encoded = [key.encode("utf-8") for key in keys if isinstance(key, str)]
    if len(encoded) != len(keys):
        position, key = next((i, k) for i, k in enumerate(keys) if not isinstance(k, str))
        raise TypeError(f"{what}[{position}] is {type(key).__name__} {key!r}; sample keys must be str")
    return encoded


@dataclass(frozen=True)
class _KeyTable:
    """The key list of a build, in row order, with its lookup index and content digests."""

    keys: Sequence[str]
    offsets: np.ndarray  # int64 [N + 1]
    blob: np.ndarray  # uint8 [total]
    index_hash: np.ndarray  # uint64 [N], sorted
    index_row: np.ndarray  # int64 [N]
    content: np.ndarray  # uint8 [N, CONTENT_DIGEST_BYTES]
    sha256: str  # of the key list
    content_sha256: str  # of the content digests

    @property
    def num_samples(self) -> int:
        return len(self.index_row)

    @classmethod
    def from_keys(cls, keys: Sequence[str], content_ids: Sequence[str] | None = None) -> _KeyTable:
        encoded = _encode_keys(keys, "keys")
        if not encoded:
            raise ValueError("cannot build a prediction cache over zero keys")
        if content_ids is None:
            content_ids = [""] * len(encoded)
        if len(content_ids) != len(encoded) or not all(isinstance(c, str) for c in content_ids):
            raise ValueError(f"content_ids must be {len(encoded)} strings, one per key")
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
        content = _content_digests(content_ids)
        content_sha = hashlib.sha256(content.tobytes()).hexdigest()
        return cls(list(keys), offsets, blob, index_hash, order, content, digest.hexdigest(), content_sha)


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
# Checksums and locks


def file_checksum(path: Path | str) -> str:
    """xxh3-128 hex digest of a file's bytes, read in chunks (bounded memory)."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(READ_CHUNK_BYTES):
            hasher.update(block)
    return hasher.hexdigest()


def _meta_checksum(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return xxhash.xxh3_128(_canonical_json(body).encode("utf-8")).hexdigest()


def _lock_file(root: Path, name: str, kind: str) -> Path:
    return root / LOCKS_DIR / f"{name}.{kind}"


class _BuildLock:
    """The exclusive lock of one identity's build (filelock: released by the OS if the holder dies)."""

    def __init__(self, root: Path, name: str) -> None:
        from filelock import FileLock

        self.root, self.name = root, name
        (root / LOCKS_DIR).mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(_lock_file(root, name, "build")), is_singleton=False, thread_local=False)

    def try_acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def acquire(self) -> _BuildLock:
        """Take the lock, waiting (with a message) while another process builds this identity."""
        if not self.try_acquire():
            logger.warning(
                "another process is building the prediction cache %s; waiting for it to finish "
                "(the lock is %s)",
                self.root / self.name,
                _lock_file(self.root, self.name, "build"),
            )
            started = time.monotonic()
            self._lock.acquire()
            logger.warning("the other build of %s ended after %.0f s; continuing", self.root / self.name,
                           time.monotonic() - started)
        return self

    def release(self) -> None:
        self._lock.release()


def _build_running(root: Path, name: str) -> bool:
    """Whether some process holds the build lock of ``name`` (a build in progress)."""
    if not _lock_file(root, name, "build").exists():
        return False
    lock = _BuildLock(root, name)
    if lock.try_acquire():
        lock.release()
        return False
    return True


def _take_use_lock(root: Path, name: str, *, exclusive: bool) -> int | None:
    """A shared (readers) or exclusive non-blocking (deleters) flock on ``.locks/<name>.use``; its fd.

    Shared: waits for a deleter (which holds the lock only for a rename); returns None where locks are
    unavailable (read-only root, no fcntl). Exclusive: raises BlockingIOError while any reader holds it."""
    if fcntl is None:
        return None
    path = _lock_file(root, name, "use")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        if exclusive:
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _cache_in_use(root: Path, name: str) -> bool:
    try:
        fd = _take_use_lock(root, name, exclusive=True)
    except BlockingIOError:
        return True
    except OSError:
        return False
    if fd is not None:
        os.close(fd)
    return False


# --------------------------------------------------------------------------------------------------
# Read side


def _describe_file(relative: str) -> str:
    """How a damage message names a cache file: "field logits", "attachment text_classifier", ..."""
    if relative.startswith("fields/"):
        return f"field {Path(relative).stem}"
    if relative.startswith("attachments/"):
        return f"attachment {Path(relative).stem}"
    if relative in _KEY_FILES:
        return f"key index {relative}"
    return relative


class PredictionCache:
    """A complete prediction cache, memory-mapped read-only. Use :meth:`open` or :func:`build_cache`.

    keys:   the sample keys in row order (lazy Sequence[str]).
    arrays: field name -> np.memmap [N, ...] (e.g. "logits" [N, C] float16, "features" [N, D] float16);
            the small fields are checksummed at open, the others by :meth:`verified` / :meth:`verify`.
    attachments: name -> read-only array [...] stored once for the whole cache (checksummed at open).
    identity / family: the mappings it was built for; meta: sample count, field specs, the file manifest.
    """

    def __init__(self, directory: Path | str, *, expected_digest: str | None = None,
                 use_lock_fd: int | None = None) -> None:
        """Map and check the cache in ``directory`` (raises CacheDamagedError); prefer :meth:`open`."""
        self.directory = Path(directory)
        self._verified: set[str] = set()
        identity_doc = self._read_json("identity.json")
        try:
            self.identity: dict[str, Any] = identity_doc["identity"]
            self.digest: str = identity_doc["digest"]
            version = identity_doc["format_version"]
            self.family: dict[str, Any] | None = identity_doc.get("family")
            self.family_digest: str | None = identity_doc.get("family_digest")
            recomputed = cache_identity_digest(self.identity)
        except (KeyError, TypeError, ValueError) as error:
            raise CacheDamagedError(self.directory, "identity.json", f"unexpected content ({error})") from None
        if version != FORMAT_VERSION or recomputed != self.digest:
            raise CacheDamagedError(self.directory, "identity.json", "its digest does not match its content")
        if expected_digest is not None and self.digest != expected_digest:
            raise CacheDamagedError(self.directory, "identity.json", "it describes another identity")
        self.meta: dict[str, Any] = self._read_json("meta.json")
        self._check_meta()
        n = self.num_samples = int(self.meta["num_samples"])
        for relative, entry in self.meta["files"].items():
            self._check_size(relative, entry["bytes"])
        self._offsets = self._map("keys_offsets.npy", np.int64, (n + 1,))
        self._blob = self._map("keys_blob.npy", np.uint8, None)
        self._index_hash = self._map("index_hash.npy", np.uint64, (n,))
        self._index_row = self._map("index_row.npy", np.int64, (n,))
        self._content = self._map("content_digest.npy", np.uint8, (n, CONTENT_DIGEST_BYTES))
        self._arrays = MappingProxyType({
            name: self._map(f"fields/{name}.npy", np.dtype(spec["dtype"]), (n, *spec["shape"]))
            for name, spec in self.meta["fields"].items()
        })
        self.attachments: Mapping[str, np.ndarray] = MappingProxyType({
            name: self._map(f"attachments/{name}.npy", np.dtype(spec["dtype"]), tuple(spec["shape"]))
            for name, spec in self.meta["attachments"].items()
        })
        for relative in self.meta["checked_at_open"]:
            self._check_checksum(relative)
        self.keys: Sequence[str] = _KeySequence(self._offsets, self._blob)
        if use_lock_fd is not None:  # registered last: a failed __init__ leaves the fd to the caller
            self._release_use_lock = weakref.finalize(self, os.close, use_lock_fd)

    # ---------------------------------------------------------------- opening and checking

    @classmethod
    def open(cls, root: Path | str, identity: Mapping[str, Any]) -> PredictionCache:
        """The complete cache of ``identity`` under ``root``; CacheMiss if there is none, CacheDamagedError
        if it is damaged. Marks it in use (a shared lock) while the object lives."""
        root = Path(root)
        directory = cache_directory(root, identity)
        if not directory.is_dir():
            raise CacheMiss(_miss_message(directory))
        fd = _take_use_lock(root, directory.name, exclusive=False)
        try:
            if not directory.is_dir():  # deleted while we waited for the lock
                raise CacheMiss(_miss_message(directory))
            cache = cls(directory, expected_digest=cache_identity_digest(identity), use_lock_fd=fd)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        try:
            os.utime(directory)  # "last used", for `zsa cache --list` and `--prune --older-than`
        except OSError:
            pass
        return cache

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            with open(self.directory / name, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            raise CacheDamagedError(self.directory, name, "missing") from None
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CacheDamagedError(self.directory, name, f"unreadable ({type(error).__name__})") from None
        if not isinstance(document, dict):
            raise CacheDamagedError(self.directory, name, "not a JSON object")
        return document

    def _check_meta(self) -> None:
        meta = self.meta
        try:
            problem = None
            if meta.get("meta_checksum") != _meta_checksum(meta):
                problem = "its checksum does not match its content"
            elif meta["format_version"] != FORMAT_VERSION or meta["checksum"] != CHECKSUM:
                problem = f"format {meta['format_version']} / {meta['checksum']}"
            int(meta["num_samples"])
            expected = {*meta["checked_at_open"], *(f"fields/{n}.npy" for n in meta["fields"]),
                        *(f"attachments/{n}.npy" for n in meta["attachments"]), *_KEY_FILES}
            for relative in sorted(expected):
                entry = meta["files"][relative]
                if not isinstance(entry[CHECKSUM], str) or not isinstance(entry["bytes"], int):
                    raise TypeError(f"manifest entry of {relative}")
        except (KeyError, TypeError, ValueError) as error:
            problem = f"unexpected content ({type(error).__name__}: {error})"
        if problem:
            raise CacheDamagedError(self.directory, "meta.json", problem)

    def _check_size(self, relative: str, expected: int) -> None:
        try:
            size = (self.directory / relative).stat().st_size
        except FileNotFoundError:
            raise CacheDamagedError(self.directory, _describe_file(relative), f"{relative} is missing") from None
        if size != expected:
            raise CacheDamagedError(self.directory, _describe_file(relative),
                                    f"{relative} has {size:,} bytes, the manifest says {expected:,}")

    def _map(self, relative: str, dtype: np.dtype, shape: tuple[int, ...] | None) -> np.memmap:
        try:
            array = np.load(self.directory / relative, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise CacheDamagedError(self.directory, _describe_file(relative), f"unreadable ({error})") from None
        if array.dtype != np.dtype(dtype) or (shape is not None and array.shape != tuple(shape)):
            raise CacheDamagedError(
                self.directory,
                _describe_file(relative),
                f"{relative} is {array.dtype} {list(array.shape)}, expected {np.dtype(dtype)} "
                f"{list(shape) if shape is not None else '[...]'}",
            )
        return array

    def _check_checksum(self, relative: str) -> None:
        if relative in self._verified:
            return
        expected = self.meta["files"][relative][CHECKSUM]
        try:
            actual = file_checksum(self.directory / relative)
        except OSError as error:
            raise CacheDamagedError(self.directory, _describe_file(relative), f"unreadable ({error})") from None
        if actual != expected:
            raise CacheDamagedError(self.directory, _describe_file(relative), f"{relative} fails its checksum")
        self._verified.add(relative)

    def verified(self, name: str) -> np.ndarray:
        """Field ``name`` (memory-mapped) after a full checksum of its file (once per object; streamed)."""
        if name not in self._arrays:
            raise KeyError(f"unknown field {name!r}; this cache holds {sorted(self._arrays)}")
        self._check_checksum(f"fields/{name}.npy")
        return self._arrays[name]

    def verify(self) -> None:
        """Check the checksum of every file of the manifest (reads the whole cache); CacheDamagedError."""
        for relative in self.meta["files"]:
            self._check_checksum(relative)

    # ---------------------------------------------------------------- reading

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """Field name -> read-only np.memmap [N, ...]; indexing reads only the pages it touches (+ OS read-ahead)."""
        return self._arrays

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._arrays)

    @property
    def content_digests(self) -> np.ndarray:
        """uint8 [N, 16] memory-mapped: blake2b-16 of each row's content id."""
        return self._content

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
        in_range = (rows >= 0) & (rows < n)  # a damaged index must not make us read outside the key blob
        rows = np.where(in_range, rows, 0)
        candidate = (position < n) & (np.asarray(self._index_hash[clipped]) == query_hash) & in_range

        # Verify the stored key bytes of every candidate row (vectorised over all queries).
        query_len = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        starts = np.asarray(self._offsets[rows], dtype=np.int64)
        stored_len = np.asarray(self._offsets[rows + 1], dtype=np.int64) - starts
        verified = candidate & (stored_len == query_len) & (starts >= 0) & (starts + stored_len <= len(self._blob))
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
        n = len(self._index_hash)
        while position < n and self._index_hash[position] == key_hash:
            row = int(self._index_row[position])
            if 0 <= row < n and self._blob[int(self._offsets[row]) : int(self._offsets[row + 1])].tobytes() == key:
                return row
            position += 1
        return -1


def _miss_message(directory: Path) -> str:
    partial = directory.with_name(directory.name + PARTIAL_SUFFIX)
    state = f" (a partial build is in {partial})" if partial.is_dir() else ""
    return f"no prediction cache for this identity at {directory}{state}"


# --------------------------------------------------------------------------------------------------
# Write side: files


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    import io

    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # header over 64 KiB: only for absurd shapes
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


class _NpyWriter:
    """Writes one .npy file sequentially with ordinary writes (no memory map: a full disk is an ENOSPC,
    never a SIGBUS), checksumming the bytes on the way; ``close()`` fsyncs and returns its manifest entry."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(int(d) for d in shape)
        self.rows = 0
        self._hasher = xxhash.xxh3_128()
        self._handle = open(path, "xb")  # noqa: SIM115 - closed in close()
        self._put(_npy_header(self.dtype, self.shape))

    @staticmethod
    def nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
        return len(_npy_header(dtype, shape)) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

    def _put(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._hasher.update(data)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.shape[1:]}")
        if rows.size:
            self._put(memoryview(rows.reshape(-1).view(np.uint8)))
        self.rows += len(rows)

    def close(self) -> dict[str, Any]:
        if self.rows != (self.shape[0] if self.shape else 1):
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows of {self.shape[0]}")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return {"bytes": self.path.stat().st_size, CHECKSUM: self._hasher.hexdigest()}

    def abort(self) -> None:
        """Close without caring for the unwritten buffer (the file is being discarded; a full disk would make
        the flush fail again)."""
        with contextlib.suppress(OSError):
            self._handle.close()


def _write_whole_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    array = np.asarray(array)
    writer = _NpyWriter(path, array.dtype, array.shape)
    try:
        if array.ndim == 0:
            writer._put(memoryview(np.ascontiguousarray(array).reshape(1).view(np.uint8)))
            writer.rows = 1
        else:
            writer.write(array)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _save_small_npy(path: Path, array: np.ndarray) -> None:
    """An atomic .npy write for the partial directory's bookkeeping arrays."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


# --------------------------------------------------------------------------------------------------
# Write side: shards


@dataclass(frozen=True)
class _FieldSpec:
    dtype: str  # numpy dtype string, e.g. "<f2"
    shape: tuple[int, ...]  # per-sample shape (all dims but the first)

    def describe(self) -> str:
        return f"{np.dtype(self.dtype).name} {list(self.shape)}"

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


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


def _check_same_fields(expected: Mapping[str, _FieldSpec], actual: Mapping[str, _FieldSpec], where: str,
                       earlier: str = "earlier shards") -> None:
    if set(expected) != set(actual):
        raise ValueError(f"inconsistent fields: {where} has {sorted(actual)}, {earlier} have {sorted(expected)}")
    for name, spec in expected.items():
        if actual[name] != spec:
            raise ValueError(
                f"inconsistent field {name!r}: {where} has {actual[name].describe()}, "
                f"{earlier} have {spec.describe()}"
            )


def _write_shard(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one shard atomically (temp file, fsync, rename; the temp file is removed on failure)."""
    with atomic_write(path, "wb") as handle:
        # Prefixed member names: a field called "file" must not clash with np.savez's own arguments.
        np.savez(handle, **{_SHARD_MEMBER_PREFIX + name: array for name, array in arrays.items()})


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as shard:
        return {member.removeprefix(_SHARD_MEMBER_PREFIX): shard[member] for member in shard.files}


def _shard_bounds(shard: int, shard_size: int, num_rows: int) -> tuple[int, int]:
    start = shard * shard_size
    return start, min(start + shard_size, num_rows)


def _aligned_shard_size(shard_size: int, batch_size: int) -> int:
    """``shard_size`` rounded up to a whole number of batches."""
    return -(-shard_size // batch_size) * batch_size


# --------------------------------------------------------------------------------------------------
# Write side: planning (which rows are reused from which cache)


@dataclass
class _Plan:
    num_samples: int
    shard_size: int
    batch_size: int
    sources: np.ndarray  # int64 [N, 2]: (lending cache index or -1, its row or -1)
    donor_names: list[str]

    @property
    def compute_rows(self) -> np.ndarray:
        return np.flatnonzero(self.sources[:, 0] < 0)

    @property
    def num_shards(self) -> int:
        return -(-len(self.compute_rows) // self.shard_size)


def _complete_caches(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if _NAME.match(child.name) and child.is_dir():
            yield child


def _read_identity_quietly(directory: Path) -> dict[str, Any] | None:
    try:
        document = json.loads((directory / "identity.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _open_quietly(directory: Path, what: str) -> PredictionCache | None:
    """A cache of the family to lend rows from, or None (with a warning) if it is gone or damaged."""
    fd = None
    try:
        fd = _take_use_lock(directory.parent, directory.name, exclusive=False)
        if not directory.is_dir():
            raise CacheMiss(f"{directory} is gone")
        return PredictionCache(directory, use_lock_fd=fd)
    except (CacheDamagedError, CacheMiss) as error:
        if fd is not None:
            os.close(fd)
        logger.warning("not reusing rows from %s (%s): %s", directory, what, error)
        return None


def _find_donors(
    root: Path, own_name: str, family_hex: str, key_table: _KeyTable, retry_field: str | None
) -> tuple[np.ndarray, list[PredictionCache]]:
    """For every row, the newest complete cache of the family that holds the same (key, content id), fully
    verified; rows whose ``retry_field`` is 0 there are not taken. Returns (sources [N, 2], donors)."""
    candidates = []
    for directory in _complete_caches(root):
        document = _read_identity_quietly(directory)
        if directory.name == own_name or not document or document.get("family_digest") != family_hex:
            continue
        if document.get("format_version") != FORMAT_VERSION:
            continue
        candidates.append((directory.stat().st_mtime, directory))
    sources = np.full((key_table.num_samples, 2), -1, dtype=np.int64)
    donors: list[PredictionCache] = []
    specs: dict[str, _FieldSpec] | None = None
    for _, directory in sorted(candidates, key=lambda item: -item[0]):
        missing = np.flatnonzero(sources[:, 0] < 0)
        if not len(missing):
            break
        donor = _open_quietly(directory, "a cache of the same teacher")
        if donor is None:
            continue
        rows = donor._find([key_table.keys[i] for i in missing])
        found = rows >= 0
        take = np.zeros(len(missing), dtype=bool)
        take[found] = (np.asarray(donor.content_digests[rows[found]]) == key_table.content[missing[found]]).all(1)
        if retry_field is not None and retry_field in donor.arrays and take.any():
            take[take] = np.asarray(donor.arrays[retry_field][rows[take]]) != 0
        if not take.any():
            continue
        if specs is not None and _specs_of(donor.arrays) != specs:
            logger.warning("not reusing rows from %s: its fields differ from %s", directory, donors[0].directory)
            continue
        try:
            donor.verify()
        except CacheDamagedError as error:
            logger.warning("not reusing rows from %s: %s", directory, error)
            continue
        specs = _specs_of(donor.arrays)
        sources[missing[take], 0] = len(donors)
        sources[missing[take], 1] = rows[take]
        donors.append(donor)
    return sources, donors


def _plan_document(plan: _Plan, key_table: _KeyTable, donors: Sequence[PredictionCache]) -> dict[str, Any]:
    return {
        "num_samples": plan.num_samples,
        "keys_sha256": key_table.sha256,
        "content_sha256": key_table.content_sha256,
        "shard_size": plan.shard_size,
        "batch_size": plan.batch_size,
        "donors": [{"name": d.directory.name, "digest": d.digest} for d in donors],
        "num_compute": int((plan.sources[:, 0] < 0).sum()),
        "sources_sha256": hashlib.sha256(plan.sources.astype("<i8").tobytes()).hexdigest(),
    }


def _load_plan(build_dir: Path, key_table: _KeyTable) -> tuple[_Plan, dict[str, Any]]:
    """The plan of a partial build; ValueError for another key list; CacheMiss if it is unreadable."""
    try:
        document = json.loads((build_dir / "plan.json").read_text(encoding="utf-8"))
        sources = np.load(build_dir / "sources.npy", allow_pickle=False)
        plan = _Plan(int(document["num_samples"]), int(document["shard_size"]), int(document["batch_size"]),
                     sources, [d["name"] for d in document["donors"]])
        intact = hashlib.sha256(sources.astype("<i8").tobytes()).hexdigest() == document["sources_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheMiss(f"the plan of {build_dir} is unreadable ({error})") from None
    if document["keys_sha256"] != key_table.sha256 or plan.num_samples != key_table.num_samples:
        raise ValueError(
            f"the partial build in {build_dir} is for a different key list ({plan.num_samples} keys) "
            f"than the {key_table.num_samples} keys given, under the same identity. The identity must "
            "include the dataset/split fingerprint; fix it or delete the partial directory."
        )
    if document.get("content_sha256") != key_table.content_sha256 or not intact or sources.shape != (
        plan.num_samples, 2
    ):
        raise CacheMiss(f"the plan of {build_dir} is for other content ids or is damaged")
    return plan, document


def _prepare_build_dir(
    root: Path, build_dir: Path, final_name: str, identity_doc: Mapping[str, Any], key_table: _KeyTable,
    shard_size: int, batch_size: int, retry_field: str | None, reuse: bool,
) -> None:
    """Process 0, holding the build lock: keep a resumable partial build, or plan a new one."""
    if (build_dir / "plan.json").is_file():
        try:
            plan, document = _load_plan(build_dir, key_table)
            donors_ok = all(
                (_read_identity_quietly(root / d["name"]) or {}).get("digest") == d["digest"]
                for d in document["donors"]
            )
            if donors_ok:
                if plan.shard_size != _aligned_shard_size(shard_size, batch_size):
                    logger.warning(
                        "resuming %s with its original shard size %d (asked for %d; the result is the same)",
                        build_dir, plan.shard_size, shard_size,
                    )
                if plan.batch_size != batch_size:
                    raise ValueError(f"{build_dir} was planned with batch size {plan.batch_size}, not {batch_size}; "
                                     "the batch size must be part of the identity")
                return
            logger.warning("a cache that %s reuses rows from is gone; planning the build again", build_dir)
        except CacheMiss as error:
            logger.warning("%s; starting that build again", error)
        _remove_build_dir(build_dir)
    elif build_dir.exists():
        _remove_build_dir(build_dir)  # killed before its plan was written: nothing to keep
    family_hex = identity_doc.get("family_digest")
    if reuse and family_hex:
        sources, donors = _find_donors(root, final_name, family_hex, key_table, retry_field)
    else:
        sources, donors = np.full((key_table.num_samples, 2), -1, dtype=np.int64), []
    plan = _Plan(key_table.num_samples, _aligned_shard_size(shard_size, batch_size), batch_size, sources,
                 [d.directory.name for d in donors])
    (build_dir / "shards").mkdir(parents=True, exist_ok=True)
    with atomic_write(build_dir / "identity.json", "wb") as handle:
        handle.write(_pretty_json(identity_doc))
    _save_small_npy(build_dir / "sources.npy", sources)
    with atomic_write(build_dir / "plan.json", "wb") as handle:  # last: a plan.json means a complete plan
        handle.write(_pretty_json(_plan_document(plan, key_table, donors)))
    reused = key_table.num_samples - len(plan.compute_rows)
    if reused:
        logger.info("reusing %d of %d predictions from %d cache(s) of the same teacher: %s", reused,
                    key_table.num_samples, len(donors), ", ".join(d.directory.name for d in donors))


# --------------------------------------------------------------------------------------------------
# Write side: merge


class _ShardRows:
    """Rows of the computed shards by compute position; keeps the last shard read in memory."""

    def __init__(self, shard_dir: Path, plan: _Plan, specs: Mapping[str, _FieldSpec]) -> None:
        self.shard_dir, self.plan, self.specs = shard_dir, plan, specs
        self.num_compute = len(plan.compute_rows)
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def shard(self, index: int) -> dict[str, np.ndarray]:
        if self._cached is None or self._cached[0] != index:
            path = self.shard_dir / _SHARD_NAME.format(index)
            try:
                arrays = _read_shard(path)
            except (OSError, ValueError, EOFError) as error:
                path.unlink(missing_ok=True)
                raise UserError(f"shard {path} of a partial build was unreadable ({error}) and has been removed; "
                                "run the same command again to compute it again") from None
            _check_same_fields(self.specs, _specs_of(arrays), f"shard {path.name}")
            start, stop = _shard_bounds(index, self.plan.shard_size, self.num_compute)
            for name, array in arrays.items():
                if array.shape[0] != stop - start:
                    path.unlink(missing_ok=True)
                    raise UserError(f"shard {path} of a partial build held {array.shape[0]} rows of {name!r}, "
                                    f"not {stop - start}; it has been removed: run the same command again")
            self._cached = (index, arrays)
        return self._cached[1]

    def rows(self, name: str, positions: np.ndarray) -> np.ndarray:
        """Values of field ``name`` at ascending compute ``positions``."""
        out = np.empty((len(positions), *self.specs[name].shape), dtype=np.dtype(self.specs[name].dtype))
        shard_of = positions // self.plan.shard_size
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            out[chosen] = self.shard(int(shard))[name][positions[chosen] - int(shard) * self.plan.shard_size]
        return out


def _resolve_attachments(
    attachments: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None, donors: Sequence[PredictionCache]
) -> dict[str, np.ndarray]:
    """The attachments to store: given ones, else (a callable) those of a lending cache of the same family
    when it has any (they follow from the family), else the callable's."""
    if callable(attachments):
        if donors and donors[0].attachments:
            attachments = {name: np.array(array) for name, array in donors[0].attachments.items()}
        else:
            attachments = attachments()
    checked = {}
    for name, value in (attachments or {}).items():
        if not isinstance(name, str) or not _FIELD_NAME.match(name):
            raise ValueError(f"attachment name {name!r} must match {_FIELD_NAME.pattern}")
        array = np.array(value, order="C")  # (np.ascontiguousarray would turn a scalar into shape [1])
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"attachment {name!r} has dtype {array.dtype}; only numeric arrays can be cached")
        checked[name] = array
    return checked


def _merge(
    root: Path,
    build_dir: Path,
    final_dir: Path,
    key_table: _KeyTable,
    identity_doc: Mapping[str, Any],
    attachments: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None,
    build_info: dict[str, Any],
    progress: bool,
) -> None:
    """Merge the reused rows and the computed shards into a new directory, renamed to ``final_dir``."""
    for stale in build_dir.glob("merge-*"):
        shutil.rmtree(stale, ignore_errors=True)
    plan, document = _load_plan(build_dir, key_table)
    shard_dir = build_dir / "shards"
    missing = [i for i in range(plan.num_shards) if not (shard_dir / _SHARD_NAME.format(i)).is_file()]
    if missing:
        raise RuntimeError(
            f"cannot merge {build_dir}: shards {missing[:10]}{'...' if len(missing) > 10 else ''} are missing; "
            "did every process run build_cache and does wait_for_everyone really wait for all of them?"
        )
    donors = []
    for entry in document["donors"]:
        donor = _open_quietly(root / entry["name"], "lent rows to this build")
        if donor is None or donor.digest != entry["digest"]:
            _remove_build_dir(build_dir)
            raise UserError(f"the prediction cache {root / entry['name']} was deleted or damaged while {final_dir} "
                            "was being built from it; run the same command again (the build starts over)")
        donors.append(donor)

    specs: dict[str, _FieldSpec] | None = None
    if plan.num_shards:
        specs = _specs_of(_read_shard(shard_dir / _SHARD_NAME.format(0)))
    for donor in donors:
        if specs is None:
            specs = _specs_of(donor.arrays)
        _check_same_fields(specs, _specs_of(donor.arrays), f"the cache {donor.directory} that lends rows",
                           earlier="the computed shards")
    assert specs is not None  # every row is either computed or reused
    attachment_arrays = _resolve_attachments(attachments, donors)

    n = plan.num_samples
    field_shapes = {name: (n, *spec.shape) for name, spec in sorted(specs.items())}
    needed = FREE_SPACE_SLACK_BYTES + sum(
        _NpyWriter.nbytes(np.dtype(specs[name].dtype), shape) for name, shape in field_shapes.items()
    ) + sum(a.nbytes for a in (key_table.offsets, key_table.blob, key_table.index_hash, key_table.index_row,
                                 key_table.content)) + sum(a.nbytes for a in attachment_arrays.values())
    free = shutil.disk_usage(build_dir).free
    if free < needed:
        raise DiskFullError(final_dir, needed)

    merge_dir = build_dir / f"merge-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writers: list[_NpyWriter] = []
    try:
        (merge_dir / "fields").mkdir(parents=True)
        files: dict[str, dict[str, Any]] = {}
        writers = [_NpyWriter(merge_dir / "fields" / f"{name}.npy", np.dtype(specs[name].dtype), shape)
                   for name, shape in field_shapes.items()]
        compute_position = np.full(n, -1, dtype=np.int64)
        compute_position[plan.compute_rows] = np.arange(len(plan.compute_rows))
        shard_rows = _ShardRows(shard_dir, plan, specs)
        row_bytes = max(1, sum(spec.row_bytes for spec in specs.values()))
        chunk = max(1, MERGE_CHUNK_BYTES // row_bytes)
        for start in tqdm(range(0, n, chunk), desc="merging prediction cache", unit="chunk", disable=not progress):
            stop = min(start + chunk, n)
            donor_of, donor_row = plan.sources[start:stop, 0], plan.sources[start:stop, 1]
            computed = donor_of < 0
            for writer, name in zip(writers, field_shapes, strict=True):
                out = np.empty((stop - start, *specs[name].shape), dtype=np.dtype(specs[name].dtype))
                for index, donor in enumerate(donors):
                    lent = donor_of == index
                    if lent.any():
                        out[lent] = donor.arrays[name][donor_row[lent]]
                if computed.any():
                    out[computed] = shard_rows.rows(name, compute_position[start:stop][computed])
                writer.write(out)
        for writer, name in zip(writers, field_shapes, strict=True):
            files[f"fields/{name}.npy"] = writer.close()
        writers = []
        for relative, array in (
            ("keys_offsets.npy", key_table.offsets.astype("<i8")),
            ("keys_blob.npy", key_table.blob),
            ("index_hash.npy", key_table.index_hash.astype("<u8")),
            ("index_row.npy", key_table.index_row.astype("<i8")),
            ("content_digest.npy", key_table.content),
        ):
            files[relative] = _write_whole_npy(merge_dir / relative, array)
        if attachment_arrays:
            (merge_dir / "attachments").mkdir()
            for name, array in sorted(attachment_arrays.items()):
                files[f"attachments/{name}.npy"] = _write_whole_npy(merge_dir / "attachments" / f"{name}.npy", array)
            fsync_directory(merge_dir / "attachments")
        fsync_directory(merge_dir / "fields")
        small = [f"fields/{name}.npy" for name, spec in sorted(specs.items())
                 if spec.row_bytes <= OPEN_CHECK_MAX_ROW_BYTES]
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "num_samples": n,
            "keys_sha256": key_table.sha256,
            "content_sha256": key_table.content_sha256,
            "fields": {name: {"dtype": spec.dtype, "shape": list(spec.shape)} for name, spec in sorted(specs.items())},
            "attachments": {
                name: {"dtype": array.dtype.str, "shape": list(array.shape)}
                for name, array in sorted(attachment_arrays.items())
            },
            "checksum": CHECKSUM,
            "files": files,
            "checked_at_open": small + [f"attachments/{name}.npy" for name in sorted(attachment_arrays)],
        }
        meta["meta_checksum"] = _meta_checksum(meta)
        build_info.update(reused_samples=int(n - len(plan.compute_rows)), computed_samples=int(len(plan.compute_rows)),
                          reused_from=[d.directory.name for d in donors], shard_size=plan.shard_size,
                          batch_size=plan.batch_size)
        for name, document_bytes in (("meta.json", _pretty_json(meta)), ("build.json", _pretty_json(build_info)),
                                     ("identity.json", _pretty_json(identity_doc))):
            with atomic_write(merge_dir / name, "wb") as handle:
                handle.write(document_bytes)
        fsync_directory(merge_dir)
        os.rename(merge_dir, final_dir)
        fsync_directory(final_dir.parent)
    except BaseException as error:
        for writer in writers:
            writer.abort()
        shutil.rmtree(merge_dir, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFullError(final_dir, needed) from error
        raise


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
    if cache.meta["content_sha256"] != key_table.content_sha256:
        raise ValueError(
            f"the prediction cache at {cache.directory} was built for other content ids under the same identity. "
            "The identity must include the dataset/split fingerprint; fix it or delete the directory."
        )
    return cache


def _per_shard(compute: Callable[[np.ndarray], Mapping[str, np.ndarray]], progress: bool
               ) -> Callable[[Sequence[np.ndarray]], Iterator[Mapping[str, np.ndarray]]]:
    """Adapt a per-shard ``compute`` to the shard-stream form, with a per-sample progress bar."""

    def stream(shards: Sequence[np.ndarray]) -> Iterator[Mapping[str, np.ndarray]]:
        with tqdm(total=sum(len(s) for s in shards), desc="predicting", unit="img", disable=not progress) as bar:
            for indices in shards:
                yield compute(indices)
                bar.update(len(indices))

    return stream


def build_cache(
    root: Path | str,
    identity: Mapping[str, Any],
    keys: Sequence[str],
    compute: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None,
    *,
    shard_size: int,
    compute_shards: Callable[[Sequence[np.ndarray]], Iterable[Mapping[str, np.ndarray]]] | None = None,
    batch_size: int = 1,
    content_ids: Sequence[str] | None = None,
    family: Mapping[str, Any] | None = None,
    retry_field: str | None = None,
    reuse: bool = True,
    rebuild: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] = _no_barrier,
    progress: bool = True,
    attachments: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
) -> PredictionCache:
    """Build (or resume, or just open) the prediction cache of ``identity`` under ``root``.

    keys:       unique sample keys; row i of the cache holds keys[i] (pass the dataset's own order).
                Every process must pass the same keys in the same order.
    compute:    int64 [n] sample indices of one shard -> {field: array [n, ...]} (numpy, numeric);
                called once per shard, so the caller batches inside it. Must return the same fields,
                dtypes and per-sample shapes for every shard.
    compute_shards: instead of ``compute``: takes this process's list of shards (int64 index arrays) and
                yields one such mapping per shard, in order (one DataLoader can then serve every shard).
    shard_size: samples per shard (the unit of resumption and of the split across processes), rounded up
                to a multiple of ``batch_size``. A resumed build keeps its first shard size.
    batch_size: the caller's batch size; shards start on multiples of it, so batch boundaries (and so the
                result) do not depend on the shard size. Results may still depend on the batch size: put
                it in the identity.
    content_ids: one string per key saying what its content is (file size + mtime, a hash...); a row is
                reused from another cache only when both key and content id match. None: all "".
    family:     the part of ``identity`` that fixes what compute returns for one sample (every item of it
                must also be in ``identity``). Complete caches of the same family under ``root`` lend their
                rows for the same (key, content id) (unless ``reuse`` is False); None: no reuse.
    retry_field: a field whose 0 rows are never reused (e.g. "valid": undecodable images are tried again).
    rebuild:    delete this identity's complete or partial cache first and compute every row.
    attachments: whole-cache arrays stored next to the fields (name -> numeric array of any shape), read
                back as ``cache.attachments``; a mapping, or a callable returning one, called only when no
                cache of the family lends them (they must follow from the family).
    process_index, num_processes, wait_for_everyone: for multi-process builds (e.g. from Accelerate:
                ``accelerator.process_index``, ``accelerator.num_processes``,
                ``accelerator.wait_for_everyone``). Shard i is computed by process i % num_processes;
                process 0 plans, merges and holds the build lock. Every process must call build_cache.

    A complete cache is returned at once. Otherwise finished shards are kept, missing ones computed,
    and everything merged; an interrupted build resumes where it stopped and ends byte-for-byte equal
    to an uninterrupted one (build.json aside). Another process building the same identity is waited
    for. Returns the opened cache on every process.
    """
    if (compute is None) == (compute_shards is None):
        raise ValueError("pass exactly one of compute and compute_shards")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"need 0 <= process_index < num_processes, got {process_index} and {num_processes}")
    if num_processes > 1 and wait_for_everyone is _no_barrier:
        raise ValueError(
            "a build with num_processes > 1 needs a real barrier: pass wait_for_everyone "
            "(e.g. accelerator.wait_for_everyone)"
        )
    if family is not None and any(identity.get(k, object()) != v for k, v in family.items()):
        raise ValueError("every item of family must also be in identity (the family is part of the identity)")
    root = Path(root)
    final_dir = cache_directory(root, identity)
    build_dir = final_dir.with_name(final_dir.name + PARTIAL_SUFFIX)
    identity_doc = _identity_document(identity, family)
    key_table = _KeyTable.from_keys(keys, content_ids)
    is_main = process_index == 0
    stream = compute_shards if compute_shards is not None else _per_shard(compute, progress and is_main)

    lock: _BuildLock | None = None
    try:
        if is_main and (rebuild or not final_dir.is_dir()):
            root.mkdir(parents=True, exist_ok=True)
            lock = _BuildLock(root, final_dir.name).acquire()
            if rebuild:
                _delete_locked(final_dir)
                _remove_build_dir(build_dir)
            if not final_dir.is_dir():  # (another process may have finished it while we waited)
                _prepare_build_dir(root, build_dir, final_dir.name, identity_doc, key_table, shard_size, batch_size,
                                   retry_field, reuse and not rebuild)
        wait_for_everyone()
        if final_dir.is_dir():
            cache = _check_complete_cache(PredictionCache.open(root, identity), key_table)
            if is_main and build_dir.exists():  # left over by a build killed after its final rename
                cleaner = lock if lock is not None else _BuildLock(root, final_dir.name)
                if cleaner is lock or cleaner.try_acquire():
                    _remove_build_dir(build_dir)
                    if cleaner is not lock:
                        cleaner.release()
            return cache

        plan, _ = _load_plan(build_dir, key_table)
        compute_rows = plan.compute_rows
        shard_dir = build_dir / "shards"
        mine = range(process_index, plan.num_shards, num_processes)
        todo = [s for s in mine if not (shard_dir / _SHARD_NAME.format(s)).is_file()]
        if is_main:
            logger.info(
                "building prediction cache %s: %d samples, %d reused, %d to compute in %d shards of %d; "
                "%d of this process's %d shards done",
                final_dir, plan.num_samples, plan.num_samples - len(compute_rows), len(compute_rows),
                plan.num_shards, plan.shard_size, len(mine) - len(todo), len(mine),
            )
        started = time.time()
        if todo:
            bounds = [_shard_bounds(s, plan.shard_size, len(compute_rows)) for s in todo]
            specs: dict[str, _FieldSpec] | None = None
            outputs = iter(stream([compute_rows[a:b] for a, b in bounds]))
            for shard, (start, stop) in zip(todo, bounds, strict=True):
                where = f"shard {shard}, samples {compute_rows[start]}..{compute_rows[stop - 1]}"
                output = next(outputs, None)
                if output is None:
                    raise ValueError(f"compute_shards yielded fewer results than the {len(todo)} shards it was given")
                arrays = _validate_compute_output(output, stop - start, where)
                if specs is None:
                    specs = _specs_of(arrays)
                else:
                    _check_same_fields(specs, _specs_of(arrays), where)
                _write_shard(shard_dir / _SHARD_NAME.format(shard), arrays)
            if next(outputs, None) is not None:  # (also lets the stream finish: close its bars, log its summary)
                raise ValueError(f"compute_shards yielded more results than the {len(todo)} shards it was given")

        wait_for_everyone()
        if is_main:
            if not final_dir.is_dir():
                logger.info("merging into %s", final_dir)
                info = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "built_at_unix": round(time.time(), 3),
                        "compute_seconds": round(time.time() - started, 3), "num_processes": num_processes,
                        "rebuild": rebuild}
                _merge(root, build_dir, final_dir, key_table, identity_doc, attachments, info, progress)
            _remove_build_dir(build_dir)
            logger.info("prediction cache ready: %s", final_dir)
        wait_for_everyone()
        return PredictionCache.open(root, identity)
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------------------------------
# Maintenance: list, delete, prune, verify


def _delete_locked(directory: Path) -> bool:
    """Delete a complete cache unless some process has it open (CacheInUseError); the caller holds, or does
    not need, its build lock. Renamed away first, so it vanishes atomically. Returns whether it existed."""
    if not directory.exists():
        return False
    root, name = directory.parent, directory.name
    try:
        fd = _take_use_lock(root, name, exclusive=True)
    except BlockingIOError:
        raise CacheInUseError(
            f"prediction cache {directory} is in use by another process (a run reading it); stop that run or "
            "wait for it to finish, then try again"
        ) from None
    try:
        trash = directory.with_name(f"{name}{TRASH_MARK}{uuid.uuid4().hex[:8]}")
        os.rename(directory, trash)
        fsync_directory(root)
    finally:
        if fd is not None:
            os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def delete_cache(directory: Path | str) -> None:
    """Delete one complete cache or partial build directory; CacheInUseError if a process reads it or is
    building it."""
    directory = Path(directory)
    name = directory.name.removesuffix(PARTIAL_SUFFIX)
    lock = _BuildLock(directory.parent, name)
    if not lock.try_acquire():
        raise CacheInUseError(f"prediction cache {directory.parent / name} is being built by another process; "
                              "wait for it to finish")
    try:
        if directory.name.endswith(PARTIAL_SUFFIX):
            _remove_build_dir(directory)
        else:
            _delete_locked(directory)
    finally:
        lock.release()


def _tree_bytes(directory: Path) -> int:
    total = 0
    for base, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class CacheEntry:
    """One directory under a cache root, as ``zsa cache --list`` shows it.

    state: "complete", "partial" (a build: running or stopped), "damaged" (see ``problem``), "old-format"
           (written by an older version: never read, rebuilt on demand) or "leftover" (a half-deleted
           directory).
    """

    directory: Path
    state: str
    identity: dict[str, Any] = field(default_factory=dict)
    family_digest: str | None = None
    num_samples: int | None = None
    done_samples: int | None = None  # partial builds: reused + computed so far
    bytes: int = 0
    built_at: float | None = None
    last_used: float | None = None
    running: bool = False  # a partial build whose builder is alive
    in_use: bool = False  # a complete cache some process has open
    problem: str | None = None


def list_caches(root: Path | str) -> list[CacheEntry]:
    """Every cache, partial build and leftover directory under ``root`` (cheap checks only)."""
    root = Path(root)
    entries: list[CacheEntry] = []
    if not root.is_dir():
        return entries
    for child in sorted(root.iterdir()):
        if not child.is_dir() or not _OURS.match(child.name):  # (never touch what we did not write)
            continue
        entry = CacheEntry(child, "leftover", bytes=_tree_bytes(child))
        document = _read_identity_quietly(child) or {}
        entry.identity = document.get("identity") if isinstance(document.get("identity"), dict) else {}
        entry.family_digest = document.get("family_digest")
        if _NAME.match(child.name):
            entry.last_used = child.stat().st_mtime
            if document.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
                entry.state = "old-format"
                entry.problem = f"format {document.get('format_version')}, this version reads {FORMAT_VERSION}"
            else:
                try:
                    cache = PredictionCache(child)
                    entry.state, entry.num_samples = "complete", len(cache)
                    del cache
                except CacheDamagedError as error:
                    entry.state, entry.problem = "damaged", str(error)
                entry.in_use = _cache_in_use(root, child.name)
            try:
                build = json.loads((child / "build.json").read_text(encoding="utf-8"))
                entry.built_at = float(build["built_at_unix"])
            except (OSError, ValueError, KeyError, TypeError):
                entry.built_at = None
        elif child.name.endswith(PARTIAL_SUFFIX) and _NAME.match(child.name.removesuffix(PARTIAL_SUFFIX)):
            entry.state = "partial"
            entry.running = _build_running(root, child.name.removesuffix(PARTIAL_SUFFIX))
            entry.last_used = child.stat().st_mtime
            try:
                plan = json.loads((child / "plan.json").read_text(encoding="utf-8"))
                shards = len(list((child / "shards").glob("shard-*.npz")))
                entry.num_samples = int(plan["num_samples"])
                computed = min(plan["num_compute"], shards * plan["shard_size"])
                entry.done_samples = entry.num_samples - plan["num_compute"] + computed
            except (OSError, ValueError, KeyError, TypeError):
                pass
        entries.append(entry)
    return entries


def verify_cache(directory: Path | str) -> PredictionCache:
    """Open ``directory`` and check the checksum of every file; CacheDamagedError on any damage."""
    cache = PredictionCache(directory)
    cache.verify()
    return cache


def _age_key(entry: CacheEntry) -> float:
    return entry.built_at if entry.built_at is not None else (entry.last_used or 0.0)


def select_superseded(entries: Sequence[CacheEntry], lineage: Callable[[Mapping[str, Any]], Any]) -> list[CacheEntry]:
    """Complete caches for which a newer complete cache of the same family and the same ``lineage(identity)``
    (e.g. dataset and split) exists, and caches of an older format (never read by this version)."""
    newest: dict[tuple[Any, Any], CacheEntry] = {}
    for entry in entries:
        if entry.state == "complete" and entry.family_digest:
            slot = (entry.family_digest, json.dumps(lineage(entry.identity), sort_keys=True, default=str))
            if slot not in newest or _age_key(entry) > _age_key(newest[slot]):
                newest[slot] = entry
    keep = {id(entry) for entry in newest.values()}
    return [e for e in entries if e.state == "old-format"
            or (e.state == "complete" and e.family_digest and id(e) not in keep)]


def select_older_than(entries: Sequence[CacheEntry], seconds: float, now: float | None = None) -> list[CacheEntry]:
    """Complete, damaged or old-format caches not used (opened or built) for ``seconds``."""
    cutoff = (time.time() if now is None else now) - seconds
    return [e for e in entries if e.state in ("complete", "damaged", "old-format")
            and e.last_used is not None and e.last_used < cutoff]


def prune_caches(
    root: Path | str, selected: Sequence[CacheEntry] = (), *, dry_run: bool = False
) -> list[tuple[CacheEntry, str]]:
    """Remove the partial builds whose builder is gone, half-deleted leftovers, and the ``selected`` caches,
    never one that a process has open or is building. Returns (entry, "removed" | "would remove" | why kept)."""
    chosen = {entry.directory for entry in selected}
    outcomes = []
    for entry in list_caches(root):
        if entry.state == "partial" and entry.running:
            outcomes.append((entry, "kept: a build is running"))
            continue
        if entry.state not in ("partial", "leftover") and entry.directory not in chosen:
            continue
        if dry_run:
            outcomes.append((entry, "would remove"))
            continue
        try:
            if entry.state == "leftover":
                shutil.rmtree(entry.directory)
            else:
                delete_cache(entry.directory)
            outcomes.append((entry, "removed"))
        except CacheInUseError:
            outcomes.append((entry, "kept: in use by another process"))
    return outcomes
