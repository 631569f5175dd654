"""CLIP zero-shot vs FixMatch vs DebiasPL, adapted on real offline data, over several seeds.

Targets: `digits` (scikit-learn's 1,797 handwritten scans; 1,437 unlabeled train / 360 test) and the real
MNIST test set (10,000 images from ../shared/data/mnist_test, split 8,000 unlabeled / 2,000 held out).
Teacher: the bundled tiny CLIP (`zsa-tiny-digits`, trained only on rendered font digits). Student and
budget: the digits demo preset (small CNN, 16 px, 300 steps) unless overridden with --set.

    python benchmarks/accuracy.py                      # 2 datasets x 2 algorithms x 3 seeds
    python benchmarks/accuracy.py --datasets digits --seeds 0 --set optim.epochs=2

Writes benchmarks/results/accuracy.json (every run's report plus mean/std) and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
MNIST_DIR = HERE.parent.parent / "shared" / "data" / "mnist_test"

def _overrides(dataset: str) -> list[str]:
    """digits uses its own preset; MNIST gets the same teacher, student and budget (the digits preset),
    with the tiny teacher's own prompt file."""
    from zeroshot_adapt.data.registry import DIGITS_DEMO

    if dataset == "digits":
        return []
    return [*(f"{k}={v}" for k, v in DIGITS_DEMO.items()), f"data.data_dir={MNIST_DIR}", "teacher.prompts=digits"]


DATASETS = ("digits", "mnist")


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--algorithms", nargs="+", default=["fixmatch", "debiaspl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs-dir", default=str(HERE / "out" / "accuracy"))
    parser.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the --out JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return 0

    from zeroshot_adapt import pipeline

    if "mnist" in args.datasets and not MNIST_DIR.is_dir():
        print(f"MNIST test set not found at {MNIST_DIR}; run with --datasets digits", file=sys.stderr)
        return 2
    results: dict = {"command": " ".join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])]),
                     "runs": [], "summary": {}}
    for dataset in args.datasets:
        for algorithm in args.algorithms:
            for seed in args.seeds:
                config = pipeline.resolve_config(
                    dataset, overrides=[*_overrides(dataset), f"algorithm.name={algorithm}", f"seed={seed}",
                                        *args.overrides],
                )
                run_dir = Path(args.runs_dir) / dataset / f"{algorithm}-seed{seed}"
                config = replace(config, run_dir=str(run_dir))
                start = time.perf_counter()
                report = pipeline.adapt(config)
                history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                last = history[-1]
                results["runs"].append({
                    "dataset": dataset, "algorithm": algorithm, "seed": seed,
                    "seconds": round(time.perf_counter() - start, 1),
                    "clip_zeroshot_top1": report["clip_zeroshot"]["top1"],
                    "student_top1": report["student"]["top1"], "ema_top1": report["ema"]["top1"],
                    "student_mean_per_class_recall": report["student"]["mean_per_class_recall"],
                    "labeled_set": report["labeled_set"]["size"],
                    "last_epoch_pseudo_label_imbalance": last["pseudo_label_imbalance"],
                    "last_epoch_pseudo_label_classes_empty": last["pseudo_label_classes_empty"],
                    "last_epoch_mask_ratio": last.get("mask_ratio"),
                    "last_epoch_pseudo_label_counts": last["pseudo_label_counts"],
                })
                print(json.dumps(results["runs"][-1]), flush=True)
                _write(results, args.out)
    for dataset in args.datasets:
        runs = [r for r in results["runs"] if r["dataset"] == dataset]
        summary = {"clip_zeroshot_top1": _mean_std([runs[0]["clip_zeroshot_top1"]])}
        for algorithm in args.algorithms:
            mine = [r for r in runs if r["algorithm"] == algorithm]
            summary[algorithm] = {
                key: _mean_std([r[key] for r in mine])
                for key in ("student_top1", "ema_top1", "student_mean_per_class_recall")
            }
            imbalance = [r["last_epoch_pseudo_label_imbalance"] for r in mine]
            summary[algorithm]["last_epoch_pseudo_label_imbalance"] = imbalance
        results["summary"][dataset] = summary
    _write(results, args.out)
    plot(results, Path(args.out).with_suffix(".png"))
    print(json.dumps(results["summary"], indent=1))
    return 0


def plot(results: dict, path: Path) -> Path:
    """Bars of mean top-1 (%) per dataset: CLIP zero-shot and each algorithm's EMA teacher."""
    from zeroshot_adapt.reports.plots import plot_accuracy_bars

    table = {
        dataset: {
            "CLIP zero-shot": 100 * s["clip_zeroshot_top1"]["mean"],
            **{f"{a} (EMA)": 100 * v["ema_top1"]["mean"] for a, v in s.items() if a != "clip_zeroshot_top1"},
        }
        for dataset, s in results["summary"].items()
    }
    return plot_accuracy_bars(table, path, title="top-1 %, mean over seeds (benchmarks/accuracy.py)")


def _write(results: dict, path: str) -> None:
    from zeroshot_adapt.reports.metrics import write_json

    write_json(results, path)


if __name__ == "__main__":
    sys.exit(main())
