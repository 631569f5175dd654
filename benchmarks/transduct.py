"""Training-free transduction (`zsa transduct`): accuracy on real offline data, as a teacher for `zsa adapt`,
and the cost of the kNN graph + label propagation up to ImageNet size.

Three parts (``--parts``):

1. ``accuracy``: every method (and two compositions) on `digits` (scikit-learn's 1,797 scans: 1,437 train
   / 360 test) and the real MNIST test set (../shared/data/mnist_test: 8,000 train / 2,000 held out), both
   with the bundled tiny CLIP teacher (as benchmarks/accuracy.py loads them); top-1, mean per-class recall
   and prediction imbalance per split, next to zero-shot. Parameters: the papers' defaults (TransductConfig).
2. ``adapt``: `zsa adapt` (DebiasPL, the demo preset: small CNN, 300 steps) with CLIP zero-shot as teacher
   vs the method with the best *train-split* top-1 of part 1 (chosen with the labels: a benchmark choice,
   not something a user without labels can do), over ``--seeds``; student and EMA top-1 on the test split.
   Each teacher with the paper's rule (confidence >= 0.95) and with GRIP's top-K per predicted class, K set
   so the labeled set has the size CLIP's threshold gives: label propagation's smoothed probabilities
   rarely reach 0.95: an empty labeled set is refused by `zsa adapt`, and recorded as refused here.
3. ``scale``: synthetic L2-normalised features (``--classes`` Gaussian clusters, ``--dim`` dims, stored as a
   float16 memory map like the cache) at ``--sizes``; per size, in a fresh process each: the kNN graph
   (k = 5) by exact search (up to ``--exact-up-to``) and by IVF (SQ8, nprobe 32), their recall@k against
   brute force on ``--recall-queries`` sampled queries, label propagation (alpha 0.99, gamma 3) on the
   default index's graph, wall time and peak resident memory (which includes the memory-mapped feature
   pages the process touched: file-backed and reclaimable).

    python benchmarks/transduct.py --quick          # minutes: 1 seed, tiny adapt budget, sizes 2k-20k
    python benchmarks/transduct.py                  # full: 3 seeds, demo budget, 10k / 100k / 1.28M x 1024

Writes benchmarks/results/transduct.json and transduct.md (the README's table); ``--quick`` writes to
benchmarks/out/ instead, so a quick run never replaces the real results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from accuracy import MNIST_DIR, _targets
from common import RESULTS_DIR, command_line, load_average, timestamp

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
DATASETS = ("digits", "mnist")
METHODS = ("zeroshot", "debias", "prior-em", "sinkhorn", "label-propagation", "transclip",
           "label-propagation,sinkhorn", "transclip,sinkhorn")
FULL_SIZES = (10_000, 100_000, 1_280_000)
QUICK_SIZES = (2_000, 10_000, 20_000)
QUICK_ADAPT = ["optim.epochs=1", "optim.steps_per_epoch=5"]
SCALE_K = 5  # label propagation's default k (ZLaP)
NOISE_RATE = 0.4  # synthetic zero-shot labels: this share is wrong
CLUSTER_NOISE = 1.0  # per-sample noise norm relative to the unit cluster centre (within-cluster cosine ~0.5)
GENERATE_ROWS = 65_536
MB = 1 << 20


# ----------------------------------------------------------------------------- part 1: accuracy


def _config(dataset: str, *extra: str, cache_dir: str | None = None):
    from zeroshot_adapt import pipeline

    overrides = [*_targets()[dataset].overrides, *extra]
    if cache_dir:
        overrides.append(f"teacher.cache_dir={cache_dir}")
    return pipeline.resolve_config(dataset, overrides=overrides)


def accuracy_part(datasets: list[str], cache_dir: str | None) -> dict[str, Any]:
    """Per dataset and split: each method's metrics (computed here, not read from the derived store, so the
    timings are real)."""
    from zeroshot_adapt import pipeline
    from zeroshot_adapt.reports.metrics import classification_report
    from zeroshot_adapt.transduct import TransductInputs, refine
    from zeroshot_adapt.transduct.knn import KnnSettings

    results: dict[str, Any] = {}
    for dataset in datasets:
        config = _config(dataset, cache_dir=cache_dir)
        results[dataset] = {}
        for split in ("train", "test"):
            preds = pipeline.teacher_predictions(config, split)
            valid = preds.valid
            positions = np.flatnonzero(valid)
            labels = np.asarray(preds.table.labels)[valid]
            classes = list(preds.prompts.classes)
            zeroshot = pipeline.zeroshot_probabilities(preds, positions)
            rows = {}
            for method in METHODS:
                inputs = TransductInputs(features=pipeline.feature_source(preds, positions),
                                         text_classifier=preds.text_classifier,
                                         knn=KnnSettings.from_config(config.transduct))
                start = time.perf_counter()
                refined = refine(zeroshot, method, config.transduct, inputs).probabilities
                seconds = time.perf_counter() - start
                prediction = preds.prediction[valid] if method == "zeroshot" else refined.argmax(1)
                report = classification_report(refined, prediction, labels, classes)
                rows[method] = {key: report[key] for key in ("top1", "mean_per_class_recall", "imbalance_ratio",
                                                             "num_classes_never_predicted", "prediction_counts")}
                rows[method]["seconds"] = round(seconds, 3)
                print(f"{dataset}/{split} {method:28s} top-1 {100 * report['top1']:.2f}  "
                      f"mpcr {100 * report['mean_per_class_recall']:.2f}  {seconds:.2f} s", flush=True)
            results[dataset][split] = {"num_samples": int(len(positions)), "methods": rows}
    return results


# ----------------------------------------------------------------------------- part 2: adapt


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def balanced_quota(dataset: str, cache_dir: str | None) -> int:
    """Samples per class for the top-K rule: as many in total as CLIP's tau_clip 0.95 threshold keeps, so both
    rules give the student a labeled set of the same size (rounded; at least 1)."""
    from zeroshot_adapt import pipeline

    config = _config(dataset, cache_dir=cache_dir)
    preds = pipeline.teacher_predictions(config, "train")
    kept = int(((preds.confidence >= np.float32(config.pseudo.tau_clip)) & preds.valid).sum())
    return max(1, round(kept / len(preds.prompts.classes)))


def adapt_part(datasets: list[str], accuracy: dict[str, Any], seeds: list[int], extra: list[str],
               cache_dir: str | None, runs_dir: Path, rules: list[str]) -> dict[str, Any]:
    """`zsa adapt` with CLIP zero-shot and with the best method as teacher, each with the paper's threshold
    rule and with GRIP's top-K rule (K per class = CLIP's threshold count / C)."""
    from zeroshot_adapt import pipeline
    from zeroshot_adapt.errors import UserError

    results: dict[str, Any] = {}
    for dataset in datasets:
        methods = accuracy[dataset]["train"]["methods"]
        best = max((m for m in methods if m != "zeroshot"), key=lambda m: methods[m]["top1"])
        quota = balanced_quota(dataset, cache_dir)
        results[dataset] = {"best_method": best, "per_class": quota, "runs": {}}
        for teacher in ("zeroshot", best):
            for rule in rules:
                selection = [] if rule == "threshold" else ["pseudo.select=topk", f"pseudo.per_class={quota}"]
                name = f"{teacher} / {'tau_clip 0.95' if rule == 'threshold' else f'top-{quota} per class'}"
                runs = []
                refused = None
                for seed in seeds:
                    config = _config(dataset, f"transduct.method={teacher}", f"seed={seed}", *selection, *extra,
                                     cache_dir=cache_dir)
                    run_dir = runs_dir / dataset / f"{teacher.replace(',', '+')}-{rule}-seed{seed}"
                    start = time.perf_counter()
                    try:
                        report = pipeline.adapt(replace(config, run_dir=str(run_dir)))
                    except UserError as error:  # an empty labeled set is refused; it is the same for every seed
                        if "labeled set is empty" not in str(error):
                            raise
                        refused = str(error).splitlines()[0]
                        print(f"adapt {dataset} {name}: refused: {refused}", flush=True)
                        break
                    runs.append({"seed": seed, "seconds": round(time.perf_counter() - start, 1),
                                 "labeled_set": report["labeled_set"]["size"],
                                 "student_top1": report["student"]["top1"], "ema_top1": report["ema"]["top1"],
                                 "student_mean_per_class_recall": report["student"]["mean_per_class_recall"]})
                    print(f"adapt {dataset} {name} seed={seed}: labeled {runs[-1]['labeled_set']}, student "
                          f"{100 * runs[-1]['student_top1']:.2f}, EMA {100 * runs[-1]['ema_top1']:.2f}", flush=True)
                if refused is not None:
                    results[dataset]["runs"][name] = {"teacher": teacher, "rule": rule, "refused": refused}
                    continue
                results[dataset]["runs"][name] = {
                    "teacher": teacher, "rule": rule, "runs": runs,
                    **{key: _mean_std([r[key] for r in runs])
                       for key in ("labeled_set", "student_top1", "ema_top1", "student_mean_per_class_recall")},
                }
    return results


# ----------------------------------------------------------------------------- part 3: scale


def generate_features(path: Path, num: int, dim: int, classes: int, seed: int = 0) -> np.ndarray:
    """Write ``num`` x ``dim`` float16 unit vectors around ``classes`` random centres to ``path`` (.npy, in
    chunks); return the cluster label of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, classes, num)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(num, dim))
    for start in range(0, num, GENERATE_ROWS):
        stop = min(start + GENERATE_ROWS, num)
        block = centres[labels[start:stop]] + CLUSTER_NOISE / math.sqrt(dim) * rng.standard_normal((stop - start, dim))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    return labels


def _peak_rss_mb() -> float:
    """This process's peak resident memory (MiB). VmHWM belongs to the process's own address space; getrusage's
    ru_maxrss would also count the parent's memory at fork time."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def brute_force_neighbours(features: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """Exact k nearest other rows of each query row index ([Q, k]), scanning the memory map in chunks."""
    query_vectors = np.asarray(features[queries], dtype=np.float32)
    best_sim = np.full((len(queries), k + 1), -np.inf, dtype=np.float32)
    best_idx = np.full((len(queries), k + 1), -1, dtype=np.int64)
    for start in range(0, len(features), chunk):
        block = np.asarray(features[start : start + chunk], dtype=np.float32)
        sims = query_vectors @ block.T
        idx = np.broadcast_to(np.arange(start, start + len(block)), sims.shape)
        all_sim = np.concatenate([best_sim, sims], axis=1)
        all_idx = np.concatenate([best_idx, idx], axis=1)
        top = np.argpartition(-all_sim, k, axis=1)[:, : k + 1]
        best_sim = np.take_along_axis(all_sim, top, axis=1)
        best_idx = np.take_along_axis(all_idx, top, axis=1)
    order = np.argsort(-best_sim, axis=1, kind="stable")
    best_idx = np.take_along_axis(best_idx, order, axis=1)
    is_self = best_idx == queries[:, None]
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(best_idx, keep, axis=1)


def scale_worker(args: argparse.Namespace) -> int:
    """One (size, index) measurement in this fresh process; prints one JSON line."""
    from zeroshot_adapt.transduct import FeatureSource, KnnSettings, knn_graph
    from zeroshot_adapt.transduct.base import softmax
    from zeroshot_adapt.transduct.knn import recall_at_k
    from zeroshot_adapt.transduct.label_propagation import label_propagation

    baseline = _peak_rss_mb()
    features = np.load(args.features, mmap_mode="r")
    labels = np.load(args.labels)
    num = len(features)
    settings = KnnSettings(exact_max_samples=num if args.mode == "exact" else 0, memory_mb=args.memory_mb)
    start = time.perf_counter()
    graph = knn_graph(FeatureSource.from_array(features), SCALE_K, settings)
    graph_seconds = time.perf_counter() - start
    graph_rss = _peak_rss_mb()
    queries = np.sort(np.random.default_rng(1).choice(num, size=min(args.recall_queries, num), replace=False))
    start = time.perf_counter()
    exact = brute_force_neighbours(features, queries, SCALE_K)
    recall_seconds = time.perf_counter() - start
    entry: dict[str, Any] = {
        "size": num, "dim": int(features.shape[1]), "mode": args.mode, "index": graph.plan.factory,
        "nprobe": graph.plan.nprobe or None, "k": SCALE_K, "graph_seconds": round(graph_seconds, 2),
        f"recall_at_{SCALE_K}": round(recall_at_k(graph.indices[queries], exact), 4),
        "recall_queries": len(queries), "brute_force_seconds_for_recall": round(recall_seconds, 2),
        "baseline_rss_mb": round(baseline), "peak_rss_after_graph_mb": round(graph_rss),
    }
    if args.propagate:
        rng = np.random.default_rng(2)
        classes = int(labels.max()) + 1
        noisy = np.where(rng.random(num) < NOISE_RATE, rng.integers(0, classes, num), labels)
        logits = 3.0 * np.eye(classes, dtype=np.float32)[noisy] + rng.standard_normal((num, classes), np.float32)
        probabilities = softmax(logits)
        del logits
        start = time.perf_counter()
        refined = label_propagation(probabilities, graph, alpha=0.99, gamma=3.0, memory_mb=args.memory_mb)
        entry["propagation_seconds"] = round(time.perf_counter() - start, 2)
        entry["classes"] = classes
        entry["zeroshot_top1"] = round(float((probabilities.argmax(1) == labels).mean()), 4)
        entry["propagated_top1"] = round(float((refined.argmax(1) == labels).mean()), 4)
    entry["peak_rss_mb"] = round(_peak_rss_mb())
    entry["features_file_mb"] = round(os.path.getsize(args.features) / MB)
    print("RESULT " + json.dumps(entry), flush=True)
    return 0


def scale_part(sizes: list[int], dim: int, classes: int, exact_up_to: int, recall_queries: int, memory_mb: int,
               work_dir: Path | None) -> list[dict[str, Any]]:
    from zeroshot_adapt.transduct.knn import KnnSettings, plan_index

    results = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="transduct-scale-") as scratch:
        for size in sizes:
            features, labels = Path(scratch) / f"features-{size}.npy", Path(scratch) / f"labels-{size}.npy"
            start = time.perf_counter()
            np.save(labels, generate_features(features, size, dim, classes))
            print(f"scale {size} x {dim}: features written in {time.perf_counter() - start:.1f} s", flush=True)
            default_exact = plan_index(size, dim, KnnSettings(memory_mb=memory_mb)).exact
            modes = (["exact"] if size <= exact_up_to else []) + ["ivf"]
            for mode in modes:
                command = [sys.executable, __file__, "--scale-worker", "--mode", mode, "--features", str(features),
                           "--labels", str(labels), "--recall-queries", str(recall_queries),
                           "--memory-mb", str(memory_mb)]
                if (mode == "exact") == default_exact:
                    command.append("--propagate")  # propagation on the graph the default settings would build
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    entry = {"size": size, "mode": mode, "error": (done.stderr or done.stdout)[-2000:]}
                else:
                    entry = json.loads(lines[-1][len("RESULT "):])
                    entry["default_index"] = (mode == "exact") == default_exact
                results.append(entry)
                print(f"scale {json.dumps(entry)}", flush=True)
            features.unlink()
    return results


def _power_law(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(c, p) of t = c N^p fitted in log space (p fixed to 2 with a single point)."""
    if len(points) == 1:
        (n, t), = points
        return t / n**2, 2.0
    slope, intercept = np.polyfit(np.log([n for n, _ in points]), np.log([t for _, t in points]), 1)
    return float(np.exp(intercept)), float(slope)


def crossover(scale: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fit t = c N^p to the exact and to the IVF graph times; the size where the two curves cross."""
    times = {mode: [(e["size"], e["graph_seconds"]) for e in scale if e.get("mode") == mode and "graph_seconds" in e]
             for mode in ("exact", "ivf")}
    if not times["exact"] or not times["ivf"]:
        return None
    (c_exact, p_exact), (c_ivf, p_ivf) = _power_law(times["exact"]), _power_law(times["ivf"])
    entry: dict[str, Any] = {"exact_fit": {"c": c_exact, "p": round(p_exact, 3)},
                             "ivf_fit": {"c": c_ivf, "p": round(p_ivf, 3)}, "crossover_size": None}
    if p_exact > p_ivf:
        entry["crossover_size"] = round((c_ivf / c_exact) ** (1.0 / (p_exact - p_ivf)))
    return entry


# ----------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    lines = [f"<!-- written by: {results['command']} -->", ""]
    accuracy = results.get("accuracy")
    if accuracy:
        lines += ["Top-1 / mean per-class recall (%) of each training-free method, bundled tiny CLIP teacher "
                  "(`zsa-tiny-digits`), papers' default parameters:", "",
                  "| method | " + " | ".join(f"{d} {s}" for d in accuracy for s in ("train", "test")) + " |",
                  "|---|" + "---|" * (2 * len(accuracy))]
        for method in METHODS:
            cells = []
            for dataset in accuracy:
                for split in ("train", "test"):
                    row = accuracy[dataset][split]["methods"][method]
                    cells.append(f"{100 * row['top1']:.1f} / {100 * row['mean_per_class_recall']:.1f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    adapt = results.get("adapt")
    if adapt:
        lines += ["`zsa adapt` (DebiasPL) on the test split, mean ± std over seeds "
                  f"{results['settings']['seeds']}, with CLIP zero-shot vs the best method as teacher:", "",
                  "| dataset | teacher / labeled-set rule | labeled set | student top-1 | EMA top-1 | "
                  "student mean per-class recall |",
                  "|---|---|---|---|---|---|"]
        for dataset, entry in adapt.items():
            for name, row in entry["runs"].items():
                if "refused" in row:
                    reason = row["refused"].split(":")[0]
                    lines.append(f"| {dataset} | {name} | 0 | refused: {reason} (none >= 0.95) | | |")
                    continue
                cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['std']:.1f}"
                         for k in ("student_top1", "ema_top1", "student_mean_per_class_recall")]
                lines.append(f"| {dataset} | {name} | {row['labeled_set']['mean']:.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    scale = results.get("scale")
    if scale:
        lines += [f"kNN graph (k={SCALE_K}) + label propagation on synthetic unit features "
                  f"(dim {results['settings']['dim']}, {results['settings']['classes']} clusters), "
                  f"{os.cpu_count()} CPU cores:", "",
                  f"| size | index | graph s | recall@{SCALE_K} | propagation s | peak RSS MB | features MB |",
                  "|---|---|---|---|---|---|---|"]
        for e in scale:
            if "error" in e:
                lines.append(f"| {e['size']} | {e['mode']} | failed | | | | |")
                continue
            lines.append(f"| {e['size']:,} | {e['index']}{'' if e['nprobe'] is None else ' nprobe ' + str(e['nprobe'])}"
                         f"{' (default)' if e.get('default_index') else ''} | {e['graph_seconds']} | "
                         f"{e[f'recall_at_{SCALE_K}']} | {e.get('propagation_seconds', '')} | {e['peak_rss_mb']} | "
                         f"{e['features_file_mb']} |")
        if results.get("crossover"):
            fit = results["crossover"]
            lines += ["", f"Graph time fits: exact ~ N^{fit['exact_fit']['p']}, IVF ~ N^{fit['ivf_fit']['p']}; "
                          f"they cross at about {fit['crossover_size'] or 'n/a'} samples."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny adapt budget, small scale sizes")
    parser.add_argument("--parts", nargs="+", default=["accuracy", "adapt", "scale"],
                        choices=("accuracy", "adapt", "scale"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra adapt overrides")
    parser.add_argument("--adapt-rules", nargs="+", default=["threshold", "topk"], choices=("threshold", "topk"),
                        help="labeled-set rules of the adapt part (default both)")
    parser.add_argument("--cache-dir", help="teacher cache root (default: the config's)")
    parser.add_argument("--sizes", nargs="+", type=int)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--exact-up-to", type=int, default=100_000, help="largest size also run with exact search")
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--memory-mb", type=int, default=4096, help="transduct.knn_memory_mb of the scale runs")
    parser.add_argument("--work-dir", help="where the synthetic feature files go (default: the system temp dir)")
    parser.add_argument("--out", help="results JSON (default results/transduct.json; --quick: out/...quick.json)")
    # internal: one scale measurement in a fresh process
    parser.add_argument("--scale-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("exact", "ivf"), help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--labels", help=argparse.SUPPRESS)
    parser.add_argument("--propagate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale_worker:
        return scale_worker(args)

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    sizes = args.sizes or list(QUICK_SIZES if args.quick else FULL_SIZES)
    out = Path(args.out) if args.out else (OUT_DIR / "transduct_quick.json" if args.quick
                                           else RESULTS_DIR / "transduct.json")
    if "mnist" in args.datasets and not MNIST_DIR.is_dir():
        print(f"MNIST test set not found at {MNIST_DIR}; run with --datasets digits", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "command": command_line(), "time": timestamp(), "quick": args.quick, "cpu_count": os.cpu_count(),
        "load_average_at_start": load_average(),
        "settings": {"seeds": seeds, "sizes": sizes, "dim": args.dim, "classes": args.classes,
                     "adapt_overrides": (QUICK_ADAPT if args.quick else []) + args.overrides,
                     "memory_mb": args.memory_mb},
    }
    if "accuracy" in args.parts or "adapt" in args.parts:
        results["accuracy"] = accuracy_part(args.datasets, args.cache_dir)
    if "adapt" in args.parts:
        results["adapt"] = adapt_part(args.datasets, results["accuracy"], seeds,
                                      results["settings"]["adapt_overrides"], args.cache_dir,
                                      OUT_DIR / ("transduct_quick" if args.quick else "transduct") / "adapt",
                                      args.adapt_rules)
    if "scale" in args.parts:
        results["scale"] = scale_part(sizes, args.dim, args.classes, args.exact_up_to, args.recall_queries,
                                      args.memory_mb, Path(args.work_dir) if args.work_dir else None)
        results["crossover"] = crossover(results["scale"])
    results["load_average_at_end"] = load_average()
    from zeroshot_adapt.reports.metrics import write_json

    write_json(results, out)
    text = markdown(results)
    from zeroshot_adapt.fileio import atomic_write_text

    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
