"""`zsa suite` over the offline world: digits, the real MNIST test set and the real EuroSAT 1,000-image folder
(../shared/data), with every method the suite knows, timed end to end. Writes benchmarks/suite_offline.md.

Teacher for every dataset: the bundled tiny CLIP (`zsa-tiny-digits`), trained only on rendered font digits.
On EuroSAT it is meaningless (it has never seen anything but digits): that row shows the machinery (cache,
pseudo-labels, training, records, table), not an accuracy anyone should quote. Student and budget: the digits
demo preset (small CNN, 16 px; 32 px for EuroSAT's 64 px tiles; 300 steps) for every dataset.

    python benchmarks/suite_offline.py --quick     # seed 0, 10 steps per training cell: the machinery, minutes
    python benchmarks/suite_offline.py             # seeds 0 1 2, the preset's 300 steps: the real run

The grid runs as one `python -m zeroshot_adapt.cli suite ...` command (printed in the .md) with a fresh CLIP
cache, so its wall time includes every cache build. Outputs of the suite itself go to benchmarks/out/ (ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a checkout: `python benchmarks/suite_offline.py`

from zeroshot_adapt.fileio import atomic_write_text  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist_test"
EUROSAT_DIR = SHARED / "eurosat_rgb_100"
QUICK_STEPS = 10  # training steps per cell in --quick (the preset's 300 in the full run)
EUROSAT_IMAGE_SIZE = 32  # its tiles are 64 px; the demo CNN at 32 px
# The digit teacher labels no EuroSAT tile at tau_clip 0.95, and an empty labeled set is refused, so EuroSAT's
# training cells take GRIP's class-balanced selection instead: the 8 most confident tiles per predicted class
# (~10% of the 800 adapted on).
FIGURE = HERE / "results" / "suite_offline_figure9.png"  # the full run's Figure-9 chart (not --quick's)
EUROSAT_SELECTION = ["pseudo.select=topk", "pseudo.per_class=8"]


def datasets_file(path: Path, budget: list[str]) -> Path:
    """digits (its own preset), MNIST and EuroSAT (the digits preset's student and budget) as suite entries;
    `budget` overrides go last in every entry (an entry's overrides win over the suite's --set)."""
    from zeroshot_adapt.data.registry import DIGITS_DEMO

    demo = [f"{key}={value}" for key, value in DIGITS_DEMO.items() if not key.startswith("teacher.")]
    entries = [
        {"name": "digits", "dataset": "digits", "overrides": budget},
        {"name": "mnist", "dataset": "mnist", "data_dir": str(MNIST_DIR), "prompts": "digits",
         "overrides": [*demo, *budget]},
        {"name": "eurosat", "dataset": "eurosat", "data_dir": str(EUROSAT_DIR),
         "overrides": [*demo, f"data.image_size={EUROSAT_IMAGE_SIZE}", *EUROSAT_SELECTION, *budget]},
    ]
    return atomic_write_text(path, yaml.safe_dump(entries, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"seed 0 and {QUICK_STEPS} steps per training cell")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 (quick) or 0 1 2")
    parser.add_argument("--out", default=str(HERE / "out" / "suite_offline"), help="the suite's folder (wiped)")
    parser.add_argument("--report", default=str(HERE / "suite_offline.md"))
    parser.add_argument("--conditions", default="", help="a sentence on what else ran on the machine (for the report)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite --report from the last run in --out (its timing.json), running nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        run = json.loads((out / "timing.json").read_text())
        conditions = args.conditions or run.get("conditions", "")
        write_report(Path(args.report), out / "suite", **{**run, "conditions": conditions})
        return 0
    for folder in (MNIST_DIR, EUROSAT_DIR):
        if not folder.is_dir():
            print(f"{folder} not found (../shared/data)", file=sys.stderr)
            return 2

    from zeroshot_adapt.suite import method_names

    shutil.rmtree(out, ignore_errors=True)  # a fresh grid and a fresh CLIP cache: the time covers everything
    out.mkdir(parents=True)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = method_names()
    budget = ["optim.epochs=1", f"optim.steps_per_epoch={QUICK_STEPS}", "optim.warmup_epochs=0"] if args.quick else []
    command = [sys.executable, "-m", "zeroshot_adapt.cli", "suite",
               "--datasets", str(datasets_file(out / "datasets.yaml", budget)), "--methods", *methods,
               "--seeds", *map(str, seeds), "--out", str(out / "suite"), "--num-workers", "0",
               "--model", "zsa-tiny-digits", "--pretrained", "bundled", "--cache-dir", str(out / "cache")]
    print(shlex.join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - start
    load = [round(x, 2) for x in os.getloadavg()]  # 1/5/15-minute load averages at the end of the grid
    atomic_write_text(out / "stdout.txt", proc.stdout)
    atomic_write_text(out / "stderr.txt", proc.stderr)
    if proc.returncode not in (0, 1):
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    run = {"command": command, "wall": wall, "seeds": seeds, "methods": methods, "quick": args.quick,
           "returncode": proc.returncode, "load_at_end": load, "conditions": args.conditions,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    atomic_write_text(out / "timing.json", json.dumps(run, indent=1))
    write_report(Path(args.report), out / "suite", **run)
    print(f"{args.report}: grid of {len(methods)} methods x 3 datasets in {wall / 60:.1f} min")
    return 0


def write_report(path: Path, suite_dir: Path, command: list[str], wall: float, seeds: list[int],
                 methods: list[str], quick: bool, returncode: int, load_at_end: list[float] | None = None,
                 conditions: str = "", omp_num_threads: str | None = None) -> None:
    records = [json.loads(p.read_text()) for p in sorted((suite_dir / "records").rglob("*.json"))]
    cells = "\n".join(
        f"| {r['dataset']} | {r['method']} | {'' if r['seed'] is None else r['seed']} | "
        f"{100 * r['metrics']['acc1']:.2f} | {r['seconds']:.1f} |"
        for r in records
    )
    table = (suite_dir / "results.md").read_text().split("\n", 2)[2]  # without its title line
    def shown(text: str) -> str:  # paths relative to the repository root
        return text.replace(str(REPO), ".").replace(str(REPO.parent), "..")

    datasets_yaml = shown((suite_dir.parent / "datasets.yaml").read_text())
    command_text = shown(shlex.join(["python", "-m", "zeroshot_adapt.cli", *command[3:]]))
    load = (f", load averages {load_at_end} (1/5/15 min) when it ended" if load_at_end
            else " (the load averages were not recorded for this run)")
    conditions = f" {conditions}" if conditions else ""
    threads = f" Torch ran with OMP_NUM_THREADS={omp_num_threads}." if omp_num_threads else ""
    setting = (f"**QUICK setting** (seed {seeds}, {QUICK_STEPS} training steps per cell): this file shows the "
               "machinery and the cost of the grid's fixed parts; its accuracies are NOT results (10 steps do not "
               "train a student: no unlabeled sample reaches the 0.95 confidence threshold in 10 steps, so every "
               "training algorithm reduces to the same supervised steps on the CLIP-labeled set and gives the same "
               "number, and on EuroSAT the tiny teacher labels no image at 0.95, so the students stay at their "
               "initialization). The lead re-runs the full command below." if quick else
               f"Full setting: seeds {seeds}, the digits preset's 300 training steps per cell.")
    figure = ""
    if not quick and (suite_dir / "figure9_accuracy.png").is_file():  # keep the Figure-9 chart
        shutil.copyfile(suite_dir / "figure9_accuracy.png", FIGURE)
        figure = f"\n![zero-shot vs each method per dataset]({os.path.relpath(FIGURE, path.parent)})\n"
    full_run = ("Full run (expect roughly an hour or more on 2 CPU cores):\n\n```\npython benchmarks/suite_offline.py\n"
                "```\n" if quick else "")
    text = f"""# `zsa suite` on the offline world

Produced by `python benchmarks/suite_offline.py{' --quick' if quick else ''}` on {platform.node() or 'this machine'}
({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, shared with other jobs), CPU only.

{setting}

- **Datasets**: `digits` (scikit-learn's 1,797 scans: 1,437 train / 360 test), the real MNIST test set
  (10,000 images, `../shared/data/mnist_test`: stratified holdout, 8,000 adapted on / 2,000 scored) and the
  real EuroSAT folder (1,000 images, `../shared/data/eurosat_rgb_100`: 800 / 200).
- **Teacher**: the bundled tiny CLIP `zsa-tiny-digits`, trained only on digits rendered from fonts, for all three.
  **On EuroSAT this teacher is meaningless**: it has never seen a satellite tile, so its zero-shot numbers and
  every student trained from its pseudo-labels are noise around chance (10%). The EuroSAT row exercises the
  machinery (cache, pseudo-label filter, training, records, table, plots) on real image files, nothing more.
  This teacher labels no tile at 0.95 and an empty labeled set is refused, so its training cells keep the 8
  most confident tiles per predicted class (`pseudo.select=topk`, `pseudo.per_class=8`).
  MNIST uses the tiny teacher's own prompts (`prompts/digits.json`).
- **Methods**: {', '.join(methods)} (every method the suite knows at this commit). The training-free
  methods (debias, label-propagation, prior-em, sinkhorn, transclip) refine CLIP's cached predictions of the
  scored split itself (transductive, no training), one cell per dataset like zeroshot.
- **Wall time of the whole grid**: **{wall / 60:.1f} min** ({wall:.0f} s) for {len(records)} cells, from an
  empty CLIP cache (every cache build included), exit status {returncode}; the 2 cores were shared with other
  jobs{load}.{threads}{conditions}

Command (the datasets file it names is below):

```
{command_text}
```

```yaml
{datasets_yaml}```

{full_run}
## Table (`results.md` of the suite)
{figure}
{table}
## Cells

| dataset | method | seed | acc1 (%) | seconds |
|---|---|---|---|---|
{cells}
"""
    atomic_write_text(path, text)


if __name__ == "__main__":
    sys.exit(main())
