"""`zsa`: thin subcommands over zeroshot_adapt.pipeline. The only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from zeroshot_adapt.errors import UserError

log = logging.getLogger("zeroshot_adapt")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # stopped by SIGINT / SIGTERM after writing a checkpoint: re-run to resume


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="registered dataset name (see `zsa datasets`)")
    parser.add_argument("--data-dir", help="local data: an image-folder tree, a save_to_disk directory or MNIST IDX")
    parser.add_argument("--config", help="YAML file of config overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable (e.g. --set algorithm.tau=0.5)")
    parser.add_argument("--model", help="open_clip model name (default RN50-quickgelu)")
    parser.add_argument("--pretrained", help="open_clip pretrained tag or a local checkpoint path (default openai)")
    parser.add_argument("--prompts", help="prompt file name in prompts/ or a path to a JSON prompt file")
    parser.add_argument("--cache-dir", help="where CLIP prediction caches live (default ~/.cache/zeroshot-adapt)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _recipe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=("fast", "paper"),
                        help="named preset under the dataset's own: fast (default; single view, no CLD, no CLIP fill) "
                             "or paper (the official DebiasPL ImageNet settings: multi-view, CLD 0.3, CLIP fill, "
                             "ResNet-50, 50 epochs; see config.RECIPES)")
    parser.add_argument("--student-init", metavar="CHECKPOINT",
                        help="student weights: a self-supervised checkpoint file (MoCo v2/v3, MoCo-EMAN, DINO, "
                             "SwAV) or a timm tag; the paper used res50_moco_eman_800ep.pth.tar")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zsa",
        description="Adapt CLIP to unlabeled images with DebiasPL; CLIP + semi-supervised learning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cache", help="predict every image with CLIP once and store it (sharded, resumable)")
    _common(p)
    p.add_argument("--split", choices=("train", "test", "both"), default="both")

    p = sub.add_parser("zeroshot", help="CLIP zero-shot metrics and the per-class imbalance plot, from the cache")
    _common(p)
    p.add_argument("--out", help="output folder (default runs/<dataset>/zeroshot)")

    p = sub.add_parser("pseudolabel", help="select CLIP pseudo-labels with confidence >= tau_clip; stats and plots")
    _common(p)
    p.add_argument("--tau-clip", type=float, help="confidence threshold in (0, 1] (default 0.95)")
    p.add_argument("--out", help="output folder (default runs/<dataset>/pseudolabel)")

    for name, text in (
        ("adapt", "adapt a student to the unlabeled data: cache -> filter -> FixMatch/DebiasPL -> evaluate"),
        ("ssl", "semi-supervised training with a few human labels (optionally with CLIP fill)"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        _recipe_flags(p)
        p.add_argument("--print-config", action="store_true",
                       help="print the fully resolved config as YAML and exit (touches no data, cache or run dir)")
        p.add_argument("--algorithm", help="fixmatch | debiaspl | ... (see `zsa algorithms`)")
        p.add_argument("--tau-clip", type=float, help="CLIP confidence threshold for the labeled set (adapt)")
        p.add_argument("--run-dir", help="run directory (default runs/<dataset>/<algorithm>); re-run to resume")
        p.add_argument("--seed", type=int)
        p.add_argument("--epochs", type=int)
        p.add_argument("--clip-fill", type=float, metavar="THRESHOLD",
                       help="CLIP fill: supervise samples no student mask kept with CLIP labels of confidence >= "
                            "THRESHOLD (the paper: 0.3 in T-ZSL, 0.4 in SSL)")
        if name == "ssl":
            # not required here: a --config file may give ssl.labels_*; run() checks that SSL is on
            group = p.add_mutually_exclusive_group()
            group.add_argument("--label-fraction", type=float, help="e.g. 0.01 for ImageNet 1%%")
            group.add_argument("--labels-per-class", type=int, help="e.g. 4 for CIFAR-10 with 40 labels")
            group.add_argument("--labels-file", help="file of labeled sample keys, one per line")
            p.add_argument("--long-tail", type=float, metavar="GAMMA", help="long-tailed subsample, ratio gamma")

    p = sub.add_parser("baseline", help="long-tail SSL baselines (multi-run): CReST, CReST+, alternate sampling")
    _common(p)
    _recipe_flags(p)
    p.add_argument("--method", choices=("crest", "crest+", "alternate"), required=True)
    p.add_argument("--algorithm", default="fixmatch", help="algorithm of each run (default fixmatch; CReST+ distalign)")
    p.add_argument("--run-dir", help="run directory (default runs/<dataset>/baseline-<method>); re-run to resume")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, help="epochs of every generation / round")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--label-fraction", type=float, help="e.g. 0.01 for ImageNet 1%%")
    group.add_argument("--labels-per-class", type=int, help="e.g. 4 for CIFAR-10 with 40 labels")
    group.add_argument("--labels-file", help="file of labeled sample keys, one per line")
    p.add_argument("--long-tail", type=float, metavar="GAMMA", help="long-tailed subsample, ratio gamma")
    p.add_argument("--generations", type=int, default=3,
                   help="CReST generations, or alternate-sampling rounds after round 0 (default 3)")
    p.add_argument("--alpha", type=float, default=1 / 3, help="CReST sampling-rate exponent (default 1/3)")
    p.add_argument("--t-min", type=float, default=0.5, help="CReST+ final alignment temperature (default 0.5)")

    p = sub.add_parser("train-teacher", help="re-train the bundled tiny digits CLIP teacher (reproducible on CPU)")
    p.add_argument("--out", required=True, help="output .safetensors (a .meta.json report is written next to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per count)")
    p.add_argument("--mnist-dir", help="MNIST IDX folder for the optional MNIST zero-shot report")

    sub.add_parser("datasets", help="list registered datasets")
    sub.add_parser("algorithms", help="list registered algorithms")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    """Turn the convenience flags into dotted overrides (explicit --set wins: it comes last)."""
    from zeroshot_adapt.config import CLI_FLAGS

    flags = {flag.lstrip("-").replace("-", "_"): key for key, flag in CLI_FLAGS.items()}
    out = []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            if attr in ("data_dir", "pretrained", "prompts", "labels_file", "cache_dir", "student_init") and (
                attr not in ("pretrained", "student_init") or "/" in str(value)
            ):
                value = str(Path(value).expanduser())
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if getattr(args, "clip_fill", None) is not None and args.command == "ssl":
        out.append("ssl.use_clip=true")  # SSL needs CLIP's predictions for the fill; T-ZSL always has them
    return out + list(args.overrides)


def _validate(config) -> None:
    """What the config table cannot know: paths that must exist, registered names."""
    if config.data.data_dir is not None and not Path(config.data.data_dir).exists():
        raise UserError(f"--data-dir {config.data.data_dir!r} does not exist")
    from zeroshot_adapt.algorithms import ALGORITHMS

    ALGORITHMS.get(config.algorithm.name)  # fail before any expensive stage


def run(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    # libraries (open_clip logs through the root logger) stay at WARNING unless --verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    from zeroshot_adapt import pipeline

    if args.command == "train-teacher":
        return _train_teacher(args)
    if args.command == "datasets":
        from zeroshot_adapt.data.registry import dataset_names, get_spec

        for name in dataset_names():
            spec = get_spec(name)
            prompts = f"prompts/{spec.prompts}.json" if spec.prompts else "folder names"
            print(f"{name:16s} {spec.hf_id or '(local or bundled)':36s} {prompts}")
        return 0
    if args.command == "algorithms":
        from zeroshot_adapt.algorithms import ALGORITHMS

        print("\n".join(ALGORITHMS.names()))
        return 0

    config = pipeline.resolve_config(args.dataset, config_file=args.config, overrides=_overrides(args))
    _validate(config)
    name = config.data.dataset
    if args.command == "cache":
        for split in ("train", "test") if args.split == "both" else (args.split,):
            preds = pipeline.teacher_predictions(config, split)
            print(f"{name}/{split}: {len(preds.table)} predictions cached in {preds.cache.directory}")
        return 0
    if args.command == "zeroshot":
        report = pipeline.zeroshot_report(config, args.out or f"runs/{name}/zeroshot")
        for split in ("train", "test"):
            entry = report[split]
            top1 = entry.get("top1")
            print(f"{name}/{split}: CLIP zero-shot top-1 "
                  f"{'n/a (no labels)' if top1 is None else f'{100 * top1:.2f}%'}, "
                  f"prediction imbalance {entry.get('imbalance_ratio')}")
        print(f"report: {Path(args.out or f'runs/{name}/zeroshot') / 'zeroshot.json'}")
        return 0
    if args.command == "pseudolabel":
        out = Path(args.out or f"runs/{name}/pseudolabel")
        report = pipeline.pseudolabel_report(config, out)
        precision = report.get("precision")
        print(f"{name}: tau_clip={config.pseudo.tau_clip} kept {report['kept']} of {report['total']} "
              f"({100 * report['kept_fraction']:.1f}%), imbalance ratio {report.get('imbalance_ratio')}, "
              f"empty classes {report.get('num_empty_classes')}"
              + ("" if precision is None else f", precision {100 * precision:.1f}%"))
        print(f"report: {out / 'pseudolabels.json'}")
        return 0
    if args.command in ("adapt", "ssl"):
        if args.run_dir is None and not any(o.startswith("run_dir=") for o in args.overrides):
            from dataclasses import replace

            config = replace(config, run_dir=f"runs/{name}/{args.command}-{config.algorithm.name}")
        _check_mode(args.command, config)
        if args.print_config:
            import yaml

            from zeroshot_adapt.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        from zeroshot_adapt.config import describe_recipe

        print(describe_recipe(config), flush=True)
        report = pipeline.adapt(config)
        _print_summary(report, config.run_dir)
        return 0 if report["completed"] else EXIT_INTERRUPTED
    if args.command == "baseline":
        return _baseline(args, config)
    raise AssertionError(args.command)


def _check_mode(command: str, config) -> None:
    """`zsa ssl` needs human labels; `zsa adapt` must not silently turn into SSL through a config file."""
    if command == "ssl" and not config.ssl.enabled:
        raise UserError("zsa ssl needs labels: pass --label-fraction, --labels-per-class or --labels-file "
                        "(or ssl.labels_* in the --config file)")
    if command == "adapt" and config.ssl.enabled:
        raise UserError("this config sets ssl.labels_* (a semi-supervised run): use `zsa ssl`, not `zsa adapt`")


def _train_teacher(args: argparse.Namespace) -> int:
    from zeroshot_adapt.demo.train_tiny_clip import TinyClipTrainConfig, build_and_report, default_mnist_dir

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {str(out)!r}")
    try:
        config = TinyClipTrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                                     num_threads=args.threads)
    except ValueError as error:
        raise UserError(str(error)) from None
    mnist = Path(args.mnist_dir) if args.mnist_dir else default_mnist_dir()
    meta = build_and_report(config, out, mnist_dir=mnist)
    keys = ("train_seconds", "logit_scale", "source_val_accuracy", "digits_test_accuracy", "digits_full_accuracy",
            "digits_imbalance_ratio", "digits_predicted_counts", "mnist_test_accuracy", "size_bytes", "sha256")
    print(json.dumps({k: meta.get(k) for k in keys}, indent=2))
    return 0


def _print_summary(report: dict, run_dir: str) -> None:
    def pct(entry: dict | None) -> str:
        return "n/a" if not entry or entry.get("top1") is None else f"{100 * entry['top1']:.2f}%"

    print(f"\n{report['dataset']} / {report['algorithm']}: step {report['step']}/{report['total_steps']}"
          f"{'' if report['completed'] else ' (interrupted: re-run the same command to resume)'}")
    print(f"  labeled set: {report['labeled_set']['size']} ({report['labeled_set']['source']} labels), "
          f"unlabeled: {report['unlabeled_set']['size']}")
    if "clip_zeroshot" in report:
        print(f"  CLIP zero-shot top-1:     {pct(report['clip_zeroshot'])}")
    if "student" in report:
        print(f"  adapted student top-1:    {pct(report['student'])}")
        print(f"  EMA (EMAN) teacher top-1: {pct(report['ema'])}")
    print(f"  report: {Path(run_dir) / 'report.json'}")


def _baseline(args: argparse.Namespace, config) -> int:
    """`zsa baseline`: CReST / CReST+ generations or alternate-sampling rounds (zeroshot_adapt.stages)."""
    from dataclasses import replace

    from zeroshot_adapt import stages

    if args.run_dir is None and not any(o.startswith("run_dir=") for o in args.overrides):
        config = replace(config, run_dir=f"runs/{config.data.dataset}/baseline-{args.method}")
    if args.method == "alternate":
        report = stages.run_alternate(config, args.generations)
        steps = [(f"round {r['round']}", r.get("balanced")) for r in report.get("rounds", [])]
    else:
        report = stages.run_crest(config, args.generations, alpha=args.alpha,
                                  progressive_alignment=args.method == "crest+", t_min=args.t_min)
        steps = [(f"generation {g['generation']}", g.get("student")) for g in report.get("generations", [])]
    print(f"\n{config.data.dataset} / {args.method}"
          f"{'' if report['completed'] else ' (interrupted: re-run the same command to resume)'}")
    for name, entry in steps:
        if entry and entry.get("top1") is not None:
            print(f"  {name}: top-1 {100 * entry['top1']:.2f}%, "
                  f"mean per-class recall {100 * entry['mean_per_class_recall']:.2f}%")
    print(f"  report: {Path(config.run_dir) / 'report.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as error:
        print(f"zsa: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("zsa: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
