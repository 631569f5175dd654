"""CLIP zero-shot vs FixMatch vs DebiasPL, and the paper's three extras one by one, adapted on real offline data.

Targets: `digits` (scikit-learn's 1,797 handwritten scans; 1,437 unlabeled train / 360 test) and the real
MNIST test set (10,000 images from ../shared/data/mnist_test, split 8,000 unlabeled / 2,000 held out).
Teacher: the bundled tiny CLIP (`zsa-tiny-digits`, trained only on rendered font digits). Student and
budget: the digits demo preset (small CNN, 16 px, 300 steps) unless overridden with --set.

Variants are a table (VARIANTS: a name, a base variant it is compared with, and config overrides): FixMatch
and DebiasPL with the fast recipe ("base"), then with each of the official run's extras added alone —
multi-view (2 weak + 2 strong views), CLIP fill (threshold 0.3, the paper's T-ZSL value), CLD (0.3, argmax
groups) — and with all three (the paper recipe's extras). Each variant is reported as mean +- std over seeds,
and its effect as the paired difference to its base (same seed, same data, same init) with its std.

    python benchmarks/accuracy.py                      # 2 datasets x 10 variants x 3 seeds
    python benchmarks/accuracy.py --datasets digits    # the component study on digits only
    python benchmarks/accuracy.py --quick              # 1 seed, 20 steps, digits: a smoke test, NOT results
    python benchmarks/accuracy.py --students           # CLIP as the student vs the small CNN, FixMatch / DebiasPL

--students compares students instead (STUDENT_VARIANTS): the small CNN student and CLIP itself as the student
(student.arch=clip: the tiny CLIP's image encoder with its zero-shot head, every weight trained, lr --clip-lr),
each with FixMatch and DebiasPL, same step budget and seeds; the effect column is CLIP student minus CNN student
(paired by seed). Every run also records the report's label-free diagnostics per model ("label_free": clip_zeroshot,
student, ema) where the report has them, beside the true accuracy.

Writes benchmarks/results/accuracy.json (every run's report plus the summary), accuracy.md (the table) and
accuracy.png (--students: accuracy_students.*); --quick writes to benchmarks/out/ instead, so it never overwrites
the real results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MNIST_DIR = HERE.parent.parent / "shared" / "data" / "mnist_test"
QUICK_OVERRIDES = ["optim.epochs=2", "optim.steps_per_epoch=10", "optim.warmup_epochs=0"]


def _paper_extras() -> dict[str, dict[str, Any]]:
    """The official run's three extras with the paper recipe's values (config.RECIPES, T-ZSL mode)."""
    from zeroshot_adapt.config import RECIPES

    paper = RECIPES["paper"]["tzsl"]
    return {
        "multiview": {"algorithm.multiview": paper["algorithm.multiview"]},
        "clip_fill": {"algorithm.clip_fill_threshold": paper["algorithm.clip_fill_threshold"]},
        "cld": {"algorithm.lambda_cld": paper["algorithm.lambda_cld"],
                "algorithm.cld_grouping": paper["algorithm.cld_grouping"]},
    }


@dataclass(frozen=True)
class Variant:
    """One row of the study: config overrides on top of the dataset preset (the fast recipe), and the variant
    its paired effect is measured against (None: a base)."""

    name: str
    overrides: dict[str, Any]
    base: str | None = None
    notes: str = ""


def _variants() -> list[Variant]:
    extras = _paper_extras()
    everything = {k: v for extra in extras.values() for k, v in extra.items()}
    rows = []
    for algorithm in ("fixmatch", "debiaspl"):
        base = {"recipe": "fast", "algorithm.name": algorithm}
        rows.append(Variant(algorithm, base))
        rows += [Variant(f"{algorithm}+{name}", {**base, **extra}, base=algorithm) for name, extra in extras.items()]
        rows.append(Variant(f"{algorithm}+all", {**base, **everything}, base=algorithm,
                            notes="multi-view + CLIP fill + CLD (the paper recipe's extras)"))
    return rows


VARIANTS: list[Variant] = _variants()
"""Other studies append rows here (e.g. a CLIP student: {"student.arch": ...}); `base` names the comparison."""

CLIP_STUDENT_LR = 1e-3
"""lr of the CLIP student in --students: fine-tuning a pretrained encoder; the demo's 0.03 (a CNN trained from
scratch) wrecks the zero-shot start within a few steps (tests/test_clip_student.py)."""


def student_variants(clip_lr: float = CLIP_STUDENT_LR) -> list[Variant]:
    """--students: the demo CNN student and CLIP as the student, each with FixMatch and DebiasPL (fast recipe);
    a CLIP row's base is the CNN row of the same algorithm."""
    rows = []
    for algorithm in ("fixmatch", "debiaspl"):
        base = {"recipe": "fast", "algorithm.name": algorithm}
        rows.append(Variant(f"cnn+{algorithm}", base))
        rows.append(Variant(f"clip+{algorithm}", {**base, "student.arch": "clip", "optim.lr": clip_lr},
                            base=f"cnn+{algorithm}", notes="CLIP's image encoder + zero-shot head, clip_train all"))
    return rows


@dataclass(frozen=True)
class Target:
    name: str
    dataset: str
    overrides: list[str] = field(default_factory=list)
    needs: Path | None = None


def _targets() -> dict[str, Target]:
    """digits uses its own preset; MNIST gets the same teacher, student and budget (the digits preset) with the
    tiny teacher's own prompt file."""
    from zeroshot_adapt.data.registry import DIGITS_DEMO

    mnist = [*(f"{k}={v}" for k, v in DIGITS_DEMO.items()), f"data.data_dir={MNIST_DIR}", "teacher.prompts=digits"]
    return {"digits": Target("digits", "digits"), "mnist": Target("mnist", "mnist", mnist, needs=MNIST_DIR)}


DATASETS = ("digits", "mnist")
METRICS = ("student_top1", "ema_top1", "student_mean_per_class_recall")


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def _overrides_list(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={'null' if v is None else json.dumps(v) if isinstance(v, str) else v}" for k, v in overrides.items()]


def run_one(target: Target, variant: Variant, seed: int, extra: list[str], runs_dir: Path) -> dict[str, Any]:
    from zeroshot_adapt import pipeline

    config = pipeline.resolve_config(
        target.dataset,
        overrides=[*target.overrides, *_overrides_list(variant.overrides), f"seed={seed}", *extra],
    )
    run_dir = runs_dir / target.name / f"{variant.name}-seed{seed}"
    config = replace(config, run_dir=str(run_dir))
    start = time.perf_counter()
    report = pipeline.adapt(config)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    return {
        "dataset": target.name, "variant": variant.name, "base": variant.base, "seed": seed,
        "overrides": variant.overrides, "method": report.get("method"),
        "seconds": round(time.perf_counter() - start, 1),
        "clip_zeroshot_top1": report["clip_zeroshot"]["top1"],
        "student_top1": report["student"]["top1"], "ema_top1": report["ema"]["top1"],
        "student_mean_per_class_recall": report["student"]["mean_per_class_recall"],
        "labeled_set": report["labeled_set"]["size"],
        "last_epoch_mask_ratio": last.get("mask_ratio"),
        "last_epoch_fill_ratio": last.get("fill_ratio"),
        "last_epoch_loss_cld": last.get("loss_cld"),
        "last_epoch_pseudo_label_imbalance": last["pseudo_label_imbalance"],
        "last_epoch_pseudo_label_classes_empty": last["pseudo_label_classes_empty"],
        "last_epoch_pseudo_label_counts": last["pseudo_label_counts"],
        **({"label_free": label_free} if (label_free := _label_free(report)) else {}),
    }


def _label_free(report: dict[str, Any]) -> dict[str, Any]:
    """The report's label-free diagnostics (reports/label_free.py) per model, where it has them:
    {"clip_zeroshot" | "student" | "ema": {...}} (and "run" for a top-level entry)."""
    found = {key: report[key]["label_free"] for key in ("clip_zeroshot", "student", "ema")
             if isinstance(report.get(key), dict) and isinstance(report[key].get("label_free"), dict)}
    if isinstance(report.get("label_free"), dict):
        found["run"] = report["label_free"]
    return found


def summarize(runs: list[dict[str, Any]], variants: list[Variant]) -> dict[str, Any]:
    """Per dataset and variant: mean / std of each metric; for a variant with a base, the paired differences."""
    summary: dict[str, Any] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == dataset]
        entry: dict[str, Any] = {"clip_zeroshot_top1": mine[0]["clip_zeroshot_top1"], "variants": {}}
        for variant in variants:
            rows = {r["seed"]: r for r in mine if r["variant"] == variant.name}
            if not rows:
                continue
            stats: dict[str, Any] = {k: _mean_std([r[k] for r in rows.values()]) for k in METRICS}
            stats["seeds"] = sorted(rows)
            base = {r["seed"]: r for r in mine if r["variant"] == variant.base}
            paired = sorted(set(rows) & set(base))
            if variant.base is not None and paired:
                for key in ("student_top1", "ema_top1"):
                    stats[f"{key}_minus_{variant.base}"] = _mean_std([rows[s][key] - base[s][key] for s in paired])
            entry["variants"][variant.name] = stats
        summary[dataset] = entry
    return summary


def markdown(summary: dict[str, Any]) -> str:
    def pct(stat: dict[str, Any]) -> str:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"

    def delta(stat: dict[str, Any] | None) -> str:
        return "—" if stat is None else f"{100 * stat['mean']:+.1f} ± {100 * stat['std']:.1f}"

    lines = []
    for dataset, entry in summary.items():
        lines += [f"### {dataset} (CLIP zero-shot {100 * entry['clip_zeroshot_top1']:.1f}%)", "",
                  "| variant | seeds | student top-1 | EMA top-1 | effect on student top-1 (paired, vs base) "
                  "| effect on EMA top-1 (paired, vs base) |",
                  "|---|---|---|---|---|---|"]
        for name, stats in entry["variants"].items():
            effects = [next((v for k, v in stats.items() if k.startswith(f"{key}_minus_")), None)
                       for key in ("student_top1", "ema_top1")]
            lines.append(f"| {name} | {len(stats['seeds'])} | {pct(stats['student_top1'])} | "
                         f"{pct(stats['ema_top1'])} | {delta(effects[0])} | {delta(effects[1])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=None, choices=DATASETS)
    parser.add_argument("--variants", nargs="+", default=None,
                        choices=[v.name for v in (*VARIANTS, *student_variants())])
    parser.add_argument("--students", action="store_true",
                        help="compare CLIP as the student with the small CNN student (FixMatch, DebiasPL)")
    parser.add_argument("--clip-lr", type=float, default=CLIP_STUDENT_LR, help="--students: the CLIP student's lr")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 20 steps, digits, results under benchmarks/out/ (a smoke test, not results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs-dir", default=None,
                        help="run directories (default out/accuracy[_students][_quick]: a quick run never meets a "
                             "full run's directory, whose config differs)")
    parser.add_argument("--out", default=None, help="results JSON (default results/accuracy.json; quick: out/)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot and table from the --out JSON")
    args = parser.parse_args(argv)
    datasets = args.datasets or (["digits"] if args.quick else list(DATASETS))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    extra = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    stem = "accuracy_students" if args.students else "accuracy"
    out = Path(args.out or (HERE / "out" / f"{stem}_quick.json" if args.quick else HERE / "results" / f"{stem}.json"))
    runs_dir = Path(args.runs_dir or HERE / "out" / (stem + ("_quick" if args.quick else "")))
    table = student_variants(args.clip_lr) if args.students else VARIANTS
    variants = [v for v in table if args.variants is None or v.name in args.variants]
    if not variants:
        parser.error(f"none of --variants {args.variants} is in the {'--students ' if args.students else ''}table: "
                     f"{', '.join(v.name for v in table)}")
    if args.replot:
        results = json.loads(out.read_text())
        _finish(results, out)
        return 0

    targets = _targets()
    for name in datasets:
        if targets[name].needs is not None and not targets[name].needs.is_dir():
            print(f"{name}: data not found at {targets[name].needs}; run with --datasets digits", file=sys.stderr)
            return 2
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "extra_overrides": extra, "runs": [], "summary": {},
    }
    for name in datasets:
        for variant in variants:
            for seed in seeds:
                results["runs"].append(run_one(targets[name], variant, seed, extra, runs_dir))
                print(json.dumps({k: results["runs"][-1][k] for k in ("dataset", "variant", "seed", "ema_top1")}),
                      flush=True)
                results["summary"] = summarize(results["runs"], variants)
                _write(results, out)
    _finish(results, out)
    print(markdown(results["summary"]))
    return 0


def _finish(results: dict[str, Any], out: Path) -> None:
    from zeroshot_adapt.fileio import atomic_write_text

    _write(results, out)
    atomic_write_text(out.with_suffix(".md"), markdown(results["summary"]))
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> Path:
    """Bars of mean EMA top-1 (%) per dataset: CLIP zero-shot and each variant."""
    from zeroshot_adapt.reports.plots import plot_accuracy_bars

    table = {
        dataset: {
            "CLIP zero-shot": 100 * entry["clip_zeroshot_top1"],
            **{f"{name} (EMA)": 100 * v["ema_top1"]["mean"] for name, v in entry["variants"].items()},
        }
        for dataset, entry in results["summary"].items()
    }
    return plot_accuracy_bars(table, path, title="top-1 %, mean over seeds (benchmarks/accuracy.py)")


def _write(results: dict, path: Path) -> None:
    from zeroshot_adapt.reports.metrics import write_json

    write_json(results, path)


if __name__ == "__main__":
    sys.exit(main())
