"""The paper's numbers, one config and one command each: print the table, run a row, collect the results.

    python benchmarks/paper/reproduce.py --table            # the Markdown table of benchmarks/paper/README.md
    python benchmarks/paper/reproduce.py --run tzsl_imagenet_50ep [--dry-run]
    python benchmarks/paper/reproduce.py --collect          # measured (runs/paper/<row>/report.json) vs published

Every row's config is a YAML file next to this script, loaded through `pipeline.resolve_config` (a test keeps
them valid). The GPU-hours are an ESTIMATE computed from the resolved config (epochs, batch, mu, views, image
counts) and the throughput ASSUMPTIONS below; nothing here was run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/paper")

# --- throughput assumptions (not measured here: no GPU was available) -------------------------------------
TRAIN_IMAGES_PER_S = {"resnet50": 1200.0, "wrn28_2": 10000.0}
"""Forward + backward images per second on ONE A100-class GPU with mixed precision, assuming the data loader keeps
up: ResNet-50 at 224 px, WRN-28-2 at 32 px. Decoding and RandAugment of 2 strong views per image often bound
ImageNet training on fewer than ~16 CPU cores per GPU: then these runs take longer."""
FORWARD_COST = 1.0 / 3.0  # a forward pass (the EMAN teacher's weak views, evaluation, CLIP) ~ 1/3 of fwd + bwd
CLIP_IMAGES_PER_S = 3000.0  # CLIP RN50 inference (the one-off teacher cache), images/s on one GPU

DATASET_SIZES = {  # (train images, test images) of the registry's default splits
    "imagenet": (1_281_167, 50_000),
    "eurosat": (21_600, 2_700),  # tanganke/eurosat train / test (check your copy: protocols differ)
    "mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "food101": (75_750, 25_250),
}
NEEDS = {  # short names; benchmarks/paper/README.md says where each comes from
    "imagenet": "ImageNet",
    "clip": "CLIP RN50",
    "moco": "MoCo-EMAN ckpt",
}


@dataclass(frozen=True)
class Row:
    name: str  # the YAML file's stem
    published: float  # top-1 %
    source: str
    clip: float | None = None  # CLIP zero-shot top-1 % quoted beside it (Figure 9)


ROWS: tuple[Row, ...] = (
    Row("tzsl_imagenet_50ep", 68.7, "official repo README, T-ZSL, 50 epochs"),
    Row("tzsl_imagenet_100ep", 68.3, "paper Table 6, T-ZSL, 100 epochs", clip=59.6),
    Row("fig9_eurosat", 69.8, "paper Figure 9", clip=43.5),
    Row("fig9_mnist", 83.7, "paper Figure 9", clip=61.7),
    Row("fig9_cifar10", 91.5, "paper Figure 9", clip=72.3),
    Row("fig9_cifar100", 63.4, "paper Figure 9", clip=40.9),
    Row("fig9_food101", 85.1, "paper Figure 9", clip=80.5),
    Row("table9_tau_clip_0.2", 55.9, "paper Table 9"),
    Row("table9_tau_clip_0.4", 63.2, "paper Table 9"),
    Row("table9_tau_clip_0.6", 66.2, "paper Table 9"),
    Row("table9_tau_clip_0.8", 67.1, "paper Table 9"),
    Row("table9_tau_clip_0.9", 67.7, "paper Table 9"),
    Row("table9_tau_clip_0.95", 67.7, "paper Table 9"),
    Row("table3_ssl_1p_fixmatch_eman", 60.9, "paper Table 3 (official README: 50 epochs)"),
    Row("table3_ssl_1p_debiaspl", 63.1, "paper Table 3 (single view)"),
    Row("table3_ssl_1p_debiaspl_clip", 69.1, "paper Table 3"),
    Row("table3_ssl_0.2p_fixmatch_eman", 43.6, "paper Table 3 (official README: 50 epochs)"),
    Row("table3_ssl_0.2p_debiaspl", 47.9, "paper Table 3 (single view)"),
    Row("table3_ssl_0.2p_debiaspl_clip", 68.2, "paper Table 3"),
    Row("repo_ssl_1p_debiaspl", 65.3, "official repo README (multi-view + CLD; 65.6 reproduced there)"),
    Row("repo_ssl_0.2p_debiaspl", 51.6, "official repo README (multi-view + CLD; 52.0 reproduced there)"),
    Row("repo_ssl_1p_debiaspl_clip", 71.3, "official repo README, 100 epochs"),
    Row("repo_ssl_0.2p_debiaspl_clip", 69.6, "official repo README, 50 epochs"),
    Row("table3_ssl_cifar10_40_fixmatch", 86.1, "paper Table 3"),
    Row("table3_ssl_cifar10_40_debiaspl", 94.6, "paper Table 3"),
)


def config_path(row: Row) -> Path:
    return HERE / f"{row.name}.yaml"


def resolve(row: Row):
    from zeroshot_adapt.pipeline import resolve_config

    return resolve_config(config_file=str(config_path(row)))


def command(row: Row, config=None) -> str:
    config = config or resolve(row)
    sub = "ssl" if config.ssl.enabled else "adapt"
    path = config_path(row).relative_to(HERE.parents[1])
    return f"zsa {sub} --config {path} --run-dir {RUNS / row.name}"


def gpu_hours(config) -> float:
    """Estimated GPU-hours on one GPU (see the assumptions at the top of this file)."""
    train_n, test_n = DATASET_SIZES[config.data.dataset]
    ssl = config.ssl
    labeled = 0
    if ssl.labels_fraction is not None:
        labeled = round(ssl.labels_fraction * train_n)
    elif ssl.labels_per_class is not None:
        labeled = ssl.labels_per_class * 10
    unlabeled = train_n - labeled if ssl.enabled else train_n
    optim = config.optim
    per_epoch = optim.steps_per_epoch or max(1, unlabeled // (optim.batch_size * optim.mu))
    steps = per_epoch * optim.epochs
    views = 2 if config.algorithm.multiview else 1
    unlabeled_per_step = optim.batch_size * optim.mu * views
    units_per_step = optim.batch_size + unlabeled_per_step * (1 + FORWARD_COST)  # student fwd+bwd, teacher fwd
    evaluation = optim.epochs / config.eval_every_epochs * 2 * test_n * FORWARD_COST  # student + EMA each epoch
    seconds = (steps * units_per_step + evaluation) / TRAIN_IMAGES_PER_S[config.student.arch]
    if not ssl.enabled or ssl.use_clip:
        seconds += (train_n + test_n) / CLIP_IMAGES_PER_S
    return seconds / 3600


def needs(config) -> str:
    items = []
    if config.data.dataset == "imagenet":
        items.append(NEEDS["imagenet"])
    if not config.ssl.enabled or config.ssl.use_clip:
        items.append(NEEDS["clip"])
    if config.student.pretrained and "moco_eman" in config.student.pretrained:
        items.append(NEEDS["moco"])
    return ", ".join(items) or "-"


def table() -> str:
    lines = [
        "| # | row | published top-1 % | source | command | est. GPU-h (1 GPU) | needs |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(ROWS, 1):
        config = resolve(row)
        published = f"{row.published:.1f}" + (f" (CLIP {row.clip:.1f})" if row.clip is not None else "")
        lines.append(f"| {number} | `{row.name}` | {published} | {row.source} | `{command(row, config)}` | "
                     f"{gpu_hours(config):.0f} | {needs(config)} |")
    return "\n".join(lines)


def collect() -> str:
    lines = ["| row | published | student | EMA teacher |", "|---|---|---|---|"]
    for row in ROWS:
        path = RUNS / row.name / "report.json"
        if not path.is_file():
            lines.append(f"| `{row.name}` | {row.published:.1f} | not run | |")
            continue
        report = json.loads(path.read_text())
        cells = [f"{100 * report[k]['top1']:.1f}" if report.get(k) else "n/a" for k in ("student", "ema")]
        lines.append(f"| `{row.name}` | {row.published:.1f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--table", action="store_true", help="print the Markdown table")
    action.add_argument("--run", metavar="ROW", help="run one row (its command, in this process)")
    action.add_argument("--collect", action="store_true", help="measured vs published, from runs/paper/")
    parser.add_argument("--dry-run", action="store_true", help="with --run: print the command only")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if args.collect:
        print(collect())
        return 0
    rows = {row.name: row for row in ROWS}
    if args.run not in rows:
        print(f"unknown row {args.run!r}; valid: {', '.join(rows)}", file=sys.stderr)
        return 2
    line = command(rows[args.run])
    print(line)
    if args.dry_run:
        return 0
    from zeroshot_adapt.cli import main as zsa

    return zsa(shlex.split(line)[1:])


if __name__ == "__main__":
    sys.exit(main())
