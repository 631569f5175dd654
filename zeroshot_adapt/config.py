"""Typed, frozen run configuration: defaults < recipe < dataset preset < YAML file < `--set key=value` overrides.

The defaults are the `fast` recipe: the official DebiasPL ImageNet optimizer, loss weights and thresholds
(REFERENCE.md section 1) without multi-view, CLD and CLIP fill; `paper` adds them (see RECIPES).
The resolved config is written to every run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zeroshot_adapt.errors import UserError
from zeroshot_adapt.fileio import atomic_write_text


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None  # local image folder, saved HF dataset, or MNIST IDX folder
    train_split: str | None = None  # None: the dataset's default
    test_split: str | None = None
    holdout_fraction: float = 0.2  # sources with one split only: held-out test part (fixed seed)
    image_size: int = 224  # student input size
    num_workers: int = 2
    # hub source overrides (harden): a script-free copy or the parquet export of a repo that holds a loading script
    hf_id: str | None = None  # None: the dataset's registered hub id (e.g. timm/eurosat-rgb instead of tanganke's)
    hf_revision: str | None = None  # branch / tag / commit of the hub repo, e.g. refs/convert/parquet
    # Per-sample content ids for the prediction cache: "stat" (size + mtime_ns + inode of each file; cheap) or
    # "content" (sha256 of each file's bytes; one full read per load, survives copying the data elsewhere).
    fingerprint: str = "stat"
    # --- input pipeline (data/device.py) ---
    pipeline: str = "cpu"  # cpu: workers decode + augment (PIL); device: the accelerator does; auto: device on CUDA
    # --- recipes (issue 8) ---
    augment: str = "imagenet"  # view recipe: imagenet (RandomResizedCrop) | small (pad-crop, Cutout); never inferred
    hflip: bool | None = None  # horizontal flips in the views; None: the dataset's own (DatasetSpec.hflip)


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "RN50-quickgelu"
    pretrained: str = "openai"  # open_clip tag or a local checkpoint path
    prompts: str | None = None  # prompt file name in prompts/ or a path; None: the dataset's own
    # Your own classes (--classes FILE: one class name per line, in label order) and templates (--templates
    # FILE: one per line, `{}` or `{c}` slot; default CLIP's ImageNet templates from open_clip). Both are in
    # the cache identity through the prompt set. With dataset imagefolder, --classes makes every image
    # unlabeled: subfolders are organisation, not classes.
    classes: str | None = None
    templates: str | None = None
    batch_size: int = 256  # part of the cache identity (batch shapes can change the last bits of the results)
    # Rows per cache shard (the unit of resumption and of the split across processes), rounded up to a whole
    # number of batches so batch boundaries never depend on it. 1024: an interrupted build loses < 1024 images
    # per process, and a 27k-image set splits evenly across several processes (8192 gave 4 uneven shards).
    shard_size: int = 1024
    num_workers: int | None = None  # decoding workers for the cache build; None: chosen from measured costs
    cache_dir: str | None = None  # None: $ZSA_CACHE_DIR or ~/.cache/zeroshot-adapt
    # --- model-side speed (models/acceleration.py) ---
    precision: str = "fp16"  # autocast of the cache build on CUDA: fp16 | bf16 | fp32 (CPU: always fp32)
    channels_last: bool = False
    compile: bool = False  # torch.compile the image tower in place


@dataclass(frozen=True)
class PseudoLabelConfig:
    tau_clip: float = 0.95
    # Which confident samples form the labeled set: "threshold" (confidence >= tau_clip, the paper's rule)
    # or "topk" (GRIP, Menghini et al. NeurIPS 2023: the most confident samples of each predicted class,
    # per_class of them or a per_class_fraction of the class; tau_clip is then not used).
    select: str = "threshold"
    per_class: int | None = None
    per_class_fraction: float | None = None
    # --- recipes (issue 8) ---
    unlabeled_set: str = "all"  # T-ZSL unlabeled set: all (every valid image) | unselected (not kept at tau_clip)


@dataclass(frozen=True)
class TransductConfig:
    """Training-free refinement of the teacher's cached predictions (`zsa transduct`, `--teacher-method`).

    Defaults come from the papers (see each module of zeroshot_adapt.transduct), not from tuning here."""

    method: str = "zeroshot"  # a method or a comma-separated chain, e.g. "label-propagation,sinkhorn"
    debias_tau: float = 1.0  # 1: divide by the predicted marginal (post-hoc logit adjustment)
    prior_em_source_prior: str = "uniform"  # the classifier's own prior: uniform or a JSON file of C numbers
    prior_em_max_iterations: int = 1000
    prior_em_tolerance: float = 1e-6  # max absolute change of the estimated prior
    sinkhorn_marginal: str = "uniform"  # uniform | prior-em | a JSON file of C numbers
    sinkhorn_epsilon: float = 1.0  # entropic regulariser on the cost -log p (-> 0: OTTER's hard assignment)
    sinkhorn_max_iterations: int = 1000
    sinkhorn_tolerance: float = 1e-6  # L1 distance of the predicted marginal to the target
    lp_knn: int = 5  # ZLaP
    lp_gamma: float = 3.0  # Iscen et al. 2019 (ZLaP: 3-5)
    lp_alpha: float = 0.99  # Zhou et al. 2004, Iscen et al. 2019
    lp_text_nodes: bool = True  # ZLaP: the C class text embeddings as labelled nodes
    lp_text_gamma: float = 5.0  # ZLaP: power of the image-text similarities
    transclip_knn: int = 3  # TransCLIP's official solver
    transclip_lambda: float = 1.0
    transclip_iterations: int = 10
    transclip_z_steps: int = 5
    knn_exact_max_samples: int = 4_000  # exact faiss search up to here, IVF above: the measured crossover
    # of their graph times (benchmarks/transduct.py: 1024-d, 2 CPU cores; IVF recall@5 there 0.987)
    knn_nprobe: int = 32  # IVF lists visited per query
    knn_memory_mb: int = 4096  # budget for the kNN index, one batch of rows and the propagation solver
    knn_device: str = "auto"  # auto (GPU faiss when present) | cpu | gpu


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "debiaspl"
    threshold: float = 0.8  # confidence cut for the student's pseudo-labels
    lambda_u: float = 10.0
    tau: float = 0.4  # debias factor (one tau for both the pseudo-label and the margin)
    prior_momentum: float = 0.99
    multiview: bool = False
    clip_fill_threshold: float | None = None  # CLIP fill (T-ZSL, or SSL with ssl.use_clip); None: off
    extra: dict[str, Any] = field(default_factory=dict)  # algorithm-specific knobs
    # --- recipes (issue 8) ---
    lambda_cld: float = 0.0  # weight of the CLD loss; 0: off
    cld_grouping: str = "argmax"  # CLD group index of p_w: argmax (ours) | argmin (the official code's)


@dataclass(frozen=True)
class StudentConfig:
    arch: str = "resnet50"  # any timm model name
    pretrained: str | None = None  # None: random init; a timm tag ("timm"), or a local checkpoint path
    ema_momentum: float = 0.999  # EMAN teacher
    # --- model-side speed (models/acceleration.py); precision is optim.mixed_precision ---
    channels_last: bool = False
    compile: bool = False  # torch.compile the student and the EMAN teacher in place
    # --- recipes (issue 8) ---
    allow_label_leakage: bool = False  # True: allow T-ZSL from weights trained with the target dataset's labels
    # --- CLIP as the student (arch "clip", models/clip_student.py; ignored by other archs) ---
    clip_train: str = "all"  # what trains: all | last-blocks (last clip_train_blocks blocks + norms + head)
    clip_train_blocks: int = 2  # last-blocks: how many of the image tower's last residual blocks train


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    epochs: int = 50
    # Linear warm-up, capped at MAX_WARMUP_FRACTION of the run's steps (logged when it binds): a short run
    # (`--epochs 1` under the default 5 warm-up epochs) gets a scaled-down warm-up instead of being all warm-up.
    warmup_epochs: float = 5.0
    steps_per_epoch: int | None = None  # None: one pass over the unlabeled set per epoch
    batch_size: int = 64  # labeled batch, global (split across processes)
    mu: int = 5  # unlabeled batch = mu * batch_size
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16


@dataclass(frozen=True)
class SSLConfig:
    """Semi-supervised mode: a human-labeled subset replaces the CLIP-selected labeled set.

    Exactly one of labels_fraction / labels_per_class / labels_file turns SSL on."""

    labels_fraction: float | None = None  # e.g. 0.01 (ImageNet 1%), 0.002 (0.2%)
    labels_per_class: int | None = None  # e.g. 4 (CIFAR-10, 40 labels)
    labels_file: str | None = None  # one sample key per line
    long_tail_ratio: float | None = None  # subsample the training set long-tailed (gamma, e.g. 100)
    use_clip: bool = False  # CLIP fill (needs algorithm.clip_fill_threshold) from the cached predictions

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.labels_fraction, self.labels_per_class, self.labels_file))


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    transduct: TransductConfig = field(default_factory=TransductConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every_steps: int = 200
    eval_every_epochs: int = 1
    log_with: str | None = None  # an Accelerate tracker: tensorboard, wandb, ... (None: JSONL only)
    # --- recipes (issue 8) ---
    recipe: str = "fast"  # the named preset under the dataset preset: fast | paper (see RECIPES)


# ----------------------------------------------------------------------------- constraints

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
# Warm-up never takes more than this share of a run's optimizer steps (optim.warmup_epochs is capped, with a
# log line): scaling beats refusing, so `--epochs 1` still trains; 0.5 leaves every shipped recipe unchanged
# (the paper's 5 of 50 epochs, the digits demo's 0.5 of 6) and keeps at least half the run at the full rate.
MAX_WARMUP_FRACTION = 0.5


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> tuple[int, bool]:
    """(warm-up steps, whether the MAX_WARMUP_FRACTION cap bound): round(warmup_epochs * steps_per_epoch),
    at most floor(MAX_WARMUP_FRACTION * total_steps)."""
    asked = int(round(warmup_epochs * steps_per_epoch))
    cap = int(MAX_WARMUP_FRACTION * total_steps)
    return (cap, True) if asked > cap else (asked, False)


@dataclass(frozen=True)
class Constraint:
    """The valid values of one config key: a numeric range (each end open or closed) or a set of choices.

    Every value is also checked to be finite (no NaN / inf). None is valid exactly where the field is
    optional, and then bypasses the constraint."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    non_empty: bool = False

    def allows(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.non_empty:
            return isinstance(value, str) and value.strip() != ""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        def show(bound: float) -> str:
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        if self.non_empty:
            return "a non-empty string"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{show(self.low)}, {show(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {show(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {show(self.high)}"
        return "a finite number"


def at_least(low: float) -> Constraint:
    return Constraint(low=low)


def above(low: float) -> Constraint:
    return Constraint(low=low, low_open=True)


UNIT = Constraint(0.0, 1.0)  # [0, 1]
MOMENTUM = Constraint(0.0, 1.0, high_open=True)  # [0, 1)
FINITE = Constraint()

CLIP_TRAIN_MODES = ("all", "last-blocks")
"""student.clip_train: what of a CLIP student (student.arch=clip) trains (models/clip_student.py)."""

CONSTRAINTS: dict[str, Constraint] = {
    "data.holdout_fraction": MOMENTUM,
    "data.image_size": at_least(1),
    "data.num_workers": at_least(0),
    "teacher.batch_size": at_least(1),
    "teacher.shard_size": at_least(1),
    "teacher.num_workers": at_least(0),
    "pseudo.tau_clip": Constraint(0.0, 1.0, low_open=True),
    "algorithm.threshold": UNIT,
    "algorithm.lambda_u": at_least(0),
    "algorithm.tau": at_least(0),
    "algorithm.prior_momentum": MOMENTUM,
    "algorithm.clip_fill_threshold": UNIT,
    "student.ema_momentum": UNIT,
    "optim.lr": above(0),
    "optim.momentum": MOMENTUM,
    "optim.weight_decay": at_least(0),
    "optim.epochs": at_least(1),
    "optim.warmup_epochs": at_least(0),
    "optim.steps_per_epoch": at_least(1),
    "optim.batch_size": at_least(1),
    "optim.mu": at_least(1),
    "optim.grad_accum": at_least(1),
    "optim.mixed_precision": Constraint(choices=("no", "fp16", "bf16")),
    "ssl.labels_fraction": Constraint(0.0, 1.0, low_open=True, high_open=True),
    "ssl.labels_per_class": at_least(1),
    "ssl.long_tail_ratio": at_least(1),
    "seed": Constraint(0, MAX_SEED),
    "run_dir": Constraint(non_empty=True),
    "checkpoint_every_steps": at_least(1),
    "eval_every_epochs": at_least(1),
    "data.fingerprint": Constraint(choices=("stat", "content")),
    # --- input pipeline and model-side speed ---
    "data.pipeline": Constraint(choices=("cpu", "device", "auto")),
    "teacher.precision": Constraint(choices=("fp16", "bf16", "fp32")),
    # transduct (training-free teacher refinement) and class-balanced selection
    "pseudo.select": Constraint(choices=("threshold", "topk")),
    "pseudo.per_class": at_least(1),
    "pseudo.per_class_fraction": Constraint(0.0, 1.0, low_open=True),
    "transduct.method": Constraint(non_empty=True),
    "transduct.debias_tau": at_least(0),
    "transduct.prior_em_source_prior": Constraint(non_empty=True),
    "transduct.prior_em_max_iterations": at_least(1),
    "transduct.prior_em_tolerance": above(0),
    "transduct.sinkhorn_marginal": Constraint(non_empty=True),
    "transduct.sinkhorn_epsilon": above(0),
    "transduct.sinkhorn_max_iterations": at_least(1),
    "transduct.sinkhorn_tolerance": above(0),
    "transduct.lp_knn": at_least(1),
    "transduct.lp_gamma": above(0),
    "transduct.lp_alpha": MOMENTUM,
    "transduct.lp_text_gamma": above(0),
    "transduct.transclip_knn": at_least(1),
    "transduct.transclip_lambda": at_least(0),
    "transduct.transclip_iterations": at_least(0),
    "transduct.transclip_z_steps": at_least(1),
    "transduct.knn_exact_max_samples": at_least(0),
    "transduct.knn_nprobe": at_least(1),
    "transduct.knn_memory_mb": at_least(16),
    "transduct.knn_device": Constraint(choices=("auto", "cpu", "gpu")),
    # --- recipes (issue 8) ---
    "data.augment": Constraint(choices=("imagenet", "small")),
    "pseudo.unlabeled_set": Constraint(choices=("all", "unselected")),
    "algorithm.lambda_cld": at_least(0),
    "algorithm.cld_grouping": Constraint(choices=("argmax", "argmin")),
    "recipe": Constraint(choices=("fast", "paper")),
    # --- CLIP as the student ---
    "student.clip_train": Constraint(choices=CLIP_TRAIN_MODES),
    "student.clip_train_blocks": at_least(1),
}
"""Valid values per dotted key. Every int / float field must have an entry (a test checks it)."""

CLI_FLAGS: dict[str, str] = {
    "data.data_dir": "--data-dir",
    "data.num_workers": "--num-workers",
    "teacher.model": "--model",
    "teacher.pretrained": "--pretrained",
    "teacher.prompts": "--prompts",
    "teacher.classes": "--classes",
    "teacher.templates": "--templates",
    "teacher.cache_dir": "--cache-dir",
    "pseudo.tau_clip": "--tau-clip",
    "algorithm.name": "--algorithm",
    "algorithm.clip_fill_threshold": "--clip-fill",
    "optim.epochs": "--epochs",
    "ssl.labels_fraction": "--label-fraction",
    "ssl.labels_per_class": "--labels-per-class",
    "ssl.labels_file": "--labels-file",
    "ssl.long_tail_ratio": "--long-tail",
    "run_dir": "--run-dir",
    "seed": "--seed",
    "data.pipeline": "--pipeline",
    # transduct
    "transduct.method": "--teacher-method",
    "pseudo.select": "--select",
    "pseudo.per_class": "--per-class",
    "pseudo.per_class_fraction": "--per-class-fraction",
    "transduct.debias_tau": "--debias-tau",
    "transduct.sinkhorn_marginal": "--sinkhorn-marginal",
    "transduct.lp_knn": "--lp-knn",
    "transduct.lp_alpha": "--lp-alpha",
    "transduct.lp_gamma": "--lp-gamma",
    "transduct.transclip_knn": "--transclip-knn",
    "transduct.transclip_lambda": "--transclip-lambda",
    "transduct.knn_memory_mb": "--knn-memory-mb",
    # --- recipes (issue 8) ---
    "recipe": "--recipe",
    "student.pretrained": "--student-init",
}
"""The `zsa` flag that sets each key (cli.py builds its flags from this table; errors name both)."""


# ----------------------------------------------------------------------------- recipes (issue 8)

RUN_MODES = ("tzsl", "ssl", "ssl+clip")
"""What a run is, for recipes that differ by it: transductive zero-shot (`zsa adapt`), semi-supervised
(`zsa ssl`), semi-supervised with CLIP fill (`zsa ssl --clip-fill`, i.e. ssl.use_clip)."""

FAST_RECIPE: dict[str, Any] = {
    # The defaults of the dataclasses above (the official optimizer, loss weights and thresholds, REFERENCE.md
    # section 1) WITHOUT the three extras of the official run: one weak + one strong view instead of two + two
    # (about half the compute per step), no CLD loss, no CLIP fill.
    "algorithm.multiview": False,
    "algorithm.lambda_cld": 0.0,
    "algorithm.clip_fill_threshold": None,
}

PAPER_RECIPE: dict[str, Any] = {
    # The official DebiasPL ImageNet settings; every value from REFERENCE.md section 1 unless noted.
    "algorithm.name": "debiaspl",
    "algorithm.threshold": 0.8,  # "threshold 0.8"
    "algorithm.tau": 0.4,  # "tau 0.4" (one tau for both terms)
    "algorithm.prior_momentum": 0.99,  # "prior momentum 0.99"
    "algorithm.lambda_u": 10.0,  # "lambda_u 10"
    "algorithm.multiview": True,  # "multi-view" (the T-ZSL run behind 68.7%; the SSL scripts pass --multiviews)
    "algorithm.lambda_cld": 0.3,  # "CLD 0.3" (the official T-ZSL script)
    # our default grouping, not the official argmin ("almost surely a slip"): --set algorithm.cld_grouping=argmin
    "algorithm.cld_grouping": "argmax",
    "student.arch": "resnet50",  # "ResNet-50 initialised from a self-supervised MoCo v2 + EMAN checkpoint"
    "student.ema_momentum": 0.999,  # "EMAN ... (m = 0.999)"
    "optim.lr": 0.003,  # "SGD lr 0.003 (T-ZSL)" (the SSL scripts use 0.003 too, benchmarks/SSL.md)
    "optim.momentum": 0.9,  # "momentum 0.9"
    "optim.weight_decay": 1e-4,  # "wd 1e-4"
    "optim.nesterov": False,  # "no nesterov"
    "optim.warmup_epochs": 5.0,  # "5 warmup epochs then cosine"
    "optim.epochs": 50,  # "50 epochs (the paper's 68.3% used 100)"
    "optim.batch_size": 64,  # "labeled batch 64 (global)"
    "optim.mu": 5,  # "mu 5 (unlabeled batch = 5 x labeled batch)"
}
"""The paper recipe's shared part. The views (224 px, ImageNet augmentation) come from the dataset presets:
ImageNet and the appendix's EuroSAT, MNIST, DTD, GTSRB, Flowers102 "follow the training recipe of ImageNet-1K"."""

PAPER_RECIPE_BY_MODE: dict[str, dict[str, Any]] = {
    "tzsl": {
        "pseudo.tau_clip": 0.95,  # "Its labeled file is the tau_clip 0.95 selection"
        "pseudo.unlabeled_set": "all",  # "default: every image unlabeled" (the official file is not public)
        "algorithm.clip_fill_threshold": 0.3,  # "CLIP fill always on at CLIP confidence >= 0.3"
    },
    "ssl": {},  # threshold 0.8, prior momentum 0.99; the 1% run's 0.999 is in benchmarks/paper/
    "ssl+clip": {
        "algorithm.threshold": 0.7,  # "threshold 0.8 (0.7 for SSL with CLIP)"
        "algorithm.clip_fill_threshold": 0.4,  # section 2: "a fill threshold (0.3 in T-ZSL, 0.4 in SSL)"
    },
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "fast": dict.fromkeys(RUN_MODES, FAST_RECIPE),
    "paper": {mode: {**PAPER_RECIPE, **extra} for mode, extra in PAPER_RECIPE_BY_MODE.items()},
}
"""recipe name -> run mode -> dotted overrides. Layering (pipeline.resolve_config): defaults < recipe <
dataset preset < YAML file < --set. Dataset presets sit above recipes because they hold what the data needs
(image size, view recipe, flips) and, for the offline demo, a student and budget that fit a CPU."""


def run_mode(config: RunConfig) -> str:
    """'tzsl', 'ssl' or 'ssl+clip' (see RUN_MODES)."""
    if not config.ssl.enabled:
        return "tzsl"
    return "ssl+clip" if config.ssl.use_clip else "ssl"


def recipe_overrides(name: str, mode: str) -> dict[str, Any]:
    """The dotted overrides of recipe `name` for a run of `mode`; a UserError lists the valid names."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return dict(RECIPES[name][mode])


def describe_recipe(config: RunConfig) -> str:
    """One line saying what a resolved config will run (printed at the start of `zsa adapt` / `zsa ssl`)."""
    algo, optim, data, student = config.algorithm, config.optim, config.data, config.student
    init = student.pretrained or "random init"
    size = f"{data.image_size} px"
    if student.arch == "clip":  # CLIP as the student: the teacher's weights, input size and normalization
        init = f"{student.pretrained or 'CLIP ' + config.teacher.model + ' zero-shot'}, clip_train {student.clip_train}"
        size = "CLIP-sized"
    cld = f"CLD {algo.lambda_cld:g} ({algo.cld_grouping} groups)" if algo.lambda_cld > 0 else "no CLD"
    fill = f"CLIP fill >= {algo.clip_fill_threshold:g}" if algo.clip_fill_threshold is not None else "no CLIP fill"
    views = "multi-view (2 weak + 2 strong)" if algo.multiview else "single view"
    flip = "" if data.hflip is None else (", flips" if data.hflip else ", no flips")
    return (
        f"recipe {config.recipe} ({run_mode(config)}): {algo.name}, {views}, {cld}, {fill}, tau {algo.tau:g}, "
        f"threshold {algo.threshold:g}; student {student.arch} ({init}); {size} {data.augment} "
        f"views{flip}; {optim.epochs} epochs, batch {optim.batch_size} + {optim.mu}x unlabeled, lr {optim.lr:g}"
    )


def iter_fields(config: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any]]:
    """(dotted key, annotation, value) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", hints[item.name], value


def describe_key(key: str) -> str:
    flag = CLI_FLAGS.get(key)
    return f"{key} ({flag})" if flag else key


def validate_config(config: RunConfig) -> RunConfig:
    """Check every field of a resolved config against its type and CONSTRAINTS, and the cross-field rules;
    raise one UserError listing every problem (key, CLI flag, value, valid range). Returns the config."""
    problems = []
    for key, annotation, value in iter_fields(config):
        if value is None:
            if not _is_optional(annotation):
                problems.append(f"{describe_key(key)} needs a value (null is not allowed)")
            continue
        constraint = CONSTRAINTS.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{describe_key(key)}={value!r} must be a finite number")
        elif constraint is not None and not constraint.allows(value):
            problems.append(f"{describe_key(key)}={value!r} must be {constraint.describe()}")
    optim = config.optim
    if not problems and optim.batch_size % optim.grad_accum:
        problems.append(
            f"optim.batch_size={optim.batch_size} must be divisible by optim.grad_accum={optim.grad_accum} "
            "(the labeled batch is split into grad_accum micro-batches)"
        )
    problems += _selection_problems(config)
    problems += [] if problems else _recipe_rules(config)
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def _selection_problems(config: RunConfig) -> list[str]:
    """pseudo.select=topk needs exactly one of per_class / per_class_fraction; threshold takes neither."""
    pseudo = config.pseudo
    given = [key for key in ("per_class", "per_class_fraction") if getattr(pseudo, key) is not None]
    if pseudo.select == "topk" and len(given) != 1:
        return [f"pseudo.select (--select)=topk needs exactly one of pseudo.per_class (--per-class) and "
                f"pseudo.per_class_fraction (--per-class-fraction); got {', '.join(given) or 'neither'}"]
    if pseudo.select == "threshold" and given:
        return [f"pseudo.{given[0]} ({CLI_FLAGS[f'pseudo.{given[0]}']}) only applies with pseudo.select=topk "
                "(--select topk); the threshold rule keeps confidence >= tau_clip"]
    return []
def _recipe_rules(config: RunConfig) -> list[str]:
    """Cross-field rules of the recipe fields (issue 8): CLIP fill needs CLIP labels, and CLIP labels in SSL
    are loaded only to be used."""
    problems = []
    ssl, fill = config.ssl, config.algorithm.clip_fill_threshold
    if ssl.enabled and fill is not None and not ssl.use_clip:
        problems.append(
            f"algorithm.clip_fill_threshold (--clip-fill)={fill:g} in SSL needs CLIP labels: set ssl.use_clip=true "
            "(`zsa ssl --clip-fill THRESHOLD` does both), or drop the fill threshold"
        )
    if ssl.enabled and ssl.use_clip and fill is None:
        problems.append(
            "ssl.use_clip=true loads CLIP's predictions but nothing uses them without a fill threshold: "
            "pass --clip-fill THRESHOLD (the paper's SSL value is 0.4) or use --recipe paper"
        )
    return problems


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _is_optional(annotation: Any) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def _coerce(value: Any, annotation: Any, dotted: str) -> Any:
    """Turn a YAML / command-line value into the annotated field type, strictly, or raise a UserError.

    No silent conversions: a float is never truncated to an int (2.7 is refused, 3.0 is 3), a boolean is
    never a number, and null is accepted only where the field is optional. Ranges are checked later, on
    the whole resolved config (:func:`validate_config`)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], dotted)
    if value is None:
        raise UserError(f"{dotted} needs a value; null is allowed only for optional keys")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{dotted}={value!r} is not a boolean (use true or false)")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"{dotted}={value!r} is a boolean, not a valid int")
        if isinstance(value, float):
            if math.isfinite(value) and value.is_integer():
                return int(value)
            raise UserError(f"{dotted}={value!r} is not a valid int (whole numbers only; nothing is rounded)")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{dotted}={value!r} is not a valid int") from None
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"{dotted}={value!r} is a boolean, not a valid float")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{dotted}={value!r} is not a valid float") from None
    if annotation is str:
        if isinstance(value, (bool, list, dict)):
            raise UserError(f"{dotted}={value!r} is not a valid str")
        return str(value)
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = _parse_yaml_value(value, dotted)
        if not isinstance(value, dict):
            raise UserError(f"{dotted}={value!r} is not a mapping")
        return dict(value)
    return value


def _parse_yaml_value(raw: str, dotted: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise UserError(f"the value given for {dotted} is not valid YAML: {raw!r} ({_yaml_problem(error)})") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def _replace(config: Any, dotted: str, value: Any, full: str) -> Any:
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(config)}
    if head not in fields:
        raise UserError(f"unknown config key {full!r}; valid at this level: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(type(config))
    current = getattr(config, head)
    if rest:
        if dataclasses.is_dataclass(current):
            return dataclasses.replace(config, **{head: _replace(current, rest, value, full)})
        if isinstance(current, dict):  # free-form mapping such as algorithm.extra
            return dataclasses.replace(config, **{head: {**current, rest: value}})
        raise UserError(f"config key {full!r}: {head!r} has no sub-keys")
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise UserError(f"config key {full!r} is a section; give a mapping or set its sub-keys")
        for key, sub in value.items():
            config = _replace(config, f"{head}.{key}", sub, f"{full}.{key}")
        return config
    return dataclasses.replace(config, **{head: _coerce(value, hints[head], full)})


def apply_mapping(config: RunConfig, mapping: dict[str, Any], prefix: str = "") -> RunConfig:
    """Apply a nested (YAML-style) or dotted mapping of overrides."""
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        config = _replace(config, dotted, value, dotted)
    return config


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` strings; values are parsed as YAML scalars (`0.5`, `true`, `none`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. algorithm.tau=0.5)")
        key = key.strip()
        config = _replace(config, key, _parse_yaml_value(raw, key) if raw else "", key)
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; a UserError names the file and says what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping at its top level")
    return data


def save_yaml(config: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def from_dict(mapping: dict[str, Any]) -> RunConfig:
    return apply_mapping(RunConfig(), mapping)
