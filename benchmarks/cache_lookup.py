"""Benchmark the prediction cache at ImageNet scale: build, open, random-key lookup, peak memory.

Builds a synthetic cache shaped like the teacher's (default: 1,281,167 samples x 1000 fp16 logits +
1024-d fp16 features + float32 confidence + int64 prediction + uint8 valid, and a [1000, 1024] float32
text-classifier attachment; about 5.2 GB; the build needs about twice that on disk while shards and the
merged files coexist), then measures in fresh processes, with the cache files evicted from the OS page
cache first (posix_fadvise DONTNEED) so the reads are cold:

- ``PredictionCache``: open (memory-mapped; the open checks every file's size, dtype and shape and the
  checksums of the small per-sample fields and the attachments), look up 65,536 random keys, read their
  logit rows, then the first full read of the logits (``verified``: a checksum of the whole file) and a
  full ``verify()`` of every file;
- baseline, same run: ``np.load`` of the logits into RAM plus a Python ``{key: row}`` dict, the usual
  alternative; the ratios compare the two.

Memory comes from /proc/self/status of the measuring process: private memory (RssAnon: what the
process allocated), file pages mapped (RssFile: page-cache pages of the memory-mapped files, shared and
reclaimable; how many a page fault brings in depends on the device read-ahead, recorded in the results)
and the peak (VmHWM). ``resource.getrusage`` is not used: Linux carries ru_maxrss across fork/exec, so
a child of the process that just wrote 5 GB would report the parent's peak.

Writes ``benchmarks/results/cache_lookup.json`` (``--out`` elsewhere for trial runs) and prints a table.
The cache is deleted afterwards unless ``--keep``. Small run: ``python benchmarks/cache_lookup.py --quick``
(20,000 samples x 100 classes, 64-d features, results in /tmp). The open cost does not depend on the
width of the large fields, so ``--samples 1281167 --classes 10 --dim 8`` measures the ImageNet-size open
on a small disk budget (its attachment is small: a [1000, 1024] float32 one adds 4 MB to checksum).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zeroshot_adapt.cache import PredictionCache, build_cache, cache_directory

IMAGENET_TRAIN_SAMPLES = 1_281_167
INVALID_FRACTION = 1e-4  # share of synthetic samples marked undecodable (valid = 0)
QUICK = {"samples": 20_000, "classes": 100, "dim": 64}
DISK_HEADROOM = 1.1  # free space wanted beyond the estimated peak use
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "cache_lookup.json"


def synthetic_key(index: int) -> str:
    """ImageNet-style relative path, e.g. ``n00000123/n00000123_1230123.JPEG`` (1000 class folders)."""
    synset = f"n{index % 1000:08d}"
    return f"{synset}/{synset}_{index}.JPEG"


def identity_for(args: argparse.Namespace) -> dict:
    return {
        "benchmark": "cache_lookup",
        "samples": args.samples,
        "classes": args.classes,
        "dim": args.dim,
        "seed": args.seed,
    }


def memory_status() -> dict[str, int]:
    """Bytes from /proc/self/status: private (RssAnon) and file-backed (RssFile) resident memory, peak."""
    wanted = {"RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in wanted:
                status[wanted[name]] = int(value.split()[0]) * 1024  # reported in kB
    return status


def memory_report(start: dict[str, int], after_open: dict[str, int]) -> dict[str, int]:
    end = memory_status()
    return {
        "anon_growth_open_bytes": after_open["anon"] - start["anon"],
        "anon_growth_bytes": end["anon"] - start["anon"],
        "file_mapped_growth_bytes": end["file"] - start["file"],
        "peak_rss_bytes": end["peak"],
    }


def read_ahead_kb(path: Path) -> int | None:
    """The block device read-ahead of the file system holding ``path`` (it sets how much a page fault reads)."""
    device = os.stat(path).st_dev
    queue = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for candidate in (queue / "queue" / "read_ahead_kb", queue / ".." / "queue" / "read_ahead_kb"):
        if candidate.is_file():
            return int(candidate.read_text())
    return None


def evict_from_page_cache(directory: Path) -> None:
    """Drop the (clean) pages of every file under ``directory`` from the OS page cache."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def estimated_cache_bytes(samples: int, classes: int, dim: int) -> int:
    per_sample = 2 * classes + 2 * dim + 4 + 8 + 1 + 8 + 8 + 8 + 16 + 25  # fields, index, content, key bytes
    return samples * per_sample


# ------------------------------------------------------------------------------------------ build


def build(args: argparse.Namespace, root: Path) -> dict:
    rng_seed = args.seed
    timings = {"compute_s": 0.0, "last_compute_end": 0.0}

    def compute(indices: np.ndarray) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        rng = np.random.default_rng([rng_seed, int(indices[0])])
        logits = rng.standard_normal((len(indices), args.classes), dtype=np.float32)
        features = rng.standard_normal((len(indices), args.dim), dtype=np.float32)
        out = {
            "logits": logits.astype(np.float16),
            "features": features.astype(np.float16),
            "confidence": rng.random(len(indices), dtype=np.float32),
            "prediction": logits.argmax(axis=1).astype(np.int64),
            "valid": (rng.random(len(indices)) > INVALID_FRACTION).astype(np.uint8),
        }
        timings["last_compute_end"] = time.perf_counter()
        timings["compute_s"] += timings["last_compute_end"] - start
        return out

    start = time.perf_counter()
    keys = [synthetic_key(i) for i in range(args.samples)]
    keys_s = time.perf_counter() - start

    start = time.perf_counter()
    attachments = {
        "text_classifier": np.random.default_rng(rng_seed).standard_normal((args.classes, args.dim), dtype=np.float32),
        "logit_scale": np.float32(100.0),
    }
    cache = build_cache(root, identity_for(args), keys, compute, shard_size=args.shard_size, progress=True,
                        attachments=attachments)
    end = time.perf_counter()
    built = timings["compute_s"] > 0
    files = {str(p.relative_to(cache.directory)): p.stat().st_size for p in sorted(cache.directory.rglob("*.npy"))}
    return {
        "built_now": built,
        "make_key_strings_s": round(keys_s, 3),
        "build_total_s": round(end - start, 3) if built else None,
        "synthetic_compute_s": round(timings["compute_s"], 3) if built else None,
        "cache_overhead_s": round(end - start - timings["compute_s"], 3) if built else None,
        "last_shard_write_and_merge_s": round(end - timings["last_compute_end"], 3) if built else None,
        "file_bytes": files,
        "total_bytes": sum(files.values()),
    }


# ------------------------------------------------------------------------------------------ measure (child)


def query_indices(args: argparse.Namespace) -> np.ndarray:
    return np.random.default_rng(args.seed + 1).choice(args.samples, size=args.lookups, replace=False)


def measure_cache(args: argparse.Namespace) -> dict:
    picked = query_indices(args)
    query = [synthetic_key(int(i)) for i in picked]
    memory_start = memory_status()

    start = time.perf_counter()
    cache = PredictionCache.open(args.root, identity_for(args))
    open_s = time.perf_counter() - start
    memory_open = memory_status()

    start = time.perf_counter()
    rows = cache.lookup(query)
    lookup_s = time.perf_counter() - start
    if not np.array_equal(rows, picked):
        raise RuntimeError("lookup returned wrong rows")

    start = time.perf_counter()
    logits = cache.get(query, fields=["logits"])["logits"]
    get_logits_s = time.perf_counter() - start

    start = time.perf_counter()
    cache.lookup(query)
    lookup_warm_s = time.perf_counter() - start

    start = time.perf_counter()
    cache.verified("logits")
    first_full_read_check_logits_s = time.perf_counter() - start
    start = time.perf_counter()
    cache.verify()
    verify_rest_s = time.perf_counter() - start
    return {
        "open_s": open_s,
        "lookup_s": lookup_s,
        "get_logits_s": get_logits_s,
        "lookup_warm_s": lookup_warm_s,
        "checksum_logits_s": first_full_read_check_logits_s,
        "verify_remaining_files_s": verify_rest_s,
        "checked_at_open": cache.meta["checked_at_open"],
        "logits_read_shape": list(logits.shape),
        **memory_report(memory_start, memory_open),
    }


def measure_eager_baseline(args: argparse.Namespace) -> dict:
    picked = query_indices(args)
    query = [synthetic_key(int(i)) for i in picked]
    directory = cache_directory(args.root, identity_for(args))
    memory_start = memory_status()

    start = time.perf_counter()
    logits = np.load(directory / "fields" / "logits.npy")
    key_list = PredictionCache(directory).keys
    row_of = {key: row for row, key in enumerate(key_list)}
    open_s = time.perf_counter() - start
    memory_open = memory_status()

    start = time.perf_counter()
    rows = np.fromiter((row_of[key] for key in query), dtype=np.int64, count=len(query))
    lookup_s = time.perf_counter() - start
    if not np.array_equal(rows, picked):
        raise RuntimeError("baseline lookup returned wrong rows")

    start = time.perf_counter()
    rows = np.fromiter((row_of[key] for key in query), dtype=np.int64, count=len(query))
    read = logits[rows]
    get_logits_s = time.perf_counter() - start
    return {
        "open_s": open_s,
        "lookup_s": lookup_s,
        "get_logits_s": get_logits_s,
        "logits_read_shape": list(read.shape),
        **memory_report(memory_start, memory_open),
    }


def run_child(args: argparse.Namespace, root: Path, mode: str) -> dict:
    evict_from_page_cache(cache_directory(root, identity_for(args)))
    command = [
        sys.executable,
        __file__,
        f"--measure={mode}",
        f"--dir={root}",
        f"--samples={args.samples}",
        f"--classes={args.classes}",
        f"--dim={args.dim}",
        f"--seed={args.seed}",
        f"--lookups={args.lookups}",
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=IMAGENET_TRAIN_SAMPLES)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension")
    parser.add_argument("--shard-size", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=65_536, help="random keys looked up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="cache root (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the cache afterwards")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--quick", action="store_true", help="small run: 20,000 x 100 classes x 64-d, results in /tmp")
    parser.add_argument("--measure", choices=["cache", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        if args.out == RESULTS_PATH:
            args.out = Path(tempfile.gettempdir()) / "cache_lookup_quick.json"
    args.lookups = min(args.lookups, args.samples)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        args.root = args.dir
        result = measure_cache(args) if args.measure == "cache" else measure_eager_baseline(args)
        print(json.dumps(result))
        return 0

    root = args.dir or Path(tempfile.mkdtemp(prefix="zsa-cache-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    needed = 2 * estimated_cache_bytes(args.samples, args.classes, args.dim) * DISK_HEADROOM
    free = shutil.disk_usage(root).free
    if free < needed and not cache_directory(root, identity_for(args)).is_dir():
        print(
            f"not enough disk at {root}: need ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; "
            "use --dir elsewhere or fewer --samples",
            file=sys.stderr,
        )
        return 1
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "read_ahead_kb": read_ahead_kb(root),
    }
    try:
        build_result = build(args, root)
        cache = run_child(args, root, "cache")
        eager = run_child(args, root, "eager")
    finally:
        if not args.keep:
            shutil.rmtree(cache_directory(root, identity_for(args)), ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)

    result = {
        "config": {k: v for k, v in vars(args).items() if k in ("samples", "classes", "dim", "shard_size", "lookups")},
        "machine": machine,
        "page_cache": "cache files evicted (posix_fadvise DONTNEED) before each measuring process",
        "build": build_result,
        "prediction_cache": cache,
        "eager_baseline": eager,
        "ratios_eager_over_cache": {
            name: round(eager[name] / cache[name], 2) if cache[name] else None
            for name in ("open_s", "lookup_s", "get_logits_s", "anon_growth_bytes", "peak_rss_bytes")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    mib = 2**20
    print(
        f"\ncache: {args.samples:,} samples x {args.classes} classes fp16 + {args.dim}-d fp16 features, "
        f"{build_result['total_bytes'] / 2**30:.2f} GiB"
    )
    if build_result["built_now"]:
        print(
            f"build {build_result['build_total_s']:.1f} s "
            f"(synthetic compute {build_result['synthetic_compute_s']:.1f} s, "
            f"cache writes+merge {build_result['cache_overhead_s']:.1f} s)"
        )
    print(f"{'':28s}{'PredictionCache':>18s}{'eager baseline':>18s}")
    rows = [
        ("open (s)", "open_s", 1, "{:.3f}"),
        (f"lookup {args.lookups:,} keys (s)", "lookup_s", 1, "{:.3f}"),
        ("lookup + read logits (s)", "get_logits_s", 1, "{:.3f}"),
        ("private memory growth (MiB)", "anon_growth_bytes", mib, "{:.0f}"),
        ("file pages mapped (MiB)", "file_mapped_growth_bytes", mib, "{:.0f}"),
        ("peak RSS, VmHWM (MiB)", "peak_rss_bytes", mib, "{:.0f}"),
    ]
    for label, name, scale, fmt in rows:
        print(f"{label:28s}{fmt.format(cache[name] / scale):>18s}{fmt.format(eager[name] / scale):>18s}")
    print(f"first full read of the logits: checksum {cache['checksum_logits_s']:.3f} s; verify() of the other "
          f"files {cache['verify_remaining_files_s']:.3f} s")
    print(f"checked at every open: {', '.join(cache['checked_at_open'])}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
