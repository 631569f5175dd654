"""The on-disk prediction cache: identity, resume and multi-process byte equality, lookups, memory-mapping."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zeroshot_adapt import cache as cache_module
from zeroshot_adapt.cache import (
    CacheMiss,
    PredictionCache,
    build_cache,
    cache_directory,
    cache_identity_digest,
)

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
