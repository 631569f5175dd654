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
REBUILD_HELP = "delete the CLIP prediction cache(s) this command uses and predict every image again"
SECONDS_PER_DAY = 86_400
PRETRAINED_HELP = ("open_clip pretrained tag or a local checkpoint path (default openai; 'bundled' for the models "
                   "shipped in this package, e.g. zsa-tiny-digits, and the default there)")


def _imbalance(value: float | None) -> str:
    """An imbalance ratio as every summary prints it: reports store null when some class is empty (max/min = inf)."""
    return "inf (a class is empty)" if value is None or value == float("inf") else f"{value:.2f}"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="registered dataset name (see `zsa datasets`)")
    parser.add_argument("--data-dir", help="local data: an image-folder tree, a save_to_disk directory or MNIST IDX "
                                           "(without --dataset: your own folder, dataset imagefolder)")
    parser.add_argument("--config", help="YAML file of config overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable (e.g. --set algorithm.tau=0.5)")
    parser.add_argument("--model", help="open_clip model name (default RN50-quickgelu)")
    parser.add_argument("--pretrained", help=PRETRAINED_HELP)
    parser.add_argument("--prompts", help="prompt file name in prompts/ or a path to a JSON prompt file")
    parser.add_argument("--classes", metavar="FILE",
                        help="your class names, one per line, in label order; with --data-dir (dataset imagefolder) "
                             "every image is unlabeled and subfolders are organisation, not classes")
    parser.add_argument("--templates", metavar="FILE",
                        help="prompt templates, one per line, with a {} or {c} slot for the class name "
                             "(default: CLIP's 80 ImageNet templates from open_clip)")
    parser.add_argument("--cache-dir", help="where CLIP prediction caches live (default ~/.cache/zeroshot-adapt)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers")
    parser.add_argument("--pipeline", choices=("cpu", "device", "auto"),
                        help="input pipeline: cpu (workers decode and augment; default), device (the GPU decodes and "
                             "augments batches), auto (device on CUDA)")
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

    p = sub.add_parser("cache", help="predict every image with CLIP once and store it (sharded, resumable); "
                                     "list, prune, verify or rebuild caches")
    _common(p)
    p.add_argument("--split", choices=("train", "test", "both"), default="both")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true",
                        help="list every cache under the cache directory (--dataset D: only D's)")
    action.add_argument("--prune", action="store_true",
                        help="remove partial builds that are not running, plus the caches --older-than / "
                             "--superseded select (never one in use)")
    action.add_argument("--verify", action="store_true",
                        help="check the checksum of every file of every cache (--dataset D: only D's)")
    action.add_argument("--rebuild", action="store_true", help=REBUILD_HELP)
    p.add_argument("--older-than", type=float, metavar="DAYS", help="with --prune: caches not used for DAYS days")
    p.add_argument("--superseded", action="store_true",
                   help="with --prune: caches a newer cache of the same dataset, split and teacher replaces, "
                        "and caches of an older format")
    p.add_argument("--dry-run", action="store_true", help="with --prune: say what would be removed")

    p = sub.add_parser("zeroshot", help="CLIP zero-shot metrics and the per-class imbalance plot, from the cache")
    _common(p)
    p.add_argument("--rebuild", action="store_true", help=REBUILD_HELP)
    p.add_argument("--out", help="output folder (default runs/<dataset>/zeroshot)")

    p = sub.add_parser("transduct", help="refine CLIP's cached predictions without training (label propagation, "
                                         "TransCLIP, Sinkhorn, ...); report them next to zero-shot")
    _common(p)
    p.add_argument("--method", dest="teacher_method", metavar="M[,M...]",
                   help="a method or a chain applied in order, e.g. label-propagation,sinkhorn "
                        "(see `zsa transduct-methods`; default zeroshot)")
    p.add_argument("--split", choices=("train", "test", "both"), default="both")
    p.add_argument("--out", help="output folder (default runs/<dataset>/transduct)")
    _transduct_params(p)

    p = sub.add_parser("pseudolabel", help="select CLIP pseudo-labels with confidence >= tau_clip; stats and plots")
    _common(p)
    p.add_argument("--rebuild", action="store_true", help=REBUILD_HELP)
    p.add_argument("--tau-clip", type=float, help="confidence threshold in (0, 1] (default 0.95)")
    p.add_argument("--out", help="output folder (default runs/<dataset>/pseudolabel)")
    _teacher_selection(p)

    for name, text in (
        ("adapt", "adapt a student to the unlabeled data: cache -> filter -> FixMatch/DebiasPL -> evaluate"),
        ("ssl", "semi-supervised training with a few human labels (optionally with CLIP fill)"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--rebuild", action="store_true", help=REBUILD_HELP + " (do not repeat it when resuming)")
        _recipe_flags(p)
        p.add_argument("--print-config", action="store_true",
                       help="print the fully resolved config as YAML and exit (touches no data, cache or run dir)")
        p.add_argument("--algorithm", help="fixmatch | debiaspl | ... (see `zsa algorithms`)")
        p.add_argument("--tau-clip", type=float, help="CLIP confidence threshold for the labeled set (adapt)")
        p.add_argument("--run-dir", help=f"run directory (default runs/<dataset>/{name}-<algorithm>); re-run to resume")
        p.add_argument("--seed", type=int)
        p.add_argument("--epochs", type=int)
        p.add_argument("--reevaluate", action="store_true",
                       help="a finished run: evaluate it again instead of printing its saved report")
        if name == "adapt":
            _teacher_selection(p)
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

    p = sub.add_parser(
        "suite",
        help="run datasets x methods x seeds with one teacher and recipe; one table (resumable, failures recorded)",
        description="Run every (dataset, method, seed) cell, skipping cells whose record exists; write one "
        "CLIP_benchmark-shaped JSON record per cell, results.csv, results.md and figures under --out. "
        "Exit status 1 when some cells failed (the others still ran), 130 when interrupted (re-run to resume).",
    )
    p.add_argument("--datasets", nargs="+", required=True, metavar="DATASET[=PATH]|FILE",
                   help="registered names or aliases (imagenet1k, vtab/eurosat, ...), NAME=PATH for a local copy, "
                        "or a datasets file (.yaml/.csv: name, dataset, data_dir, prompts, student_from, overrides; "
                        ".txt: one item per line)")
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD",
                   help="zeroshot, the training algorithms (`zsa algorithms`) and the training-free methods "
                        "(`zsa transduct-methods`; a chain such as label-propagation,sinkhorn is one method), "
                        "space-separated")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED",
                   help="seeds of the seeded methods (default 0); deterministic methods run once")
    p.add_argument("--out", required=True, help="output folder; re-run the same command to resume")
    p.add_argument("--config", help="YAML recipe applied to every dataset (on top of its preset)")
    _recipe_flags(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override for every dataset, repeatable (a datasets-file entry's own "
                        "overrides win)")
    p.add_argument("--model", help="open_clip teacher for every dataset (default: each dataset's preset)")
    p.add_argument("--pretrained", help=PRETRAINED_HELP)
    p.add_argument("--cache-dir", help="where CLIP prediction caches live (default ~/.cache/zeroshot-adapt)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser(
        "evaluate",
        help="score a run's student on other datasets (e.g. ImageNet-V2/-R/-Sketch/-A) next to CLIP zero-shot",
        description="Load the student a run saved (RUN/student.pt) and score it on each dataset's whole test "
        "set; classes are mapped onto the student's outputs from the prompt files (WordNet ids), so the "
        "200-class ImageNet-R / -A are scored on those 200 logits. CLIP zero-shot runs on the same images.",
    )
    p.add_argument("--run-dir", required=True, help="a finished `zsa adapt` run directory")
    p.add_argument("--datasets", nargs="+", required=True, metavar="DATASET[=PATH]|FILE",
                   help="e.g. imagenet-v2 imagenet-r imagenet-sketch imagenet-a (NAME=PATH for local copies)")
    p.add_argument("--out", help="output folder (default RUN/robustness)")
    p.add_argument("--cache-dir", help="where CLIP prediction caches live (default: the run's)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser(
        "export",
        help="write a finished run's student as a timm / Hugging Face hub folder (model.safetensors, config.json, "
             "README.md model card)",
        description="Weights only (safetensors, never a pickle). A timm student loads with "
        "timm.create_model('local-dir:OUT', pretrained=True); a CLIP student with zeroshot_adapt.load_exported(OUT).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished `zsa adapt` / `zsa ssl` run directory")
    p.add_argument("--out", required=True, help="output folder (new or empty, unless --force)")
    p.add_argument("--weights", choices=("student", "ema"), default="student",
                   help="student: the run's final student, student.pt (default); ema: its EMA (EMAN) teacher at the "
                        "last step")
    p.add_argument("--force", action="store_true", help="replace the export files of a non-empty --out")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser("predict", help="top-k predictions of an exported model on a folder of images -> CSV")
    p.add_argument("--model", required=True, help="a folder written by `zsa export`")
    p.add_argument("--data-dir", required=True, help="folder of images (flat or nested)")
    p.add_argument("--out", required=True, help="predictions CSV (a .summary.json with the skipped files goes beside)")
    p.add_argument("--top-k", type=int, default=None,
                   help="classes per image, most probable first (default 5, or every class of a smaller model)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    sub.add_parser("datasets", help="list registered datasets")
    sub.add_parser("algorithms", help="list registered algorithms")
    sub.add_parser("transduct-methods", help="list the training-free transduction methods")
    return parser


def _teacher_selection(parser: argparse.ArgumentParser) -> None:
    """The teacher (any transduction chain) and the labeled-set rule, for pseudolabel and adapt."""
    parser.add_argument("--teacher-method", metavar="M[,M...]",
                        help="refine CLIP's predictions with this transduction chain before selecting "
                             "(e.g. label-propagation,sinkhorn; default zeroshot = CLIP unchanged)")
    parser.add_argument("--select", choices=("threshold", "topk"),
                        help="labeled set: confidence >= --tau-clip (default), or the most confident samples "
                             "of each predicted class (GRIP; with --per-class or --per-class-fraction)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--per-class", type=int, metavar="K", help="--select topk: K samples per predicted class")
    group.add_argument("--per-class-fraction", type=float, metavar="F",
                       help="--select topk: this share of each predicted class, in (0, 1]")
    _transduct_params(parser)


def _transduct_params(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transduction parameters (defaults from the papers; more with --set "
                                      "transduct.KEY=VALUE)")
    group.add_argument("--debias-tau", type=float, help="debias: divide by the predicted marginal ** tau (1)")
    group.add_argument("--sinkhorn-marginal", metavar="uniform|prior-em|FILE.json",
                       help="sinkhorn: target class marginal (default uniform)")
    group.add_argument("--lp-knn", type=int, help="label-propagation: neighbours per image (5, ZLaP)")
    group.add_argument("--lp-alpha", type=float, help="label-propagation: alpha in [0, 1) (0.99)")
    group.add_argument("--lp-gamma", type=float, help="label-propagation: similarity power (3)")
    group.add_argument("--transclip-knn", type=int, help="transclip: neighbours per image (3)")
    group.add_argument("--transclip-lambda", type=float, help="transclip: weight of the text anchor (1)")
    group.add_argument("--knn-memory-mb", type=int, help="memory budget of the kNN search and solver (4096)")


def _overrides(args: argparse.Namespace) -> list[str]:
    """Turn the convenience flags into dotted overrides (explicit --set wins: it comes last)."""
    from zeroshot_adapt.config import CLI_FLAGS

    flags = {flag.lstrip("-").replace("-", "_"): key for key, flag in CLI_FLAGS.items()}
    out = []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            if attr in ("data_dir", "pretrained", "prompts", "labels_file", "cache_dir", "sinkhorn_marginal",
                        "student_init") and (attr not in ("pretrained", "student_init") or "/" in str(value)
            ):
                value = str(Path(value).expanduser())
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if getattr(args, "clip_fill", None) is not None and args.command == "ssl":
        out.append("ssl.use_clip=true")  # SSL needs CLIP's predictions for the fill; T-ZSL always has them
    if _needs_bundled_weights(args):
        out.append("teacher.pretrained=\"bundled\"")
    return out + list(args.overrides)


def _needs_bundled_weights(args: argparse.Namespace) -> bool:
    """`--model M` of a model shipped in this package, with no --pretrained anywhere: its weights are
    `bundled` (it has no open_clip tag, so the default `openai` cannot load it)."""
    from zeroshot_adapt.teacher.clip import bundled_models

    if getattr(args, "model", None) not in bundled_models() or getattr(args, "pretrained", None) is not None:
        return False
    if any(o.startswith("teacher.pretrained=") for o in args.overrides):
        return False
    return "pretrained" not in (_config_file_values(args).get("teacher") or {})


def _config_file_values(args: argparse.Namespace) -> dict:
    from zeroshot_adapt.config import load_yaml

    config_file = getattr(args, "config", None)
    return load_yaml(config_file) if config_file and Path(config_file).is_file() else {}


def _dataset_name(args: argparse.Namespace) -> str | None:
    """--dataset, else `imagefolder` when --data-dir names your own folder and nothing else names a dataset
    (never silently the digits demo); None: the config file's or the default (the digits demo)."""
    if args.dataset is not None or getattr(args, "data_dir", None) is None:
        return args.dataset
    if any(o.startswith("data.dataset=") for o in args.overrides):
        return None
    if "dataset" in (_config_file_values(args).get("data") or {}):
        return None
    return "imagefolder"


def _validate(config) -> None:
    """What the config table cannot know: paths that must exist, registered names."""
    if config.data.data_dir is not None and not Path(config.data.data_dir).exists():
        raise UserError(f"--data-dir {config.data.data_dir!r} does not exist")
    from zeroshot_adapt.algorithms import ALGORITHMS

    ALGORITHMS.get(config.algorithm.name)  # fail before any expensive stage
    from zeroshot_adapt.transduct import parse_chain

    parse_chain(config.transduct.method)


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
        from zeroshot_adapt.data.registry import dataset_aliases, dataset_names, get_spec

        for name in dataset_names():
            spec = get_spec(name)
            prompts = f"prompts/{spec.prompts}.json" if spec.prompts else "folder names"
            aliases = ", ".join(dataset_aliases(name))
            print(f"{name:16s} {spec.hf_id or '(local or bundled)':36s} {prompts:28s} {aliases}".rstrip())
        return 0
    if args.command == "suite":
        return _suite(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "export":
        return _export(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "algorithms":
        from zeroshot_adapt.algorithms import ALGORITHMS

        print("\n".join(ALGORITHMS.names()))
        return 0
    if args.command == "transduct-methods":
        from zeroshot_adapt.transduct import METHODS

        for method in METHODS.names():
            print(f"{method:18s} {METHODS.get(method).description}")
        return 0

    config = pipeline.resolve_config(_dataset_name(args), config_file=args.config, overrides=_overrides(args))
    _validate(config)
    name = config.data.dataset
    if args.command == "cache":
        return _cache(args, config)
    if args.command in ("adapt", "ssl"):  # before anything touches data, caches or run directories
        if args.run_dir is None and not any(o.startswith("run_dir=") for o in args.overrides):
            from dataclasses import replace

            teacher = "" if config.transduct.method == "zeroshot" else f"-{config.transduct.method.replace(',', '+')}"
            config = replace(config, run_dir=f"runs/{name}/{args.command}-{config.algorithm.name}{teacher}")
        _check_mode(args.command, config)
        if args.print_config:
            import yaml

            from zeroshot_adapt.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
    if getattr(args, "rebuild", False):
        uses_clip = args.command in ("zeroshot", "pseudolabel") or not config.ssl.enabled or config.ssl.use_clip
        splits = ("train",) if args.command == "pseudolabel" else ("train", "test") if uses_clip else ()
        _rebuild(config, splits, optional_test=args.command in ("adapt", "ssl"))
    if args.command == "zeroshot":
        report = pipeline.zeroshot_report(config, args.out or f"runs/{name}/zeroshot")
        for split in ("train", "test"):
            entry = report[split]
            top1 = entry.get("top1")
            print(f"{name}/{split}: CLIP zero-shot top-1 "
                  f"{'n/a (no labels)' if top1 is None else f'{100 * top1:.2f}%'}, "
                  f"prediction imbalance {_imbalance(entry.get('imbalance_ratio'))}")
        print(f"report: {Path(args.out or f'runs/{name}/zeroshot') / 'zeroshot.json'}")
        return 0
    if args.command == "transduct":
        out = Path(args.out or f"runs/{name}/transduct")
        splits = ("train", "test") if args.split == "both" else (args.split,)
        report = pipeline.transduct_report(config, out, splits)
        for split in splits:
            if split in report:
                _print_transduct(name, split, report[split], report["method"])
        print(f"report: {out / 'transduct.json'}")
        return 0
    if args.command == "pseudolabel":
        out = Path(args.out or f"runs/{name}/pseudolabel")
        report = pipeline.pseudolabel_report(config, out)
        for rule, summary in report["rules"].items():
            precision = summary.get("precision")
            print(f"{name} ({report['teacher_method']} teacher): {rule} kept {summary['kept']} of {report['total']} "
                  f"({100 * summary['kept_fraction']:.1f}%), "
                  f"imbalance ratio {_imbalance(summary.get('imbalance_ratio'))}, "
                  f"empty classes {summary['num_empty_classes']}"
                  + ("" if precision is None else f", precision {100 * precision:.1f}%"))
        print(f"labeled set: the {report['select']} rule; report: {out / 'pseudolabels.json'}")
        return 0
    if args.command in ("adapt", "ssl"):
        from zeroshot_adapt.config import describe_recipe

        print(describe_recipe(config), flush=True)
        report = pipeline.adapt(config, reevaluate=args.reevaluate)
        _print_summary(report, config.run_dir)
        return 0 if report["completed"] else EXIT_INTERRUPTED
    if args.command == "baseline":
        return _baseline(args, config)
    raise AssertionError(args.command)


def _rebuild(config, splits: Sequence[str], *, optional_test: bool) -> None:
    """Delete and rebuild the teacher caches of `splits` (a missing test split is skipped where optional)."""
    from zeroshot_adapt import pipeline

    for split in splits:
        if split == "test" and optional_test:
            try:
                pipeline.load_table(config, "test")
            except UserError:
                continue
        preds = pipeline.teacher_predictions(config, split, rebuild=True)
        print(f"{config.data.dataset}/{split}: rebuilt {len(preds.table)} predictions in {preds.cache.directory}")


def _cache(args: argparse.Namespace, config) -> int:
    """`zsa cache`: build (or --rebuild) the caches of a dataset, or --list / --prune / --verify all caches."""
    from zeroshot_adapt import cache as cache_store
    from zeroshot_adapt import pipeline

    if (args.older_than is not None or args.superseded or args.dry_run) and not args.prune:
        raise UserError("--older-than, --superseded and --dry-run go with --prune")
    if args.older_than is not None and not args.older_than >= 0:
        raise UserError(f"--older-than {args.older_than} must be a number of days >= 0")
    root = pipeline.cache_root(config)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    if args.rebuild:
        _rebuild(config, splits, optional_test=False)
        return 0
    if not (args.list or args.prune or args.verify):
        for split in splits:
            preds = pipeline.teacher_predictions(config, split)
            print(f"{config.data.dataset}/{split}: {len(preds.table)} predictions cached in {preds.cache.directory}")
        return 0

    entries = cache_store.list_caches(root)
    if args.dataset is not None:  # (a cache whose identity.json is unreadable is kept: it may be this one)
        entries = [e for e in entries if e.identity.get("dataset") in (config.data.dataset, None)]
    if args.list:
        _print_cache_table(root, entries)
    elif args.verify:
        damaged = []
        for entry in entries:
            if entry.state not in ("complete", "damaged"):
                continue
            try:
                cache_store.verify_cache(entry.directory)
                print(f"ok       {_cache_label(entry)}  {entry.directory}")
            except cache_store.CacheDamagedError as error:
                print(f"DAMAGED  {_cache_label(entry)}  {entry.directory}")
                damaged.append(str(error))
        if damaged:
            raise UserError("\n".join(damaged))
        print(f"verified {sum(e.state == 'complete' for e in entries)} cache(s) under {root}")
    else:
        selected = []
        if args.older_than is not None:
            selected += cache_store.select_older_than(entries, args.older_than * SECONDS_PER_DAY)
        if args.superseded:
            selected += cache_store.select_superseded(entries, pipeline.cache_lineage)
        outcomes = cache_store.prune_caches(root, selected, dry_run=args.dry_run)
        for entry, outcome in outcomes:
            print(f"{outcome:32s} {entry.state:10s} {_cache_label(entry)}  {_size(entry.bytes)}  {entry.directory}")
        freed = sum(e.bytes for e, outcome in outcomes if outcome in ("removed", "would remove"))
        print(f"{'would free' if args.dry_run else 'freed'} {_size(freed)} under {root}")
    return 0


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _cache_label(entry) -> str:
    identity = entry.identity or {}
    return f"{identity.get('dataset', '?')}/{identity.get('split', '?')}"


def _print_cache_table(root: Path, entries) -> None:
    import time

    def when(stamp: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"

    print(f"prediction caches under {root}:")
    header = ("STATE", "DATASET/SPLIT", "MODEL / WEIGHTS", "SAMPLES", "SIZE", "LAST USED", "BUILT", "DIRECTORY")
    rows = []
    for entry in entries:
        identity = entry.identity or {}
        weights = str(identity.get("weights", "?"))
        weights = weights[:19] + "..." if len(weights) > 22 else weights
        state = entry.state
        if entry.state == "partial":
            state += " (building)" if entry.running else " (stopped)"
        elif entry.in_use:
            state += " (in use)"
        samples = "-" if entry.num_samples is None else (
            f"{entry.done_samples}/{entry.num_samples}" if entry.done_samples is not None else str(entry.num_samples))
        rows.append((state, _cache_label(entry), f"{identity.get('model', '?')} / {weights}", samples,
                     _size(entry.bytes), when(entry.last_used), when(entry.built_at), entry.directory.name))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for entry in entries:
        if entry.problem:
            print(f"{entry.directory.name}: {entry.problem}")
    if not entries:
        print("(none)")
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


def _print_transduct(dataset: str, split: str, entry: dict, method: str) -> None:
    def pct(value: float | None) -> str:
        return "n/a (no labels)" if value is None else f"{100 * value:.2f}%"

    zeroshot = entry["zeroshot"]
    state = "read from" if entry["derived"]["hit"] else "written to"
    print(f"{dataset}/{split}: {method}: top-1 {pct(entry['top1'])} (zero-shot {pct(zeroshot['top1'])}), "
          f"mean per-class recall {pct(entry['mean_per_class_recall'])} "
          f"(zero-shot {pct(zeroshot['mean_per_class_recall'])}), "
          f"imbalance {_imbalance(entry.get('imbalance_ratio'))} "
          f"(zero-shot {_imbalance(zeroshot.get('imbalance_ratio'))})")
    print(f"  refined predictions {state} {entry['derived']['directory']}")


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
    _print_label_free(report)
    for note in report.get("notes", []):
        print(f"  note: {note}")
    print(f"  report: {Path(run_dir) / 'report.json'}")


def _print_label_free(report: dict) -> None:
    """The label-free diagnostics of the test set (reports.label_free), one line per model."""
    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    rows = [(name, report.get(key, {}).get("label_free")) for name, key in
            (("CLIP zero-shot", "clip_zeroshot"), ("student", "student"), ("EMA teacher", "ema"))]
    rows = [(name, entry) for name, entry in rows if entry]
    if not rows:
        return
    print("  label-free (test set): agreement with CLIP / estimated top-1 (average confidence) / "
          "imbalance / empty classes / normalised entropy")
    for name, entry in rows:
        estimate = entry["estimated_accuracy"]
        truth = "" if estimate.get("true_top1") is None else f" (true top-1 {share(estimate['true_top1'])})"
        ratio = entry["imbalance_ratio"]
        entropy = entry["normalized_entropy"]
        print(f"    {name:15s} {share(entry['agreement_with_clip'])} / {share(estimate['value'])}{truth} / "
              f"{_imbalance(ratio)} / {entry['num_empty_classes']} / "
              f"{'n/a' if entropy is None else f'{entropy:.3f}'}")


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


EXIT_CELLS_FAILED = 1  # `zsa suite`: some cells failed (the others ran; their errors are in the table)


def _suite(args: argparse.Namespace) -> int:
    from zeroshot_adapt import suite

    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"config file {args.config!r} does not exist")
    entries = suite.dataset_entries(args.datasets)
    settings = suite.SuiteSettings(out_dir=Path(args.out), config_file=args.config,
                                   overrides=tuple(_overrides(args)))
    try:
        summary = suite.run_suite(entries, args.methods, args.seeds, settings)
    except suite.SuiteInterrupted as error:
        print(f"zsa: interrupted ({error}); re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    out = Path(args.out)
    print((out / suite.RESULTS_MD).read_text())
    print(f"{len(summary.ran)} cells run, {len(summary.skipped)} finished before, {summary.num_failed} failed; "
          f"table: {out / suite.RESULTS_MD}, {out / suite.RESULTS_CSV}; records: {out / suite.RECORDS_DIR}")
    return EXIT_CELLS_FAILED if summary.num_failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from zeroshot_adapt import pipeline, suite
    from zeroshot_adapt.stages import run_config

    trained = run_config(args.run_dir)
    if args.cache_dir is not None:
        trained = replace(trained, teacher=replace(trained.teacher, cache_dir=str(Path(args.cache_dir).expanduser())))
    if args.num_workers is not None:
        trained = replace(trained, data=replace(trained.data, num_workers=args.num_workers))
    configs = [(entry.name, pipeline.variant_config(trained, entry.dataset, data_dir=entry.data_dir,
                                                    prompts=entry.prompts))
               for entry in suite.dataset_entries(args.datasets)]
    out = Path(args.out) if args.out else Path(args.run_dir) / "robustness"
    report = pipeline.robustness_report(args.run_dir, configs, out)
    print(report["table"])
    print(f"report: {out / 'robustness.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from zeroshot_adapt.export import export_run

    result = export_run(args.run_dir, args.out, weights=args.weights, force=args.force)
    print(f"exported the run's {result.weights} ({result.architecture}) to {result.out_dir}: "
          f"{', '.join(result.files)}; loaded back, max |logit difference| {result.max_logit_difference:.2g}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from zeroshot_adapt.predict import Predictor, summary_path, write_predictions_csv
    from zeroshot_adapt.reports.metrics import write_json

    predictor = Predictor.load(args.model, device=args.device)
    result = predictor.predict_folder(args.data_dir, top_k=args.top_k, batch_size=args.batch_size,
                                      num_workers=args.num_workers)
    out = write_predictions_csv(result, args.out)
    sidecar = write_json({"model": str(args.model), "data_dir": str(args.data_dir), **result.summary()},
                         summary_path(out))
    print(f"{len(result.keys)} image(s) predicted (top-{result.top_k}) -> {out}; {len(result.skipped)} skipped "
          f"(listed in {sidecar})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as error:
        from zeroshot_adapt.data.datasets import worker_user_error

        print(f"zsa: error: {worker_user_error(error) or error}", file=sys.stderr)  # a worker's: its own message
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("zsa: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
