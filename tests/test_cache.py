"""The on-disk prediction cache: identity, resume and multi-process byte equality, lookups, memory-mapping."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_image

from zeroshot_adapt import cache as cache_module
from zeroshot_adapt.cache import (
    CacheDamagedError,
    CacheInUseError,
    CacheMiss,
    PredictionCache,
    build_cache,
    cache_directory,
    cache_identity_digest,
)
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.fileio import DiskFullError

NUM_CLASSES = 5
FEATURE_DIM = 3
NUM_SAMPLES = 23
SHARD_SIZE = 4  # -> 6 shards, the last one holding 3 samples
NUM_SHARDS = -(-NUM_SAMPLES // SHARD_SIZE)

IDENTITY = {
    "model": "ViT-B-32",
    "pretrained": "laion2b_s34b_b79k",
    "templates": ["a photo of a {}.", "a satellite photo of {}."],
    "class_names": ["annual crop", "forest", "river", "sea", "highway"],
    "dataset_fingerprint": "eurosat:train:4f9c2e",
    "preprocess": {"resize": 224, "crop": "center", "mean": [0.48, 0.46, 0.41]},
}
CHANGED_IDENTITY_VALUES = {
    "model": "ViT-L-14",
    "pretrained": "openai",
    "templates": ["a photo of a {}."],
    "class_names": ["annual crop", "forest", "river", "sea", "motorway"],
    "dataset_fingerprint": "eurosat:train:4f9c2f",
    "preprocess": {"resize": 256, "crop": "center", "mean": [0.48, 0.46, 0.41]},
}


def make_keys(n: int) -> list[str]:
    return [f"Class{i % 7}/Class{i % 7}_{i}.jpg" for i in range(n)]


def deterministic_compute(indices: np.ndarray) -> dict[str, np.ndarray]:
    """A fake teacher: every field is a fixed function of the sample index."""
    i = indices.astype(np.float64)[:, None]
    logits = np.sin(0.37 * i + np.arange(NUM_CLASSES)) * 10
    return {
        "logits": logits.astype(np.float16),
        "features": np.cos(0.11 * i + np.arange(FEATURE_DIM)).astype(np.float16),
        "confidence": (1.0 / (1.0 + indices)).astype(np.float32),
        "prediction": logits.argmax(axis=1).astype(np.int64),
    }


class Killed(Exception):
    """Stands in for the process being killed."""


class CountingCompute:
    """Records the shards it is asked for; raises Killed on call number `fail_on_call` (1-based)."""

    def __init__(self, fail_on_call: int | None = None, fn=deterministic_compute) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail_on_call = fail_on_call
        self.fn = fn

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise Killed(f"killed while computing samples {indices[0]}..{indices[-1]}")
        self.calls.append((int(indices[0]), int(indices[-1]) + 1))
        return self.fn(indices)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of a cache but build.json (when and how it was built)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "build.json"
    }


def entries(root: Path) -> list[str]:
    """The names under a cache root, lock files aside."""
    return sorted(p.name for p in root.iterdir() if p.name != cache_module.LOCKS_DIR)


def build(root: Path, compute=deterministic_compute, *, keys=None, identity=IDENTITY, **kwargs) -> PredictionCache:
    kwargs.setdefault("shard_size", SHARD_SIZE)
    return build_cache(
        root, identity, make_keys(NUM_SAMPLES) if keys is None else keys, compute, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """Every file of an uninterrupted single-process build."""
    root = tmp_path_factory.mktemp("reference")
    build(root)
    return tree_bytes(cache_directory(root, IDENTITY))


def assert_equals_reference(root: Path, reference: dict[str, bytes]) -> None:
    final = cache_directory(root, IDENTITY)
    assert entries(root) == [final.name], "leftover build files next to the cache"
    produced = tree_bytes(final)
    assert sorted(produced) == sorted(reference)
    for name, data in reference.items():
        assert produced[name] == data, f"{name} differs from the uninterrupted build"


# ---------------------------------------------------------------------------------------------- identity


def test_build_then_open_is_a_hit_with_the_computed_rows(tmp_path):
    built = build(tmp_path)
    opened = PredictionCache.open(tmp_path, IDENTITY)
    expected = deterministic_compute(np.arange(NUM_SAMPLES))
    assert len(opened) == NUM_SAMPLES
    assert list(opened.keys) == make_keys(NUM_SAMPLES)
    assert opened.keys[-1] == make_keys(NUM_SAMPLES)[-1] and opened.keys[2:4] == make_keys(NUM_SAMPLES)[2:4]
    assert opened.identity == IDENTITY and built.identity == IDENTITY
    assert set(opened.arrays) == set(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(opened.arrays[name], values)
        assert opened.arrays[name].dtype == values.dtype
    assert opened.meta["fields"]["logits"] == {"dtype": "<f2", "shape": [NUM_CLASSES]}

    again = CountingCompute()
    build(tmp_path, again)
    assert again.calls == [], "a complete cache must be returned without computing anything"


@pytest.mark.parametrize("field", sorted(IDENTITY))
def test_changing_any_identity_field_is_a_miss(tmp_path, field):
    build(tmp_path)
    changed = {**IDENTITY, field: CHANGED_IDENTITY_VALUES[field]}
    assert cache_identity_digest(changed) != cache_identity_digest(IDENTITY)
    with pytest.raises(CacheMiss):
        PredictionCache.open(tmp_path, changed)
    PredictionCache.open(tmp_path, IDENTITY)  # the original is still a hit


def test_format_version_is_part_of_the_identity(tmp_path, monkeypatch):
    build(tmp_path)
    digest_v1 = cache_identity_digest(IDENTITY)
    monkeypatch.setattr(cache_module, "FORMAT_VERSION", cache_module.FORMAT_VERSION + 1)
    assert cache_identity_digest(IDENTITY) != digest_v1
    with pytest.raises(CacheMiss):
        PredictionCache.open(tmp_path, IDENTITY)


def test_identity_digest_is_canonical_and_rejects_non_json():
    reordered = dict(reversed(list(IDENTITY.items())))
    assert cache_identity_digest(reordered) == cache_identity_digest(IDENTITY)
    as_tuple = {**IDENTITY, "templates": tuple(IDENTITY["templates"])}
    assert cache_identity_digest(as_tuple) == cache_identity_digest(IDENTITY)
    with pytest.raises(ValueError, match="JSON"):
        cache_identity_digest({**IDENTITY, "preprocess": object()})
    with pytest.raises(ValueError, match="JSON"):
        cache_identity_digest({**IDENTITY, "mean": float("nan")})


def test_identity_json_is_human_readable(tmp_path):
    cache = build(tmp_path)
    text = (cache.directory / "identity.json").read_text()
    assert '"dataset_fingerprint": "eurosat:train:4f9c2e"' in text
    assert f'"format_version": {cache_module.FORMAT_VERSION}' in text
    assert cache.directory.name == cache_identity_digest(IDENTITY)[:16]


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("finished_shards", [0, 1, 3, NUM_SHARDS - 1])
def test_resume_after_kill_between_shards(tmp_path, reference, finished_shards):
    with pytest.raises(Killed):
        build(tmp_path, CountingCompute(fail_on_call=finished_shards + 1))
    assert not cache_directory(tmp_path, IDENTITY).exists()
    with pytest.raises(CacheMiss, match="partial build"):
        PredictionCache.open(tmp_path, IDENTITY)

    resumed = CountingCompute()
    build(tmp_path, resumed)
    expected = [(s * SHARD_SIZE, min((s + 1) * SHARD_SIZE, NUM_SAMPLES)) for s in range(finished_shards, NUM_SHARDS)]
    assert resumed.calls == expected, "finished shards must not be recomputed"
    assert_equals_reference(tmp_path, reference)


def test_resume_after_kill_mid_shard_write(tmp_path, reference, monkeypatch):
    real_savez = np.savez
    writes = []

    def dies_halfway_through_third_shard(file, **arrays):
        writes.append(file)
        if len(writes) == 3:
            file.write(b"PK\x03\x04 the first bytes of a zip")
            raise Killed("killed mid-write")
        real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", dies_halfway_through_third_shard)
    with pytest.raises(Killed):
        build(tmp_path)
    monkeypatch.setattr(np, "savez", real_savez)
    shard_dir = cache_directory(tmp_path, IDENTITY).with_name(cache_directory(tmp_path, IDENTITY).name + ".partial")
    assert sorted(p.name for p in (shard_dir / "shards").glob("*.npz")) == ["shard-000000.npz", "shard-000001.npz"]

    resumed = CountingCompute()
    build(tmp_path, resumed)
    assert len(resumed.calls) == NUM_SHARDS - 2
    assert_equals_reference(tmp_path, reference)


@pytest.mark.parametrize("shards_read", [0, 2, NUM_SHARDS - 1])
def test_resume_after_kill_mid_merge(tmp_path, reference, monkeypatch, shards_read):
    real_shard = cache_module._ShardRows.shard
    reads = []

    def dies_midway(self, index):
        if len(reads) == shards_read:
            raise Killed("killed mid-merge")
        reads.append(index)
        return real_shard(self, index)

    monkeypatch.setattr(cache_module._ShardRows, "shard", dies_midway)
    with pytest.raises(Killed):
        build(tmp_path)
    monkeypatch.setattr(cache_module._ShardRows, "shard", real_shard)
    assert not cache_directory(tmp_path, IDENTITY).exists(), "a half-merged cache must never be visible"
    partial = cache_directory(tmp_path, IDENTITY).with_name(cache_directory(tmp_path, IDENTITY).name + ".partial")
    assert not list(partial.glob("merge-*")), "a failed merge removes its files"

    resumed = CountingCompute()
    build(tmp_path, resumed)
    assert resumed.calls == [], "all shards were finished; the resumed build only merges"
    assert_equals_reference(tmp_path, reference)


@pytest.mark.parametrize("step", ["fsync_directory", "_remove_build_dir"])
def test_resume_after_kill_around_the_final_rename(tmp_path, reference, monkeypatch, step):
    """Killed just before the rename (while syncing the merge dir) or just after it (before cleanup)."""

    def dies(path):
        if step == "_remove_build_dir" or Path(path).name.startswith("merge-"):
            raise Killed(f"killed in {step}")

    real = getattr(cache_module, step)
    monkeypatch.setattr(cache_module, step, lambda path: (dies(path), real(path))[1])
    with pytest.raises(Killed):
        build(tmp_path)
    monkeypatch.setattr(cache_module, step, real)

    resumed = CountingCompute()
    build(tmp_path, resumed)
    assert resumed.calls == []
    assert_equals_reference(tmp_path, reference)


def test_resume_keeps_the_original_shard_size(tmp_path, reference):
    with pytest.raises(Killed):
        build(tmp_path, CountingCompute(fail_on_call=3))
    resumed = CountingCompute()
    build(tmp_path, resumed, shard_size=7)
    assert resumed.calls == [(8, 12), (12, 16), (16, 20), (20, 23)]
    assert_equals_reference(tmp_path, reference)


def test_result_does_not_depend_on_the_shard_size(tmp_path, reference):
    build(tmp_path, shard_size=NUM_SAMPLES + 5)
    assert_equals_reference(tmp_path, reference)


# ---------------------------------------------------------------------------------------------- multi-process


class FileBarrier:
    """A barrier for processes sharing a directory: each arrival touches a file, then waits for all."""

    def __init__(self, directory: Path, rank: int, world_size: int, timeout_s: float = 60.0) -> None:
        self.directory, self.rank, self.world_size, self.timeout_s = Path(directory), rank, world_size, timeout_s
        self.generation = 0

    def __call__(self) -> None:
        self.generation += 1
        (self.directory / f"{self.generation}-{self.rank}").touch()
        deadline = time.monotonic() + self.timeout_s
        arrived = [self.directory / f"{self.generation}-{r}" for r in range(self.world_size)]
        while not all(p.exists() for p in arrived):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank} waited {self.timeout_s}s at barrier {self.generation}")
            time.sleep(0.005)


def _build_as_rank(root: str, barrier_dir: str, rank: int, world_size: int) -> None:
    barrier = FileBarrier(Path(barrier_dir), rank, world_size)
    cache = build(Path(root), process_index=rank, num_processes=world_size, wait_for_everyone=barrier, shard_size=3)
    # Every rank gets the finished cache back.
    np.testing.assert_array_equal(cache.get(["Class1/Class1_8.jpg"])["confidence"], np.float32([1 / 9]))


def test_two_processes_build_the_same_bytes_as_one(tmp_path, reference):
    root, barrier_dir = tmp_path / "cache", tmp_path / "barrier"
    barrier_dir.mkdir()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_build_as_rank, args=(str(root), str(barrier_dir), rank, 2)) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert_equals_reference(root, reference)


def test_multi_process_build_needs_a_barrier(tmp_path):
    with pytest.raises(ValueError, match="wait_for_everyone"):
        build(tmp_path, process_index=0, num_processes=2)
    with pytest.raises(ValueError, match="process_index"):
        build(tmp_path, process_index=2, num_processes=2, wait_for_everyone=lambda: None)


# ---------------------------------------------------------------------------------------------- lookup


def test_lookup_of_random_keys_returns_their_computed_rows(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    cache = build(tmp_path)
    rng = np.random.default_rng(0)
    picked = rng.choice(NUM_SAMPLES, size=40, replace=True)  # repeats and any order
    query = [keys[i] for i in picked]
    np.testing.assert_array_equal(cache.lookup(query), picked)
    got = cache.get(query)
    for name, values in deterministic_compute(picked).items():
        np.testing.assert_array_equal(got[name], values)
        assert not isinstance(got[name], np.memmap)
    assert set(cache.get(query, fields=["logits"])) == {"logits"}
    assert cache.lookup([]).shape == (0,)
    assert keys[5] in cache and "Class5/nope.jpg" not in cache and 5 not in cache


def test_missing_key_raises_key_error_naming_it(tmp_path):
    cache = build(tmp_path)
    with pytest.raises(KeyError, match="Class3/not_there.jpg"):
        cache.lookup(["Class0/Class0_0.jpg", "Class3/not_there.jpg", "also/missing.jpg"])
    with pytest.raises(KeyError, match="unknown field"):
        cache.get(["Class0/Class0_0.jpg"], fields=["logit"])


def test_duplicate_keys_are_rejected(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    keys[17] = keys[4]
    with pytest.raises(ValueError, match=r"duplicate sample key 'Class4/Class4_4.jpg' at positions 4 and 17"):
        build(tmp_path, keys=keys)
    with pytest.raises(TypeError, match=r"keys\[3\]"):
        build(tmp_path, keys=[*make_keys(3), 7])


def test_hash_collisions_still_find_the_right_row(tmp_path, monkeypatch):
    """With a 2-bucket hash every lookup collides; the stored key bytes must decide."""
    real_hash = cache_module._hash_keys
    monkeypatch.setattr(cache_module, "_hash_keys", lambda encoded: real_hash(encoded) % np.uint64(2))
    keys = make_keys(NUM_SAMPLES)
    cache = build(tmp_path)
    order = np.random.default_rng(1).permutation(NUM_SAMPLES)
    np.testing.assert_array_equal(cache.lookup([keys[i] for i in order]), order)
    with pytest.raises(KeyError, match="Class9/collides.jpg"):
        cache.lookup(["Class9/collides.jpg"])
    keys[9] = keys[2]
    with pytest.raises(ValueError, match="duplicate"):
        build(tmp_path / "dup", keys=keys)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("bad_output", "error", "message"),
    [
        (lambda idx: {"logits": np.zeros((len(idx) - 1, 3))}, ValueError, r"'logits' with shape \[3, 3\] for 4"),
        (lambda idx: [np.zeros(len(idx))], TypeError, "mapping"),
        (lambda idx: {"logits": np.array(["a"] * len(idx), dtype=object)}, TypeError, "dtype object"),
        (lambda idx: {"bad name": np.zeros(len(idx))}, ValueError, "field name 'bad name'"),
    ],
)
def test_bad_compute_output_gets_a_clear_error(tmp_path, bad_output, error, message):
    with pytest.raises(error, match=message):
        build(tmp_path, bad_output)
    assert not cache_directory(tmp_path, IDENTITY).exists()


def test_inconsistent_fields_are_reported(tmp_path):
    def changes_dtype(indices):
        out = deterministic_compute(indices)
        if indices[0] >= 2 * SHARD_SIZE:
            out["logits"] = out["logits"].astype(np.float32)
        return out

    with pytest.raises(ValueError, match=r"inconsistent field 'logits'.*float32 \[5\].*float16 \[5\]"):
        build(tmp_path, changes_dtype)

    # Shards written by different runs (or processes) are checked again when merging.
    root = tmp_path / "across_runs"
    with pytest.raises(Killed):
        build(root, CountingCompute(fail_on_call=3))

    def as_float32(indices):
        return {k: v.astype(np.float32) if k == "logits" else v for k, v in deterministic_compute(indices).items()}

    with pytest.raises(ValueError, match="inconsistent field 'logits'"):
        build(root, as_float32)


def test_same_identity_with_other_keys_is_refused(tmp_path):
    build(tmp_path)
    with pytest.raises(ValueError, match="different key list"):
        build(tmp_path, keys=make_keys(NUM_SAMPLES + 1))
    partial_root = tmp_path / "partial"
    with pytest.raises(Killed):
        build(partial_root, CountingCompute(fail_on_call=2))
    with pytest.raises(ValueError, match="different key list"):
        build(partial_root, keys=list(reversed(make_keys(NUM_SAMPLES))))


# ---------------------------------------------------------------------------------------------- scale


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_large_cache_opens_memory_mapped_without_reading_the_logits(tmp_path):
    num_samples, num_classes = 200_000, 100
    keys = [f"sha1:{i:040x}" for i in range(num_samples)]

    def compute(indices):
        logits = (indices[:, None] % 251 + np.arange(num_classes)).astype(np.float16)
        return {"logits": logits, "prediction": indices % num_classes}

    build_cache(tmp_path, IDENTITY, keys, compute, shard_size=50_000, progress=False)
    logits_bytes = num_samples * num_classes * 2  # 40 MB

    before = _resident_bytes()
    cache = PredictionCache.open(tmp_path, IDENTITY)
    assert all(isinstance(a, np.memmap) for a in cache.arrays.values())
    assert _resident_bytes() - before < logits_bytes / 8, "opening must not read the logits"

    rng = np.random.default_rng(0)
    picked = rng.choice(num_samples, size=65_536, replace=False)
    np.testing.assert_array_equal(cache.lookup([keys[i] for i in picked]), picked)
    rows = cache.get([keys[i] for i in picked[:1000]], fields=["logits"])["logits"]
    np.testing.assert_array_equal(rows, compute(picked[:1000])["logits"])


def test_attachments_are_stored_once_and_read_back(tmp_path):
    classifier = np.arange(12, dtype=np.float32).reshape(3, 4)
    built = build(tmp_path, attachments={"text_classifier": classifier, "logit_scale": np.float32(14.0)})
    opened = PredictionCache.open(tmp_path, IDENTITY)
    for cache in (built, opened):
        np.testing.assert_array_equal(cache.attachments["text_classifier"], classifier)
        assert float(cache.attachments["logit_scale"]) == 14.0 and cache.attachments["logit_scale"].shape == ()
    with pytest.raises(TypeError, match="read-only|does not support"):
        opened.attachments["x"] = classifier  # type: ignore[index]


def test_attachments_must_be_numeric_and_well_named(tmp_path):
    with pytest.raises(ValueError, match="attachment name"):
        build(tmp_path / "a", attachments={"bad name": np.zeros(2)})
    with pytest.raises(TypeError, match="only numeric"):
        build(tmp_path / "b", attachments={"names": np.array(["a", "b"])})


# ---------------------------------------------------------------------------------------------- per-sample reuse

FAMILY = {k: IDENTITY[k] for k in ("model", "pretrained", "templates", "class_names", "preprocess")}


def version_of(keys: list[str], content: dict[str, str] | None = None) -> dict:
    """The identity of one version of a sample list (the family plus a fingerprint of keys + content ids)."""
    content = content or {}
    return {**IDENTITY, "dataset_fingerprint": "|".join(f"{k}={content.get(k, '')}" for k in keys)}


def keyed_compute(keys: list[str], content: dict[str, str] | None = None, seen: list | None = None):
    """A fake teacher whose rows depend only on (key, content id), like a real one; records what it computes."""
    content = content or {}

    def compute(indices: np.ndarray) -> dict[str, np.ndarray]:
        if seen is not None:
            seen.extend(keys[i] for i in indices)
        seeds = np.array([int.from_bytes(hashlib.sha256(f"{keys[i]}|{content.get(keys[i], '')}".encode()).digest()[:4],
                                         "little") for i in indices], dtype=np.float64)
        logits = np.sin(seeds[:, None] * 1e-6 + np.arange(NUM_CLASSES))
        return {"logits": logits.astype(np.float16), "prediction": logits.argmax(1).astype(np.int64),
                "valid": np.ones(len(indices), np.uint8)}

    return compute


def build_version(root: Path, keys: list[str], content: dict[str, str] | None = None, seen=None, **kwargs):
    content = content or {}
    kwargs.setdefault("shard_size", SHARD_SIZE)
    return build_cache(root, version_of(keys, content), keys, keyed_compute(keys, content, seen), family=FAMILY,
                       content_ids=[content.get(k, "") for k in keys], progress=False, **kwargs)


def test_a_new_sample_is_the_only_one_computed_and_the_result_equals_a_full_build(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    build_version(tmp_path / "cache", keys)
    grown = [*keys[:10], "Class3/new.jpg", *keys[10:]]
    seen: list[str] = []
    cache = build_version(tmp_path / "cache", grown, seen=seen)
    assert seen == ["Class3/new.jpg"]
    build_info = json.loads((cache.directory / "build.json").read_text())
    assert build_info["computed_samples"] == 1 and build_info["reused_samples"] == NUM_SAMPLES
    full = build_version(tmp_path / "full", grown)
    assert tree_bytes(cache.directory) == tree_bytes(full.directory), "reuse must give a full build's bytes"


def test_a_removed_sample_computes_nothing(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    build_version(tmp_path, keys)
    seen: list[str] = []
    fewer = keys[:5] + keys[6:]
    cache = build_version(tmp_path, fewer, seen=seen)
    assert seen == []
    np.testing.assert_array_equal(cache.get(fewer)["logits"], keyed_compute(fewer)(np.arange(len(fewer)))["logits"])


def test_a_changed_content_id_is_computed_again(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    build_version(tmp_path, keys, {k: "v1" for k in keys})
    changed = {k: "v1" for k in keys} | {keys[3]: "v2", keys[17]: "v2"}
    seen: list[str] = []
    cache = build_version(tmp_path, keys, changed, seen=seen)
    assert seen == [keys[3], keys[17]]
    expected = keyed_compute(keys, changed)(np.arange(NUM_SAMPLES))["logits"]
    np.testing.assert_array_equal(cache.arrays["logits"], expected)


def test_no_reuse_across_families_or_when_asked_not_to(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    build_version(tmp_path, keys)
    other_family = {**FAMILY, "model": "ViT-L-14"}
    seen: list[str] = []
    build_cache(tmp_path, {**version_of(keys), "model": "ViT-L-14"}, keys, keyed_compute(keys, seen=seen),
                family=other_family, shard_size=SHARD_SIZE, progress=False)
    assert len(seen) == NUM_SAMPLES
    seen.clear()
    build_version(tmp_path, keys[1:], seen=seen, reuse=False)
    assert len(seen) == NUM_SAMPLES - 1


def test_rows_failing_the_retry_field_are_computed_again(tmp_path):
    keys = make_keys(NUM_SAMPLES)

    def first_time(indices):
        out = keyed_compute(keys)(indices)
        out["valid"][np.isin(indices, [2, 9])] = 0  # e.g. two images that could not be read
        return out

    build_cache(tmp_path, version_of(keys), keys, first_time, family=FAMILY, shard_size=SHARD_SIZE, progress=False)
    seen: list[str] = []
    build_version(tmp_path, keys[:-1], seen=seen, retry_field="valid")
    assert seen == [keys[2], keys[9]]


def test_a_damaged_cache_lends_nothing(tmp_path, caplog):
    keys = make_keys(NUM_SAMPLES)
    old = build_version(tmp_path, keys)
    flip_byte(old.directory / "fields" / "logits.npy", -3)  # logits are checked in full before lending
    del old
    seen: list[str] = []
    with caplog.at_level("WARNING"):
        build_version(tmp_path, keys[:-1], seen=seen)
    assert len(seen) == NUM_SAMPLES - 1
    assert "not reusing rows" in caplog.text and "field logits" in caplog.text


def test_callable_attachments_come_from_the_family_when_nothing_is_computed(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    classifier = np.arange(6, dtype=np.float32).reshape(2, 3)
    build_version(tmp_path, keys, attachments=lambda: {"text_classifier": classifier})

    def must_not_run():
        raise AssertionError("attachments recomputed although a cache of the family holds them")

    cache = build_version(tmp_path, keys[2:], attachments=must_not_run)
    np.testing.assert_array_equal(cache.attachments["text_classifier"], classifier)


def test_the_batch_grid_does_not_depend_on_the_shard_size(tmp_path):
    calls: list[tuple[int, int]] = []

    def records(indices):
        calls.append((int(indices[0]), len(indices)))
        return deterministic_compute(indices)

    build(tmp_path / "a", records, shard_size=5, batch_size=4)  # rounded up to 8: shards start on the grid of 4
    assert calls == [(0, 8), (8, 8), (16, 7)]
    build(tmp_path / "b", shard_size=3, batch_size=4)
    a, b = (tree_bytes(cache_directory(tmp_path / name, IDENTITY)) for name in ("a", "b"))
    assert a == b


# ---------------------------------------------------------------------------------------------- integrity


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def damage(directory: Path, how: str) -> None:
    if how == "truncated logits":
        path = directory / "fields" / "logits.npy"
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "bit flip in prediction":
        flip_byte(directory / "fields" / "prediction.npy", -5)
    elif how == "bit flip in confidence":
        flip_byte(directory / "fields" / "confidence.npy", -2)
    elif how == "deleted identity.json":
        (directory / "identity.json").unlink()
    elif how == "deleted meta.json":
        (directory / "meta.json").unlink()
    elif how == "garbage meta.json":
        (directory / "meta.json").write_bytes(b"\x00{not json")
    elif how == "edited meta.json":
        text = (directory / "meta.json").read_text()
        (directory / "meta.json").write_text(text.replace(f'"num_samples": {NUM_SAMPLES}', '"num_samples": 22'))
    elif how == "garbage identity.json":
        (directory / "identity.json").write_text('{"identity": [1, 2]}')
    elif how == "deleted key index":
        (directory / "index_hash.npy").unlink()
    elif how == "truncated attachment":
        path = directory / "attachments" / "text_classifier.npy"
        path.write_bytes(path.read_bytes()[:-1])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("truncated logits", "field logits"),
        ("bit flip in prediction", "field prediction"),
        ("bit flip in confidence", "field confidence"),
        ("deleted identity.json", "identity.json"),
        ("deleted meta.json", "meta.json"),
        ("garbage meta.json", "meta.json"),
        ("edited meta.json", "meta.json"),
        ("garbage identity.json", "identity.json"),
        ("deleted key index", "key index"),
        ("truncated attachment", "attachment text_classifier"),
    ],
)
def test_damage_is_found_at_open_and_named(tmp_path, how, named):
    directory = build(tmp_path, attachments={"text_classifier": np.ones((2, 3), np.float32)}).directory
    damage(directory, how)
    with pytest.raises(CacheDamagedError) as caught:
        PredictionCache.open(tmp_path, IDENTITY)
    message = str(caught.value)
    assert f"({named}" in message and str(directory) in message and "--rebuild" in message
    assert isinstance(caught.value, UserError)
    with pytest.raises(CacheDamagedError):  # a build does not paper over it either
        build(tmp_path)


def test_large_fields_are_checked_on_first_full_read_and_by_verify(tmp_path):
    def wide(indices):  # 64 bytes of logits per row: above OPEN_CHECK_MAX_ROW_BYTES, so not read at open
        return {**deterministic_compute(indices), "logits": np.ones((len(indices), 32), np.float16)}

    directory = build(tmp_path, wide).directory
    assert "fields/logits.npy" not in json.loads((directory / "meta.json").read_text())["checked_at_open"]
    flip_byte(directory / "fields" / "logits.npy", -1)
    cache = PredictionCache.open(tmp_path, IDENTITY)  # the open check reads only the small fields
    cache.verified("prediction")
    with pytest.raises(CacheDamagedError, match=r"field logits"):
        cache.verified("logits")
    with pytest.raises(CacheDamagedError, match=r"field logits"):
        cache.verify()
    with pytest.raises(CacheDamagedError, match=r"field logits"):
        cache_module.verify_cache(directory)


def test_rebuild_replaces_a_damaged_cache_with_the_same_bytes(tmp_path, reference):
    damage(build(tmp_path).directory, "deleted identity.json")
    calls = CountingCompute()
    build(tmp_path, calls, rebuild=True)
    assert len(calls.calls) == NUM_SHARDS
    assert_equals_reference(tmp_path, reference)


def test_a_damaged_key_index_never_returns_another_keys_row(tmp_path):
    directory = build(tmp_path).directory
    rows = np.load(directory / "index_row.npy")
    rows[[0, 1]] = rows[[1, 0]]  # two entries of the index point at each other's rows
    np.save(directory / "index_row.npy", rows)
    meta_path = directory / "meta.json"  # pretend the manifest agrees, to test the lookup itself
    meta = json.loads(meta_path.read_text())
    meta["files"]["index_row.npy"] = {"bytes": (directory / "index_row.npy").stat().st_size, "xxh3_128": "x"}
    meta["meta_checksum"] = cache_module._meta_checksum(meta)
    meta_path.write_text(json.dumps(meta))
    cache = PredictionCache.open(tmp_path, IDENTITY)
    keys = make_keys(NUM_SAMPLES)
    swapped = [keys[int(rows[1])], keys[int(rows[0])]]  # the keys whose index entries were swapped
    found = cache._find(swapped)
    assert all(found[i] in (-1, keys.index(swapped[i])) for i in range(2)), "never another key's row"
    untouched = [k for k in keys if k not in swapped]
    np.testing.assert_array_equal(cache.lookup(untouched), [keys.index(k) for k in untouched])
    with pytest.raises(CacheDamagedError, match="key index"):  # verify() sees the changed file
        cache.verify()


# ---------------------------------------------------------------------------------------------- disk space


def test_too_little_free_space_fails_before_the_merge_and_resumes(tmp_path, reference, monkeypatch):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(cache_module.shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=1000))
    with pytest.raises(DiskFullError) as caught:
        build(tmp_path)
    final = cache_directory(tmp_path, IDENTITY)
    assert str(final) in str(caught.value) and "bytes needed" in str(caught.value)
    assert not final.exists()
    partial = final.with_name(final.name + ".partial")
    assert len(list((partial / "shards").glob("*.npz"))) == NUM_SHARDS, "computed shards are kept"
    assert not list(partial.glob("merge-*"))
    monkeypatch.setattr(cache_module.shutil, "disk_usage", real_usage)
    resumed = CountingCompute()
    build(tmp_path, resumed)
    assert resumed.calls == []
    assert_equals_reference(tmp_path, reference)


def test_enospc_during_the_merge_is_a_disk_full_error_and_leaves_no_partial_file(tmp_path, reference, monkeypatch):
    real_put = cache_module._NpyWriter._put
    written = []

    def disk_fills(self, data):
        written.append(len(data))
        if len(written) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_put(self, data)

    monkeypatch.setattr(cache_module._NpyWriter, "_put", disk_fills)
    with pytest.raises(DiskFullError, match="no space left"):
        build(tmp_path)
    final = cache_directory(tmp_path, IDENTITY)
    partial = final.with_name(final.name + ".partial")
    assert not final.exists() and not list(partial.glob("merge-*"))
    monkeypatch.setattr(cache_module._NpyWriter, "_put", real_put)
    build(tmp_path)
    assert_equals_reference(tmp_path, reference)


# ---------------------------------------------------------------------------------------------- locks


def test_a_second_builder_waits_for_the_first_then_opens_its_cache(tmp_path, caplog):
    name = cache_directory(tmp_path, IDENTITY).name
    tmp_path.mkdir(exist_ok=True)
    held = cache_module._BuildLock(tmp_path, name).acquire()
    result: dict = {}

    def second():
        try:
            result["cache"] = build(tmp_path)
        except BaseException as error:  # noqa: BLE001 - reported below
            result["error"] = error

    with caplog.at_level("WARNING"):
        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 30
        while "waiting" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "another process is building the prediction cache" in caplog.text
        assert thread.is_alive() and not cache_directory(tmp_path, IDENTITY).exists()
        held.release()
        thread.join(timeout=60)
    assert "error" not in result and len(result["cache"]) == NUM_SAMPLES


def test_concurrent_builders_of_one_identity_cooperate(tmp_path, reference):
    """Four builders at once (threads with their own lock handles behave like processes): one computes, the
    others wait and open its cache; nobody trips over another's temporary files."""
    results: list = []
    computed = CountingCompute()

    def builder():
        try:
            results.append(len(build(tmp_path, computed)))
        except BaseException as error:  # noqa: BLE001 - reported below
            results.append(error)

    threads = [threading.Thread(target=builder) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [NUM_SAMPLES] * 4
    assert len(computed.calls) == NUM_SHARDS, "every shard computed once"
    assert_equals_reference(tmp_path, reference)


def test_a_cache_in_use_is_never_deleted(tmp_path):
    cache = build(tmp_path)
    directory = cache.directory
    with pytest.raises(CacheInUseError, match="in use"):
        cache_module.delete_cache(directory)
    with pytest.raises(CacheInUseError):
        build(tmp_path, rebuild=True)
    assert cache_module.list_caches(tmp_path)[0].in_use
    outcome = cache_module.prune_caches(tmp_path, cache_module.list_caches(tmp_path))
    assert [o for _, o in outcome] == ["kept: in use by another process"] and directory.is_dir()
    del cache
    cache_module.delete_cache(directory)
    assert not directory.exists()


# ---------------------------------------------------------------------------------------------- list and prune


def test_list_and_prune(tmp_path):
    keys = make_keys(NUM_SAMPLES)
    older = build_version(tmp_path, keys).directory
    time.sleep(0.05)
    newer = build_version(tmp_path, keys[1:]).directory
    with pytest.raises(Killed):
        build(tmp_path, CountingCompute(fail_on_call=2))
    stray = tmp_path / "not_a_cache"
    stray.mkdir()
    listed = {e.directory.name: e for e in cache_module.list_caches(tmp_path)}
    assert "not_a_cache" not in listed, "directories the cache did not write are never listed (or pruned)"
    states = sorted(e.state for e in listed.values())
    assert states == ["complete", "complete", "partial"]
    partial = next(e for e in listed.values() if e.state == "partial")
    assert not partial.running and partial.num_samples == NUM_SAMPLES and partial.done_samples == SHARD_SIZE
    assert all(e.bytes > 0 and e.identity for e in listed.values())

    superseded = cache_module.select_superseded(list(listed.values()), lambda identity: identity.get("model"))
    assert [e.directory for e in superseded] == [older]
    assert cache_module.select_older_than(list(listed.values()), 3600) == []

    dry = cache_module.prune_caches(tmp_path, superseded, dry_run=True)
    assert sorted(o for _, o in dry) == ["would remove", "would remove"] and len(entries(tmp_path)) == 4
    done = cache_module.prune_caches(tmp_path, superseded)
    assert sorted(o for _, o in done) == ["removed", "removed"]
    assert entries(tmp_path) == sorted([newer.name, "not_a_cache"])
    PredictionCache.open(tmp_path, version_of(keys[1:]))  # the newest is intact


def test_prune_keeps_a_partial_build_that_is_running(tmp_path):
    with pytest.raises(Killed):
        build(tmp_path, CountingCompute(fail_on_call=2))
    name = cache_directory(tmp_path, IDENTITY).name
    held = cache_module._BuildLock(tmp_path, name).acquire()
    try:
        (entry,) = cache_module.list_caches(tmp_path)
        assert entry.state == "partial" and entry.running
        assert [o for _, o in cache_module.prune_caches(tmp_path)] == ["kept: a build is running"]
    finally:
        held.release()
    assert [o for _, o in cache_module.prune_caches(tmp_path)] == ["removed"]
    assert entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------- the teacher cache
# Image folders with the bundled tiny CLIP: what a swap, an edit, an added or a removed image re-predicts.

BMP_SIDE = 12  # .bmp files of one size all have the same byte size: same-size swaps and edits


def write_bmp_folder(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            tiny_image(seed * 1000 + c * 100 + i, side=BMP_SIDE).save(root / name / f"{name}_{i}.bmp")
    return root


def folder_config(tmp_path: Path, folder: Path, *extra: str):
    from zeroshot_adapt import pipeline

    return pipeline.resolve_config("imagefolder", overrides=[
        f"data.data_dir={folder}", "data.holdout_fraction=0", "teacher.model=zsa-tiny-digits",
        "teacher.pretrained=bundled", f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.batch_size=4",
        "teacher.shard_size=4", "teacher.num_workers=0", *extra,
    ])


@pytest.fixture
def predicted(monkeypatch) -> list[str]:
    """The keys of every image CLIP is asked to predict (through predict_shards) during the test."""
    from zeroshot_adapt.teacher import predict

    seen: list[str] = []
    real = predict.predict_shards

    def counting(clip, classifier, table, shards, **kwargs):
        seen.extend(table.keys[int(i)] for shard in shards for i in shard)
        yield from real(clip, classifier, table, shards, **kwargs)

    monkeypatch.setattr(predict, "predict_shards", counting)
    return seen


def teacher(config):
    from zeroshot_adapt import pipeline

    return pipeline.teacher_predictions(config, "train", progress=False)


def logits_by_key(preds) -> dict[str, np.ndarray]:
    return dict(zip(preds.table.keys, preds.field("logits"), strict=True))


def test_two_same_size_images_swapped_are_predicted_again(tmp_path, predicted):
    folder = write_bmp_folder(tmp_path / "images")
    config = folder_config(tmp_path, folder)
    before = logits_by_key(teacher(config))
    a, b, swap = folder / "cat" / "cat_1.bmp", folder / "dog" / "dog_2.bmp", folder / "swap.tmp"
    assert a.stat().st_size == b.stat().st_size
    predicted.clear()
    os.rename(a, swap), os.rename(b, a), os.rename(swap, b)
    after = logits_by_key(teacher(config))
    assert sorted(predicted) == ["cat/cat_1.bmp", "dog/dog_2.bmp"], "exactly the two swapped images"
    np.testing.assert_array_equal(after["cat/cat_1.bmp"], before["dog/dog_2.bmp"])
    np.testing.assert_array_equal(after["dog/dog_2.bmp"], before["cat/cat_1.bmp"])
    assert not np.array_equal(after["cat/cat_1.bmp"], before["cat/cat_1.bmp"])


def test_an_image_edited_in_place_at_the_same_size_is_predicted_again(tmp_path, predicted):
    folder = write_bmp_folder(tmp_path / "images")
    config = folder_config(tmp_path, folder)
    teacher(config)
    victim = folder / "fox" / "fox_3.bmp"
    size = victim.stat().st_size
    tiny_image(424242, side=BMP_SIDE).save(victim)  # same file, same size, new pixels
    assert victim.stat().st_size == size
    predicted.clear()
    teacher(config)
    assert predicted == ["fox/fox_3.bmp"]


def test_one_image_added_predicts_one_and_equals_a_full_build(tmp_path, predicted):
    folder = write_bmp_folder(tmp_path / "images")
    teacher(folder_config(tmp_path, folder))
    tiny_image(777, side=BMP_SIDE).save(folder / "dog" / "dog_new.bmp")
    predicted.clear()
    grown = teacher(folder_config(tmp_path, folder))
    assert predicted == ["dog/dog_new.bmp"]
    full = teacher(folder_config(tmp_path / "full", folder))  # an empty cache directory: a full build
    assert len(predicted) == 1 + len(full.table)
    assert tree_bytes(grown.cache.directory) == tree_bytes(full.cache.directory), (
        "batches are padded to the batch size, so a sample's numbers do not depend on its batch-mates"
    )


def test_one_image_removed_predicts_none_and_loads_no_clip(tmp_path, predicted, monkeypatch):
    folder = write_bmp_folder(tmp_path / "images")
    first = teacher(folder_config(tmp_path, folder))
    (folder / "cat" / "cat_0.bmp").unlink()

    def no_clip(*args, **kwargs):
        raise AssertionError("nothing to predict: CLIP must not be loaded")

    monkeypatch.setattr("zeroshot_adapt.teacher.clip.load_clip", no_clip)
    predicted.clear()
    fewer = teacher(folder_config(tmp_path, folder))
    assert predicted == [] and len(fewer.table) == len(first.table) - 1
    assert fewer.cache.directory != first.cache.directory
    old = logits_by_key(first)
    for key, logits in logits_by_key(fewer).items():
        np.testing.assert_array_equal(logits, old[key])
    np.testing.assert_array_equal(fewer.text_classifier, first.text_classifier)
    assert fewer.logit_scale == first.logit_scale


def test_content_fingerprints_survive_copying_the_data_and_stat_ones_do_not(tmp_path, predicted):
    folder = write_bmp_folder(tmp_path / "images")
    teacher(folder_config(tmp_path, folder, "data.fingerprint=content"))
    copy = tmp_path / "copied"
    shutil.copytree(folder, copy)  # new inodes and modification times, same bytes
    predicted.clear()
    teacher(folder_config(tmp_path, copy, "data.fingerprint=content"))
    assert predicted == []
    teacher(folder_config(tmp_path, folder))  # stat ids: nothing to reuse from content ids
    assert len(predicted) == 12
    predicted.clear()
    teacher(folder_config(tmp_path, copy))
    assert len(predicted) == 12, "under stat ids a copy is new data"


def test_shard_size_does_not_change_the_teacher_cache(tmp_path):
    folder = write_bmp_folder(tmp_path / "images", per_class=5)
    three = teacher(folder_config(tmp_path / "a", folder, "teacher.shard_size=3"))
    seven = teacher(folder_config(tmp_path / "b", folder, "teacher.shard_size=7"))
    assert three.cache.directory.name == seven.cache.directory.name, "the shard size is not in the identity"
    assert tree_bytes(three.cache.directory) == tree_bytes(seven.cache.directory)


def test_each_image_is_decoded_once_and_a_corrupt_one_logged_once(tmp_path, monkeypatch, caplog):
    """Wrapping the DataLoader in tqdm.auto started a second iterator whose workers decoded (and logged) the
    prefetched images again; with workers, every image must still be decoded exactly once."""
    from zeroshot_adapt.data import sources

    folder = write_bmp_folder(tmp_path / "images")
    bad = folder / "dog" / "dog_1.bmp"
    bad.write_bytes(bad.read_bytes()[:20])
    log_file = tmp_path / "decoded.txt"
    real_decode = sources.decode_image

    def logged_decode(source, name):
        with open(log_file, "a") as handle:  # workers are separate processes: count through a file
            handle.write(f"{name}\n")
        return real_decode(source, name)

    monkeypatch.setattr(sources, "decode_image", logged_decode)
    with caplog.at_level("WARNING"):
        preds = teacher(folder_config(tmp_path, folder, "teacher.num_workers=2"))
    decoded = log_file.read_text().splitlines()
    assert sorted(decoded) == sorted(str(folder / key) for key in preds.table.keys), "each image exactly once"
    assert caplog.text.count("dog_1.bmp") == 1
    assert preds.valid.sum() == len(preds.table) - 1


@pytest.mark.parametrize(
    ("decode_ms", "forward_ms", "cores", "on_host", "expected"),
    [
        (1.0, 1.0, 2, True, 0),  # 2 cores, CPU forward: a worker halves the forward's cores: 2 ms > 2 ms * 0.9
        (3.0, 1.0, 2, True, 1),  # decoding dominates: max(3, 2) = 3 < 0.9 * 4
        (4.0, 1.0, 16, False, 4),  # accelerator: workers until decoding keeps up with the forward
        (0.1, 1.0, 16, False, 0),  # decoding is cheap: workers would only add copies
        (4.0, 1.0, 1, True, 0),  # one core: nothing to overlap with
    ],
)
def test_worker_count_follows_the_measured_costs(decode_ms, forward_ms, cores, on_host, expected):
    from zeroshot_adapt.teacher.predict import choose_num_workers

    assert choose_num_workers(decode_ms, forward_ms, cores=cores, forward_on_host=on_host) == expected


def test_the_worker_count_is_measured_and_logged_when_not_set(tmp_path, caplog):
    folder = write_bmp_folder(tmp_path / "images")
    with caplog.at_level("INFO", logger="zeroshot_adapt.teacher.predict"):
        teacher(folder_config(tmp_path, folder, "teacher.num_workers=null"))
    assert "decode+preprocess" in caplog.text and "DataLoader worker(s)" in caplog.text


# ---------------------------------------------------------------------------------------------- content ids


def test_hugging_face_rows_get_content_ids_that_see_edits(tmp_path):
    from datasets import ClassLabel, Dataset, Features, load_from_disk
    from datasets import Image as ImageFeature

    from zeroshot_adapt.data.sources import hf_split

    folder = write_bmp_folder(tmp_path / "images", per_class=2)
    paths = sorted(str(p) for p in folder.rglob("*.bmp"))
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["cat", "dog", "fox"])})
    on_disk = Dataset.from_dict({"image": paths, "label": [0, 0, 1, 1, 2, 2]}, features=features)

    def split(dataset, mode="stat"):
        return hf_split(dataset, image_column="image", label_column="label", classes=None, where="t", fingerprint=mode)

    pointing = split(on_disk)  # rows that point at files: stat ids, like an image folder
    assert pointing.keys == paths and all(c.startswith("stat:") for c in pointing.content_ids)
    size = Path(paths[3]).stat().st_size
    tiny_image(99, side=BMP_SIDE).save(paths[3])  # edited in place, same size
    assert Path(paths[3]).stat().st_size == size
    edited = split(on_disk)
    assert [a != b for a, b in zip(pointing.content_ids, edited.content_ids, strict=True)] == [0, 0, 0, 1, 0, 0]

    on_disk.save_to_disk(str(tmp_path / "saved"))  # the bytes move into an Arrow file
    saved = split(load_from_disk(str(tmp_path / "saved")))
    assert all(c.startswith("arrow:") for c in saved.content_ids)
    by_content = split(load_from_disk(str(tmp_path / "saved")), "content")
    assert by_content.content_ids == split(on_disk, "content").content_ids  # the same bytes, wherever they live
    assert len(set(by_content.content_ids)) == 6


def test_the_fingerprint_setting_is_checked():
    from zeroshot_adapt.config import CONSTRAINTS
    from zeroshot_adapt.data.sources import FINGERPRINT_MODES

    assert CONSTRAINTS["data.fingerprint"].choices == FINGERPRINT_MODES
    from zeroshot_adapt import pipeline

    with pytest.raises(UserError, match=r"data.fingerprint='mtime' must be one of stat, content"):
        pipeline.resolve_config("digits", overrides=["data.fingerprint=mtime"])


def test_a_key_the_cache_should_hold_but_cannot_find_is_reported_as_damage(tmp_path):
    from zeroshot_adapt import pipeline

    folder = write_bmp_folder(tmp_path / "images")
    directory = teacher(folder_config(tmp_path, folder)).cache.directory
    flip_byte(directory / "keys_blob.npy", -1)  # same size: the open check passes, the last key no longer matches
    with pytest.raises(CacheDamagedError, match=r"\(key index: .*fox/fox_3.bmp"):
        pipeline.teacher_predictions(folder_config(tmp_path, folder), "train", progress=False)
