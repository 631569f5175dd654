"""The only place the stages meet: teacher cache -> filter -> train -> evaluate.

Each public function takes a resolved RunConfig and writes its results (JSON, PNG) to a folder.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zeroshot_adapt.cache import CacheMiss, PredictionCache, build_cache
from zeroshot_adapt.config import (
    RunConfig,
    apply_mapping,
    apply_overrides,
    describe_recipe,
    load_yaml,
    recipe_overrides,
    run_mode,
    save_yaml,
    to_dict,
    validate_config,
)
from zeroshot_adapt.data.base import SampleTable
from zeroshot_adapt.data.registry import get_spec, load_split
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.fileio import atomic_write
from zeroshot_adapt.pseudo_labels import select_confident, selection_report, threshold_sweep
from zeroshot_adapt.reports.metrics import classification_report, write_json
from zeroshot_adapt.teacher.prompts import PromptSet, custom_prompts, load_prompts

log = logging.getLogger(__name__)

PREDICTION_FIELDS = ("logits", "features", "confidence", "prediction", "valid")


# ----------------------------------------------------------------------------- configuration


def resolve_config(
    dataset: str | None = None,
    *,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """defaults < the recipe (``recipe``: fast | paper) < the dataset's recommended overrides < YAML file <
    `key=value` overrides; then validated as a whole.

    The recipe's name and the run mode it depends on (T-ZSL, SSL, SSL + CLIP: `config.run_mode`) are read
    from a first resolution without the recipe, so they can come from the file or the overrides.
    ``data.hflip`` left unset becomes the dataset's own (DatasetSpec.hflip), so config.yaml records it.
    """
    config = base or RunConfig()
    file_values = load_yaml(config_file) if config_file else {}
    name = dataset or file_values.get("data", {}).get("dataset") or config.data.dataset
    for item in overrides or []:
        if item.startswith("data.dataset="):
            name = item.split("=", 1)[1]
    spec = get_spec(name)

    def layered(recipe: dict[str, Any]) -> RunConfig:
        layered_config = replace(config, data=replace(config.data, dataset=name))
        layered_config = apply_mapping(layered_config, recipe)
        layered_config = apply_mapping(layered_config, dict(spec.overrides))
        layered_config = apply_mapping(layered_config, file_values)
        layered_config = replace(layered_config, data=replace(layered_config.data, dataset=name))
        return apply_overrides(layered_config, overrides or [])

    probe = layered({})  # which recipe, which mode
    resolved = layered(recipe_overrides(probe.recipe, run_mode(probe)))
    if resolved.data.hflip is None:
        resolved = replace(resolved, data=replace(resolved.data, hflip=spec.hflip))
    return validate_config(resolved)


def cache_root(config: RunConfig) -> Path:
    if config.teacher.cache_dir:
        return Path(config.teacher.cache_dir)
    env = os.environ.get("ZSA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "zeroshot-adapt" / "predictions"


# ----------------------------------------------------------------------------- data


def load_table(config: RunConfig, split: str) -> SampleTable:
    data = config.data
    split_name = data.train_split if split == "train" else data.test_split
    return load_split(
        data.dataset,
        split_name or split,
        data_dir=data.data_dir,
        holdout_fraction=data.holdout_fraction,
        seed=0,
    )


GENERIC_TEMPLATE = "a photo of a {}."


def prompts_for(config: RunConfig, table: SampleTable) -> PromptSet:
    """The --prompts file, else the dataset's own, else (generic image folders) its folder names with
    CLIP's generic template."""
    name = config.teacher.prompts or get_spec(config.data.dataset).prompts
    if name is None:
        if not table.class_names:
            raise UserError(f"dataset {config.data.dataset!r} has no class names: pass --prompts FILE.json")
        return custom_prompts(
            [c.replace("_", " ") for c in table.class_names], [GENERIC_TEMPLATE],
            provenance="class folder names with CLIP's generic template",
        )
    prompts = load_prompts(name)
    if table.class_names and len(prompts.classes) != len(table.class_names):
        raise UserError(
            f"prompt file {prompts.source or config.teacher.prompts!r} has {len(prompts.classes)} classes but dataset "
            f"{config.data.dataset!r} has {len(table.class_names)}; pass a matching --prompts file"
        )
    return prompts


# ----------------------------------------------------------------------------- teacher cache


@dataclass
class TeacherPredictions:
    """CLIP's cached predictions aligned with `table` (row i <-> table.keys[i])."""

    table: SampleTable
    prompts: PromptSet
    cache: PredictionCache
    rows: np.ndarray  # [N] rows in the cache

    def field(self, name: str) -> np.ndarray:
        """The cached field for the table's samples, in table order (read from the memory map)."""
        return np.asarray(self.cache.arrays[name][self.rows])

    @cached_property
    def prediction(self) -> np.ndarray:
        return self.field("prediction").astype(np.int64)

    @cached_property
    def confidence(self) -> np.ndarray:
        return self.field("confidence").astype(np.float32)

    @cached_property
    def valid(self) -> np.ndarray:
        """False for images that were corrupt when the cache was built (skipped and counted)."""
        return self.field("valid").astype(bool)

    @property
    def text_classifier(self) -> np.ndarray:
        """float32 [C, D]: the zero-shot classifier the logits were computed with (one L2-normalized prompt-
        ensemble embedding per class, in class order); logits = logit_scale * features @ text_classifier.T."""
        return np.asarray(self._attachment("text_classifier"), dtype=np.float32)

    @property
    def logit_scale(self) -> float:
        """The teacher's own exp(logit_scale) the cached logits were computed with (100 for OpenAI CLIP)."""
        return float(self._attachment("logit_scale"))

    def _attachment(self, name: str) -> np.ndarray:
        if name not in self.cache.attachments:
            raise UserError(
                f"the prediction cache {self.cache.directory} holds no {name!r}; delete it to rebuild it with this "
                "version"
            )
        return self.cache.attachments[name]

    def zeroshot_report(self) -> dict[str, Any]:
        """classification_report of CLIP on the valid samples (label-free entries are null without labels)."""
        valid = self.valid
        labels = np.asarray(self.table.labels)[valid] if self.table.has_labels else None
        logits = self.field("logits")[valid].astype(np.float32)
        return classification_report(logits, self.prediction[valid], labels, list(self.prompts.classes))


def cache_identity(config: RunConfig, table: SampleTable, prompts: PromptSet) -> dict[str, Any]:
    """Everything that changes CLIP's predictions; computed without loading (or downloading) the weights."""
    from zeroshot_adapt.teacher.clip import preprocess_description, resolve_weights

    weights = resolve_weights(config.teacher.model, config.teacher.pretrained)
    return {
        "model": weights.model_name,
        "weights": weights.weights_id,
        "templates": list(prompts.templates),
        "class_names": list(prompts.classes),
        "dataset": table.dataset,
        "split": table.split,
        "dataset_fingerprint": table.fingerprint,
        "num_samples": len(table),
        "preprocess": preprocess_description(weights),
    }


def teacher_predictions(config: RunConfig, split: str = "train", *, progress: bool = True) -> TeacherPredictions:
    """Open CLIP's predictions for `split` from the cache, building the cache first if it is missing.

    Under `accelerate launch` / `torchrun`, every process builds its share of the shards."""
    table = load_table(config, split)
    prompts = prompts_for(config, table)
    identity = cache_identity(config, table, prompts)
    root = cache_root(config)
    try:
        cache = PredictionCache.open(root, identity)
    except CacheMiss:
        cache = _build_teacher_cache(config, table, prompts, identity, root, progress=progress)
    return TeacherPredictions(table=table, prompts=prompts, cache=cache, rows=cache.lookup(list(table.keys)))


def _build_teacher_cache(config, table, prompts, identity, root, *, progress: bool) -> PredictionCache:
    from accelerate import PartialState

    from zeroshot_adapt.teacher.classifier import zeroshot_classifier
    from zeroshot_adapt.teacher.clip import load_clip
    from zeroshot_adapt.teacher.predict import predict_indices

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo multi-process on CPU
    clip = load_clip(config.teacher.model, config.teacher.pretrained, device=state.device)
    classifier = zeroshot_classifier(clip.model, clip.tokenizer, prompts, state.device)
    log.info(
        "building the CLIP cache for %s/%s (%d images, %s, %s) in %s",
        table.dataset, table.split, len(table), clip.model_name, clip.pretrained, root,
    )

    def compute(indices: np.ndarray) -> dict[str, np.ndarray]:
        return predict_indices(
            clip,
            classifier,
            table,
            indices,
            batch_size=config.teacher.batch_size,
            num_workers=config.data.num_workers if config.teacher.num_workers is None else config.teacher.num_workers,
            device=state.device,
        )

    return build_cache(
        root,
        identity,
        list(table.keys),
        compute,
        shard_size=config.teacher.shard_size,
        process_index=state.process_index,
        num_processes=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
        progress=progress and state.is_main_process,
        attachments={
            "text_classifier": classifier.T.float().cpu().numpy(),  # [C, D]
            "logit_scale": np.asarray(clip.logit_scale, dtype=np.float32),
        },
    )


# ----------------------------------------------------------------------------- reports


def zeroshot_report(config: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """CLIP zero-shot metrics for the train and test splits (when labeled), with the imbalance plot."""
    from zeroshot_adapt.reports.plots import plot_predictions_per_class

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dataset": config.data.dataset, "model": config.teacher.model,
                              "pretrained": config.teacher.pretrained}
    for split in ("train", "test"):
        preds = teacher_predictions(config, split)
        valid = preds.valid
        entry = preds.zeroshot_report()
        entry["num_samples"] = len(preds.table)
        entry["num_corrupt_skipped"] = int((~valid).sum())
        entry["plot"] = str(
            plot_predictions_per_class(
                np.bincount(preds.prediction[valid], minlength=len(preds.prompts.classes)),
                list(preds.prompts.classes),
                out_dir / f"zeroshot_{split}_predictions_per_class.png",
                title=f"CLIP zero-shot predictions per class — {config.data.dataset} {split}",
            )
        )
        report[split] = entry
    write_json(report, out_dir / "zeroshot.json")
    return report


def pseudolabel_report(config: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """Filter CLIP's train-split predictions at tau_clip; write the selected set, the stats and plots."""
    from zeroshot_adapt.reports.plots import plot_threshold_sweep

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tau = config.pseudo.tau_clip
    preds = teacher_predictions(config, "train")
    table, classes = preds.table, list(preds.prompts.classes)
    labels = np.asarray(table.labels) if table.has_labels else None
    confidence, prediction, valid = preds.confidence, preds.prediction, preds.valid  # corrupt: counted, not scored
    selected = select_confident(confidence, prediction, tau) & valid
    valid_labels = None if labels is None else labels[valid]
    report = selection_report(confidence[valid], prediction[valid], valid_labels, len(classes), tau, classes)
    report["num_corrupt_skipped"] = int((~valid).sum())
    sweep = threshold_sweep(confidence[valid], prediction[valid], valid_labels, len(classes), class_names=classes)
    report["sweep"] = sweep
    report["sweep_plot"] = str(plot_threshold_sweep(sweep, out_dir / "pseudolabel_threshold_sweep.png"))
    with atomic_write(out_dir / "pseudo_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)  # quotes keys holding commas, quotes or newlines
        writer.writerow(["key", "clip_label", "confidence", "selected"])
        for key, label, conf, keep in zip(table.keys, prediction, confidence, selected, strict=True):
            writer.writerow([key, int(label), f"{float(conf):.6f}", int(keep)])
    write_json(report, out_dir / "pseudolabels.json")
    return report


# ----------------------------------------------------------------------------- adaptation


@dataclass
class TrainingData:
    train: SampleTable
    test: SampleTable | None
    labeled_indices: np.ndarray  # rows of `train` used as the labeled set
    labeled_targets: np.ndarray  # their labels: CLIP's (T-ZSL) or human (SSL) — never ground truth in T-ZSL
    unlabeled_indices: np.ndarray  # SSL: never a labeled image; T-ZSL: pseudo.unlabeled_set (all / unselected)
    clip_label: np.ndarray | None  # aligned with unlabeled_indices
    clip_confidence: np.ndarray | None
    num_classes: int
    class_names: list[str]
    clip_test: dict[str, Any] | None  # CLIP zero-shot on the test split


def prepare_training_data(config: RunConfig) -> TrainingData:
    """Labeled / unlabeled sets for T-ZSL (CLIP-selected, CLIP labels) or SSL (human-labeled subset).

    Unlabeled set: SSL excludes the labeled images (as the official ImageNet 1% / 0.2% splits,
    `train_1p` + `train_99p`); T-ZSL keeps every valid image (``pseudo.unlabeled_set="all"``, the default) or
    only those not selected at tau_clip (``"unselected"``; the official T-ZSL unlabeled file is named
    `...-Unselected` but is not public). A long-tailed SSL split labels ``ceil(fraction * n_c)`` per class
    (CReST's protocol); a balanced one uses largest-remainder rounding.
    """
    from zeroshot_adapt import ssl as ssl_sets

    use_clip = not config.ssl.enabled or config.ssl.use_clip
    if use_clip:
        preds = teacher_predictions(config, "train")
        train, classes = preds.table, list(preds.prompts.classes)
        clip_label, clip_conf, valid = preds.prediction, preds.confidence, preds.valid
    else:
        train = load_table(config, "train")
        classes = list(train.class_names)
        clip_label = clip_conf = None
        valid = np.ones(len(train), bool)
    keep = np.flatnonzero(valid)
    if config.ssl.long_tail_ratio is not None:
        if not train.has_labels:
            raise UserError("ssl.long_tail_ratio needs a labeled training set to subsample")
        chosen = ssl_sets.long_tailed_subset(
            np.asarray(train.labels)[keep], config.ssl.long_tail_ratio, keys=[train.keys[i] for i in keep],
            seed=config.seed,
        )
        keep = keep[chosen]
    if config.ssl.enabled:
        if not train.has_labels and config.ssl.labels_file is None:
            raise UserError("SSL by fraction or per-class count needs ground-truth labels in the training split")
        chosen = ssl_sets.labeled_subset(
            np.asarray(train.labels)[keep],
            fraction=config.ssl.labels_fraction,
            per_class=config.ssl.labels_per_class,
            keys_file=config.ssl.labels_file,
            keys=[train.keys[i] for i in keep],
            seed=config.seed,
            rounding="ceil" if config.ssl.long_tail_ratio is not None else "largest_remainder",
        )
        labeled_indices = keep[chosen]
        labeled_targets = np.asarray(train.labels)[labeled_indices]
        if (labeled_targets < 0).any():
            raise UserError(
                f"{int((labeled_targets < 0).sum())} keys in {config.ssl.labels_file!r} have no ground-truth label"
            )
    else:
        selected = select_confident(clip_conf, clip_label, config.pseudo.tau_clip)
        labeled_indices = np.intersect1d(np.flatnonzero(selected), keep)
        labeled_targets = clip_label[labeled_indices]  # CLIP's labels, never the ground truth
    if config.ssl.enabled or config.pseudo.unlabeled_set == "unselected":
        unlabeled_indices = np.setdiff1d(keep, labeled_indices)  # sorted, like keep
    else:
        unlabeled_indices = keep
    if config.algorithm.clip_fill_threshold is not None and clip_label is None:
        raise UserError(
            f"CLIP fill (algorithm.clip_fill_threshold={config.algorithm.clip_fill_threshold:g}) needs CLIP's "
            "predictions, and this run has none: use `zsa ssl --clip-fill THRESHOLD` (it sets ssl.use_clip=true)"
        )
    clip_test = None
    test = None
    try:
        if use_clip:
            test_preds = teacher_predictions(config, "test")
            test = test_preds.table
            if test.has_labels:
                clip_test = test_preds.zeroshot_report()
        else:
            test = load_table(config, "test")
    except UserError as error:
        log.warning("no test split to evaluate on: %s", error)
    return TrainingData(
        train=train,
        test=test,
        labeled_indices=labeled_indices,
        labeled_targets=labeled_targets,
        unlabeled_indices=unlabeled_indices,
        clip_label=None if clip_label is None else clip_label[unlabeled_indices],
        clip_confidence=None if clip_conf is None else clip_conf[unlabeled_indices],
        num_classes=len(classes),
        class_names=classes,
        clip_test=clip_test,
    )


def _steps(config: RunConfig, num_unlabeled: int) -> tuple[int, int, int]:
    optim = config.optim
    per_epoch = optim.steps_per_epoch or max(1, num_unlabeled // (optim.batch_size * optim.mu))
    total = per_epoch * optim.epochs
    return per_epoch, total, int(round(optim.warmup_epochs * per_epoch))


def make_evaluator(table: SampleTable, transform, *, accelerator, batch_size: int, num_workers: int, class_names):
    """model -> classification_report (top-1, top-5, mean per-class recall, confusion, ...) on `table`,
    sharded across processes."""
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader

    from zeroshot_adapt.data.datasets import TableDataset

    rank, world = accelerator.process_index, accelerator.num_processes
    indices = np.arange(len(table))[rank::world]
    labels = np.asarray(table.labels)

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        loader = DataLoader(TableDataset(table, transform, indices=indices), batch_size=batch_size,
                            num_workers=num_workers)
        was_training = model.training
        model.eval()
        logits, positions = [], []
        for batch in loader:
            with accelerator.autocast():
                logits.append(model(batch["image"].to(accelerator.device)).float().cpu())
            positions.append(indices[batch["position"].numpy()])
        model.train(was_training)
        local = (torch.cat(logits).numpy(), np.concatenate(positions))
        parts = gather_object([local]) if world > 1 else [local]
        all_logits = np.concatenate([p[0] for p in parts])
        order = np.concatenate([p[1] for p in parts])
        return classification_report(all_logits, all_logits.argmax(1), labels[order], class_names)

    return evaluate


def adapt(
    config: RunConfig, *, stop_after_steps: int | None = None, data: TrainingData | None = None
) -> dict[str, Any]:
    """The whole method: cache (if missing) -> filter -> train the student -> evaluate; resumable.

    data: train on these sets instead of `prepare_training_data(config)` (the multi-run stages in
    `stages.py` pass CReST's / alternate sampling's labeled set of human labels + pseudo-labels).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from zeroshot_adapt.data.datasets import LabeledViews, UnlabeledViews
    from zeroshot_adapt.data.transforms import build_transforms
    from zeroshot_adapt.models.student import EmanTeacher, check_student_initialisation, create_student
    from zeroshot_adapt.reports.plots import plot_confusion, plot_pseudo_label_distribution
    from zeroshot_adapt.train import LoopSettings, train

    check_student_initialisation(config)  # label-leak refusal / random-init warning, before any expensive stage
    log.info("%s", describe_recipe(config))
    run_dir = Path(config.run_dir)
    accelerator = Accelerator(mixed_precision=config.optim.mixed_precision, log_with=config.log_with,
                              project_dir=str(run_dir), cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_resume_config(config, run_dir)
        save_yaml(config, run_dir / "config.yaml")
    if config.log_with:
        accelerator.init_trackers("zeroshot-adapt")

    data = prepare_training_data(config) if data is None else data
    if len(data.labeled_indices) == 0:
        log.warning("the labeled set is empty (tau_clip=%s): training on the unlabeled loss only",
                    config.pseudo.tau_clip)
    spec = get_spec(config.data.dataset)
    hflip = spec.hflip if config.data.hflip is None else config.data.hflip
    transforms = build_transforms(config.data.image_size, recipe=config.data.augment, hflip=hflip)
    num_views = 2 if config.algorithm.multiview else 1
    labeled = LabeledViews(data.train, data.labeled_indices, data.labeled_targets, transforms.weak)
    unlabeled = UnlabeledViews(
        data.train, data.unlabeled_indices, transforms.weak, transforms.strong, num_views=num_views,
        clip_label=data.clip_label, clip_confidence=data.clip_confidence,
    )
    # Seed here, after the data stage: building a missing CLIP cache consumes the global RNG, and the
    # student's initial weights must not depend on whether the cache already existed.
    set_seed(config.seed)
    student = create_student(config.student.arch, data.num_classes, config.student.pretrained)
    ema = EmanTeacher(student)
    def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:  # the class prior's batch mean, across processes
        return accelerator.reduce(tensor, reduction="mean") if accelerator.num_processes > 1 else tensor

    algorithm = build_algorithm(config, data.num_classes, all_reduce_mean)
    per_epoch, total, warmup = _steps(config, len(unlabeled))
    settings = LoopSettings(
        total_steps=total, steps_per_epoch=per_epoch, warmup_steps=warmup, batch_size=config.optim.batch_size,
        mu=config.optim.mu, lr=config.optim.lr, momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay, nesterov=config.optim.nesterov, grad_accum=config.optim.grad_accum,
        ema_momentum=config.student.ema_momentum, checkpoint_every_steps=config.checkpoint_every_steps,
        eval_every_epochs=config.eval_every_epochs, num_workers=config.data.num_workers, seed=config.seed,
    )
    evaluate = None
    if data.test is not None and data.test.has_labels:
        evaluate = make_evaluator(data.test, transforms.eval, accelerator=accelerator,
                                  batch_size=config.optim.batch_size * 2, num_workers=config.data.num_workers,
                                  class_names=data.class_names)
    result = train(
        accelerator=accelerator, student=student, ema=ema, algorithm=algorithm,
        labeled=labeled if len(labeled) else None, unlabeled=unlabeled, settings=settings,
        num_classes=data.num_classes, run_dir=run_dir, evaluate=evaluate, stop_after_steps=stop_after_steps,
    )
    report: dict[str, Any] = {
        "dataset": config.data.dataset,
        "algorithm": config.algorithm.name,
        "completed": result.completed,
        "step": result.step,
        "total_steps": total,
        "labeled_set": {"size": int(len(data.labeled_indices)), "source": "human" if config.ssl.enabled else "clip",
                        "tau_clip": None if config.ssl.enabled else config.pseudo.tau_clip},
        "unlabeled_set": {"size": int(len(data.unlabeled_indices))},
        "method": method_summary(config),
    }
    if data.clip_test is not None:
        report["clip_zeroshot"] = {k: data.clip_test[k] for k in ("top1", "mean_per_class_recall")}
    final = result.final_evaluation  # the loop's last-epoch evaluation: no second pass over the test set
    if result.completed and evaluate is not None and not final:  # a finished run re-opened: evaluate once
        final = {"student": evaluate(accelerator.unwrap_model(student)), "ema": evaluate(ema)}
    if result.completed:
        for prefix, full in final.items():
            report[prefix] = {k: full[k] for k in ("top1", "mean_per_class_recall", "top5") if k in full}
            report[prefix]["confusion"] = full["confusion"]
            if accelerator.is_main_process:
                plot_confusion(np.asarray(full["confusion"]), data.class_names, run_dir / f"confusion_{prefix}.png")
    if accelerator.is_main_process:
        if result.history:
            plot_pseudo_label_distribution(
                [(r["epoch"], r["pseudo_label_counts"]) for r in result.history],
                run_dir / "pseudo_label_distribution.png",
            )
        write_json(report, run_dir / "report.json")
        torch.save(accelerator.unwrap_model(student).state_dict(), run_dir / "student.pt")
    accelerator.end_training()
    return report


def build_algorithm(config: RunConfig, num_classes: int, all_reduce_mean=None):
    """The registered algorithm of `config`, told the loop's gradient accumulation (so the class prior moves
    once per optimizer step, not once per micro-batch)."""
    from zeroshot_adapt.algorithms import ALGORITHMS
    from zeroshot_adapt.algorithms.base import identity_mean

    factory = ALGORITHMS.get(config.algorithm.name)
    return factory(num_classes, config.algorithm, all_reduce_mean=all_reduce_mean or identity_mean,
                   micro_batches=config.optim.grad_accum)


def method_summary(config: RunConfig) -> dict[str, Any]:
    """What produced a reported number: recipe, extras and the CLD grouping (report.json "method")."""
    algorithm = config.algorithm
    return {
        "recipe": config.recipe,
        "mode": run_mode(config),
        "multiview": algorithm.multiview,
        "lambda_cld": algorithm.lambda_cld,
        "cld_grouping": algorithm.cld_grouping if algorithm.lambda_cld > 0 else None,
        "clip_fill_threshold": algorithm.clip_fill_threshold,
        "unlabeled_set": "excludes labeled" if config.ssl.enabled else config.pseudo.unlabeled_set,
        "student_init": config.student.pretrained,
        "views": f"{config.data.augment} {config.data.image_size} px",
    }


_RESUME_SENSITIVE = ("data", "teacher", "pseudo", "algorithm", "student", "optim", "ssl", "seed")


def check_resume_config(config: RunConfig, run_dir: Path) -> None:
    """Resuming into a run directory with a different config would silently mix two runs: refuse."""
    import yaml

    saved_path = run_dir / "config.yaml"
    if not (saved_path.is_file() and (run_dir / "checkpoints").exists()):
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(to_dict(config)))
    changed = [k for k in _RESUME_SENSITIVE if saved.get(k) != current.get(k)]
    if changed:
        raise UserError(
            f"run directory {str(run_dir)!r} holds a run with a different config ({', '.join(changed)} changed); "
            "use another --run-dir, or delete that one to start over"
        )
