"""The only place the stages meet: teacher cache -> filter -> train -> evaluate.

Each public function takes a resolved RunConfig and writes its results (JSON, PNG) to a folder.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zeroshot_adapt.cache import CacheDamagedError, CacheMiss, PredictionCache, build_cache
from zeroshot_adapt.config import (
    MAX_WARMUP_FRACTION,
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
    warmup_steps,
)
from zeroshot_adapt.data.base import SampleTable
from zeroshot_adapt.data.registry import get_spec, load_split
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.fileio import atomic_write, atomic_write_text
from zeroshot_adapt.pseudo_labels import (
    rule_summary,
    select_confident,
    select_top_k_per_class,
    selection_report,
    threshold_sweep,
)
from zeroshot_adapt.reports.label_free import label_free_diagnostics
from zeroshot_adapt.reports.metrics import classification_report, write_json
from zeroshot_adapt.teacher import predict
from zeroshot_adapt.teacher.prompts import PromptSet, align_prompts, custom_prompts, load_prompts

log = logging.getLogger(__name__)

PREDICTION_FIELDS = predict.PREDICTION_FIELDS  # the fields of the teacher cache


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
    name = spec.name  # an alias (`imagenet1k`, `vtab/eurosat`) resolves to the registered name

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
        hf_id=data.hf_id,
        hf_revision=data.hf_revision,
        fingerprint=data.fingerprint,
        unlabeled=reads_unlabeled(config),
    )


def reads_unlabeled(config: RunConfig) -> bool:
    """Your own folder with your own class list (`--data-dir DIR --classes FILE`): every image is unlabeled
    and subfolders are organisation, not classes."""
    return config.data.dataset == "imagefolder" and config.teacher.classes is not None


GENERIC_TEMPLATE = "a photo of a {}."


def prompts_for(config: RunConfig, table: SampleTable) -> PromptSet:
    """The --prompts file, else the dataset's own, else (generic image folders) its folder names with
    CLIP's generic template. A prompt file's classes are matched to the dataset's BY NAME (another order
    is re-mapped to the dataset's label order; names that do not match are refused, listing both sides),
    so CLIP's label i always means the dataset's class i.

    --classes FILE / --templates FILE (teacher.classes / teacher.templates) build the prompt set instead:
    those classes (else the dataset's own) with those templates (else CLIP's ImageNet templates from
    open_clip); a labeled dataset's classes must still match them by name."""
    spec = get_spec(config.data.dataset)
    if config.teacher.classes is not None or config.teacher.templates is not None:
        return _own_prompts(config, table, spec)
    name = config.teacher.prompts or spec.prompts
    if name is None:
        if not table.class_names:
            raise UserError(f"dataset {config.data.dataset!r} has no class names: pass --prompts FILE.json")
        return custom_prompts(
            [c.replace("_", " ") for c in table.class_names], [GENERIC_TEMPLATE],
            provenance="class folder names with CLIP's generic template",
        )
    prompts = load_prompts(name)
    if not table.class_names:
        return prompts
    space = spec.class_space()
    folder_names = space.folder_names if space is not None and tuple(space.names) == tuple(table.class_names) else None
    return align_prompts(prompts, list(table.class_names), folder_names, dataset=config.data.dataset)


def _own_prompts(config: RunConfig, table: SampleTable, spec) -> PromptSet:
    from zeroshot_adapt.teacher.prompts import default_templates, read_classes_file, read_templates_file

    teacher = config.teacher
    if teacher.prompts is not None:
        raise UserError(f"--prompts {teacher.prompts!r} and --classes / --templates both give the prompts: "
                        "pass one or the other")
    if teacher.classes is not None:
        classes = read_classes_file(teacher.classes)
    elif spec.prompts is not None:
        classes = load_prompts(spec.prompts).classes
    elif table.class_names:
        classes = tuple(c.replace("_", " ") for c in table.class_names)
    else:
        raise UserError(f"dataset {config.data.dataset!r} has no class names: pass --classes FILE")
    if teacher.templates is not None:
        templates, where = read_templates_file(teacher.templates), f"templates of {teacher.templates}"
    else:
        templates, where = default_templates(), "CLIP's ImageNet templates (open_clip)"
    provenance = f"classes of {teacher.classes or 'the dataset'}, {where}"
    prompts = replace(custom_prompts(classes, templates, provenance=provenance),
                      source=teacher.classes or teacher.templates or "")
    if not table.class_names:
        return prompts
    return align_prompts(prompts, list(table.class_names), dataset=config.data.dataset)


# ----------------------------------------------------------------------------- teacher cache


@dataclass
class TeacherPredictions:
    """CLIP's cached predictions aligned with `table` (row i <-> table.keys[i])."""

    table: SampleTable
    prompts: PromptSet
    cache: PredictionCache
    rows: np.ndarray  # [N] rows in the cache

    def field(self, name: str) -> np.ndarray:
        """The cached field for the table's samples, in table order. The first read of a large field
        (logits, features) checks the checksum of its whole file (streamed); the small ones were checked
        when the cache was opened. A damaged file is a UserError naming it."""
        return np.asarray(self.cache.verified(name)[self.rows])

    def has_field(self, name: str) -> bool:
        return name in self.cache.arrays

    def field_rows(self, name: str, positions: np.ndarray) -> np.ndarray:
        """The cached field for the table positions ``positions`` only (a chunk; read from the memory map).
        The field's whole file is checksummed once, at the first read, as in `field`."""
        return np.asarray(self.cache.verified(name)[self.rows[positions]])

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


def _compute_device() -> torch.device:
    """The device the cache build runs on (what PartialState picks in `_build_teacher_cache`)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


TEACHER_FAMILY_KEYS = ("model", "weights", "templates", "class_names", "preprocess", "compute", "class_prompts")


def teacher_family(config: RunConfig, prompts: PromptSet) -> dict[str, Any]:
    """What fixes CLIP's prediction for ONE image: model, weights, templates, class names (in order),
    preprocessing and the compute settings (device type, precision, batch size). Caches of one family
    share per-sample predictions. Computed without loading (or downloading) the weights."""
    from zeroshot_adapt.teacher.clip import preprocess_description, resolve_weights
    from zeroshot_adapt.teacher.predict import compute_settings

    weights = resolve_weights(config.teacher.model, config.teacher.pretrained)
    identity = {
        "model": weights.model_name,
        "weights": weights.weights_id,
        "templates": list(prompts.templates),
        "class_names": list(prompts.classes),
        "preprocess": preprocess_description(weights),
        "compute": compute_settings(
            _compute_device(), config.teacher.batch_size, precision=config.teacher.precision,
            pipeline=teacher_pipeline(config), channels_last=config.teacher.channels_last,
            compiled=config.teacher.compile,
        ),
    }
    if prompts.class_prompts is not None:  # CuPL-style prompts (absent otherwise: template caches keep their key)
        identity["class_prompts"] = [list(texts) for texts in prompts.class_prompts]
    return identity


def cache_identity(config: RunConfig, table: SampleTable, prompts: PromptSet) -> dict[str, Any]:
    """Everything that changes the cached predictions of a split: the teacher family plus the dataset, the
    split and its fingerprint (every sample's key and content id)."""
    return {
        **teacher_family(config, prompts),
        "dataset": table.dataset,
        "split": table.split,
        "dataset_fingerprint": table.fingerprint,
        "num_samples": len(table),
    }


def teacher_pipeline(config: RunConfig) -> str:
    """The cache build's input pipeline: data.pipeline with ``auto`` resolved for this machine."""
    from zeroshot_adapt.data.device import resolve_pipeline

    return resolve_pipeline(config.data.pipeline, "cuda" if torch.cuda.is_available() else "cpu")


def cache_lineage(identity: dict[str, Any]) -> tuple[Any, Any]:
    """What a teacher cache is a version of: its dataset and split (a newer cache of the same teacher family
    and lineage supersedes it; see `cache.select_superseded`)."""
    return identity.get("dataset"), identity.get("split")


def teacher_predictions(
    config: RunConfig, split: str = "train", *, progress: bool = True, rebuild: bool = False
) -> TeacherPredictions:
    """Open CLIP's predictions for `split` from the cache, building the cache first if it is missing.

    A missing cache reuses every prediction a cache of the same teacher holds for an unchanged sample
    (same key and content id) and computes only the rest. rebuild: delete this split's cache and predict
    every sample again. Under `accelerate launch` / `torchrun`, every process builds its share."""
    table = load_table(config, split)
    prompts = prompts_for(config, table)
    identity = cache_identity(config, table, prompts)
    root = cache_root(config)
    try:
        if rebuild:
            raise CacheMiss("rebuild requested")
        cache = PredictionCache.open(root, identity)
    except CacheMiss:
        family = {key: identity[key] for key in TEACHER_FAMILY_KEYS if key in identity}
        cache = _build_teacher_cache(config, table, prompts, identity, family, root, progress=progress,
                                     rebuild=rebuild)
    try:
        rows = cache.lookup(list(table.keys))
    except KeyError as error:  # the identity matched, so every key is there unless the key index is damaged
        raise CacheDamagedError(cache.directory, "key index", str(error.args[0])) from None
    return TeacherPredictions(table=table, prompts=prompts, cache=cache, rows=rows)


def _build_teacher_cache(config, table, prompts, identity, family, root, *, progress: bool,
                         rebuild: bool = False) -> PredictionCache:
    from accelerate import PartialState

    from zeroshot_adapt.launch import check_launch, use_cpu
    from zeroshot_adapt.models.acceleration import prepare_module
    from zeroshot_adapt.teacher.classifier import zeroshot_classifier
    from zeroshot_adapt.teacher.clip import load_clip
    from zeroshot_adapt.teacher.predict import predict_shards

    check_launch()
    state = PartialState(cpu=use_cpu())  # cpu=True: gloo multi-process on CPU

    @functools.cache
    def teacher():  # loaded only if some sample must be predicted (or no cache lends the classifier)
        clip = load_clip(config.teacher.model, config.teacher.pretrained, device=state.device)
        prepare_module(clip.model.visual, channels_last=config.teacher.channels_last,
                       compile=config.teacher.compile)
        classifier = zeroshot_classifier(clip.model, clip.tokenizer, prompts, state.device)
        return clip, classifier

    def compute_shards(shards):
        clip, classifier = teacher()
        log.info("predicting %d images of %s/%s with CLIP (%s, %s)", sum(len(s) for s in shards), table.dataset,
                 table.split, clip.model_name, clip.pretrained)
        yield from predict_shards(
            clip, classifier, table, shards, batch_size=config.teacher.batch_size,
            num_workers=config.teacher.num_workers, device=state.device,
            progress=progress and state.is_main_process, precision=config.teacher.precision,
            pipeline=teacher_pipeline(config),
        )

    def attachments() -> dict[str, np.ndarray]:
        clip, classifier = teacher()
        return {
            "text_classifier": classifier.T.float().cpu().numpy(),  # [C, D]
            "logit_scale": np.asarray(clip.logit_scale, dtype=np.float32),
        }

    return build_cache(
        root,
        identity,
        list(table.keys),
        compute_shards=compute_shards,
        content_ids=table.all_content_ids(),
        family=family,
        retry_field="valid",  # images that could not be decoded are tried again, never reused
        rebuild=rebuild,
        shard_size=config.teacher.shard_size,
        batch_size=config.teacher.batch_size,
        process_index=state.process_index,
        num_processes=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
        progress=progress and state.is_main_process,
        attachments=attachments,
    )


# ----------------------------------------------------------------------------- reports


def zeroshot_report(config: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """CLIP zero-shot metrics for the train and test splits (when labeled), with the imbalance plot and the
    class-centroid similarities of DebiasPL Fig. 5 (when the cache holds image features)."""
    from zeroshot_adapt.reports.plots import plot_centroid_similarity, plot_predictions_per_class

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
        if preds.has_field("features"):
            entry["centroid_similarity"] = centroid_similarity(preds)
            entry["centroid_plot"] = str(plot_centroid_similarity(
                entry["centroid_similarity"], out_dir / f"zeroshot_{split}_centroid_similarity.png",
                title=f"class-centroid similarity — {config.data.dataset} {split}"))
        report[split] = entry
    write_json(report, out_dir / "zeroshot.json")
    return report


def centroid_similarity(preds: TeacherPredictions) -> dict[str, Any]:
    """DebiasPL Fig. 5 on the valid samples: per-class feature centroids (by true label where known, else by
    CLIP's prediction); the 10 most / least predicted classes' similarity to their 9 nearest other centroids."""
    from zeroshot_adapt.transduct.centroids import centroid_neighbours

    valid = preds.valid
    positions = np.flatnonzero(valid)
    classes = list(preds.prompts.classes)
    prediction = preds.prediction[valid]
    by_label = preds.table.has_labels
    groups = np.asarray(preds.table.labels)[valid] if by_label else prediction
    counts = np.bincount(prediction, minlength=len(classes))
    return centroid_neighbours(feature_source(preds, positions), np.asarray(groups, dtype=np.int64), counts,
                               classes, grouping="label" if by_label else "prediction")


def pseudolabel_report(config: RunConfig, out_dir: str | Path) -> dict[str, Any]:
    """Filter CLIP's train-split predictions at tau_clip; write the selected set, the stats and plots."""
    from zeroshot_adapt.reports.plots import plot_threshold_sweep

    out_dir = Path(out_dir)
    tau = config.pseudo.tau_clip
    preds = teacher_predictions(config, "train")
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused command leaves no folder behind
    table, classes = preds.table, list(preds.prompts.classes)
    labels = np.asarray(table.labels) if table.has_labels else None
    prediction, confidence = teacher_labels(config, preds)  # CLIP's, or refined by --teacher-method
    valid = preds.valid  # corrupt: counted, not scored
    selected = np.zeros(len(valid), dtype=bool)
    selected[select_labeled_indices(config, confidence, prediction, np.flatnonzero(valid), len(classes))] = True
    valid_labels = None if labels is None else labels[valid]
    report = selection_report(confidence[valid], prediction[valid], valid_labels, len(classes), tau, classes,
                              selected=None if config.pseudo.select == "threshold" else selected[valid])
    report["num_corrupt_skipped"] = int((~valid).sum())
    report["teacher_method"] = config.transduct.method
    report["select"] = config.pseudo.select
    report["rules"] = selection_rules(config, confidence[valid], prediction[valid], valid_labels, classes)
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


# ----------------------------------------------------------------------------- transduction (teacher refinement)

DERIVED_DIR = "derived"  # refined prediction sets live in <cache root>/derived/<digest>/ (transduct.store)


def derived_root(config: RunConfig) -> Path:
    return cache_root(config) / DERIVED_DIR


def feature_source(preds: TeacherPredictions, positions: np.ndarray):  # -> transduct.FeatureSource | None
    """The cached image features of the table positions ``positions``, read in chunks (None when absent)."""
    from zeroshot_adapt.transduct import FeatureSource

    if not preds.has_field("features"):
        return None
    dim = int(preds.field_rows("features", positions[:1]).shape[1])
    return FeatureSource(len(positions), dim, lambda rows: preds.field_rows("features", positions[rows]))


def zeroshot_probabilities(preds: TeacherPredictions, positions: np.ndarray, chunk_rows: int = 65536) -> np.ndarray:
    """float32 [len(positions), C]: softmax of the cached logits (the teacher's own logit scale), by chunks."""
    from zeroshot_adapt.transduct.base import softmax

    num_classes = len(preds.prompts.classes)
    out = np.empty((len(positions), num_classes), dtype=np.float32)
    for start in range(0, len(positions), chunk_rows):
        stop = min(start + chunk_rows, len(positions))
        out[start:stop] = softmax(preds.field_rows("logits", positions[start:stop]).astype(np.float32))
    return out


@dataclass
class RefinedPredictions:
    """A teacher's predictions after a transduction chain, aligned with ``preds.table`` (invalid rows: zeros)."""

    chain: list[str]
    derived: Any  # transduct.store.DerivedPredictions (probabilities, prediction, confidence, valid, hit)
    steps: list[dict[str, Any]] | None  # per method: params and seconds; None when read from the store


def refined_predictions(config: RunConfig, preds: TeacherPredictions, chain: str | None = None) -> RefinedPredictions:
    """Run ``chain`` (default ``config.transduct.method``) on the valid samples of ``preds``, or read the
    derived set stored by an earlier run with the same base cache, chain and parameters."""
    from zeroshot_adapt.transduct import TransductInputs, chain_identity, parse_chain, refine
    from zeroshot_adapt.transduct.knn import KnnSettings
    from zeroshot_adapt.transduct.store import get_or_compute, rows_fingerprint

    names = parse_chain(chain or config.transduct.method)
    valid = preds.valid
    positions = np.flatnonzero(valid)
    if len(positions) == 0:
        raise UserError(f"no valid sample in {preds.table.dataset}/{preds.table.split} to refine")
    features = feature_source(preds, positions)
    identity = {
        "base_cache": preds.cache.digest,
        "rows": rows_fingerprint(preds.rows),
        "num_samples": len(preds.table),
        "chain": chain_identity(names, config.transduct, len(positions), None if features is None else features.dim),
    }
    steps: list[dict[str, Any]] = []

    def compute() -> tuple[np.ndarray, np.ndarray]:
        inputs = TransductInputs(features=features, text_classifier=preds.text_classifier,
                                 knn=KnnSettings.from_config(config.transduct))
        result = refine(zeroshot_probabilities(preds, positions), names, config.transduct, inputs)
        steps.extend(result.steps)
        full = np.zeros((len(valid), len(preds.prompts.classes)), dtype=np.float32)
        full[positions] = result.probabilities
        return full, valid

    derived = get_or_compute(derived_root(config), identity, compute)
    return RefinedPredictions(names, derived, None if derived.hit else steps)


def teacher_labels(config: RunConfig, preds: TeacherPredictions) -> tuple[np.ndarray, np.ndarray]:
    """(prediction [N], confidence [N]) of the teacher named by ``config.transduct.method``: CLIP's own cached
    values for ``zeroshot`` (unchanged, bit for bit), else the argmax / max of the refined probabilities."""
    from zeroshot_adapt.transduct import parse_chain

    if all(name == "zeroshot" for name in parse_chain(config.transduct.method)):
        return preds.prediction, preds.confidence
    refined = refined_predictions(config, preds).derived
    return refined.prediction, refined.confidence


def select_labeled_indices(
    config: RunConfig, confidence: np.ndarray, prediction: np.ndarray, candidates: np.ndarray, num_classes: int
) -> np.ndarray:
    """Sorted rows (among ``candidates``) of the labeled set: confidence >= tau_clip, or GRIP's top-K per
    predicted class (``pseudo.select``)."""
    pseudo = config.pseudo
    if pseudo.select == "threshold":
        selected = select_confident(confidence, prediction, pseudo.tau_clip)
        return np.intersect1d(np.flatnonzero(selected), candidates)
    chosen = select_top_k_per_class(confidence[candidates], prediction[candidates], num_classes,
                                    per_class=pseudo.per_class, fraction=pseudo.per_class_fraction)
    return np.sort(candidates[chosen])


def selection_rules(config: RunConfig, confidence: np.ndarray, prediction: np.ndarray, labels: np.ndarray | None,
                    classes: list[str]) -> dict[str, Any]:
    """What each selection rule keeps and leaves empty: the tau_clip threshold always, and the top-K rule
    when it is configured (``pseudo.select=topk``)."""
    num_classes = len(classes)
    rules = {f"threshold {config.pseudo.tau_clip:g}": rule_summary(
        select_confident(confidence, prediction, config.pseudo.tau_clip), prediction, labels, num_classes, classes)}
    if config.pseudo.select == "topk":
        pseudo = config.pseudo
        name = (f"top-{pseudo.per_class} per class" if pseudo.per_class is not None
                else f"top {pseudo.per_class_fraction:g} of each class")
        mask = select_top_k_per_class(confidence, prediction, num_classes, per_class=pseudo.per_class,
                                      fraction=pseudo.per_class_fraction)
        rules[name] = rule_summary(mask, prediction, labels, num_classes, classes)
    return rules


TRANSDUCT_SPLITS = ("train", "test")


def transduct_report(
    config: RunConfig, out_dir: str | Path, splits: tuple[str, ...] = TRANSDUCT_SPLITS
) -> dict[str, Any]:
    """`zsa transduct`: refine the teacher's predictions with ``config.transduct.method`` on each split, store
    them as a derived prediction set, and report them next to CLIP zero-shot (JSON + plots).

    A test split the dataset does not have is skipped (with a warning) when both splits are asked for."""
    from zeroshot_adapt.reports.plots import plot_class_count_comparison, plot_predictions_per_class
    from zeroshot_adapt.transduct import chain_name, parse_chain

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chain = chain_name(parse_chain(config.transduct.method))
    report: dict[str, Any] = {"dataset": config.data.dataset, "model": config.teacher.model,
                              "pretrained": config.teacher.pretrained, "method": chain}
    for split in splits:
        try:
            preds = teacher_predictions(config, split)
        except UserError as error:
            if split == "test" and len(splits) > 1:
                log.warning("no test split to refine: %s", error)
                report["skipped"] = {split: str(error)}
                continue
            raise
        refined = refined_predictions(config, preds)
        derived, valid = refined.derived, preds.valid
        classes = list(preds.prompts.classes)
        labels = np.asarray(preds.table.labels)[valid] if preds.table.has_labels else None
        entry = classification_report(np.asarray(derived.probabilities[valid], dtype=np.float32),
                                      derived.prediction[valid], labels, classes)
        zeroshot = preds.zeroshot_report()
        entry["zeroshot"] = {key: zeroshot[key] for key in
                             ("top1", "mean_per_class_recall", "imbalance_ratio", "prediction_counts")}
        entry["num_corrupt_skipped"] = int((~valid).sum())
        entry["derived"] = {"directory": str(derived.directory), "hit": derived.hit}
        entry["identity"] = derived.identity["chain"]
        entry["steps"] = refined.steps
        slug = chain.replace(",", "+")
        entry["plot"] = str(plot_predictions_per_class(
            entry["prediction_counts"], classes, out_dir / f"transduct_{slug}_{split}_predictions_per_class.png",
            title=f"{chain} predictions per class — {config.data.dataset} {split}"))
        entry["comparison_plot"] = str(plot_class_count_comparison(
            {"CLIP zero-shot": zeroshot["prediction_counts"], chain: entry["prediction_counts"]}, classes,
            out_dir / f"transduct_{slug}_{split}_vs_zeroshot.png",
            title=f"predictions per class — {config.data.dataset} {split}"))
        report[split] = entry
    write_json(report, out_dir / "transduct.json")
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
    clip_test: dict[str, Any] | None  # CLIP zero-shot on the test split (label-based entries None without labels)
    clip_test_prediction: np.ndarray | None = None  # [len(test)] CLIP's test predictions, for label-free agreement
    text_classifier: np.ndarray | None = None  # [C, D] the cache's zero-shot classifier (a CLIP student's head)
    logit_scale: float | None = None  # the cache's logit scale


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
    clip_head = config.student.arch == "clip"  # a CLIP student's head is the cached text classifier
    if use_clip:
        preds = teacher_predictions(config, "train")
        train, classes = preds.table, list(preds.prompts.classes)
        clip_label, clip_conf = teacher_labels(config, preds)  # CLIP's, or refined by --teacher-method
        valid = preds.valid
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
        labeled_indices = select_labeled_indices(config, clip_conf, clip_label, keep, len(classes))
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
    clip_test = clip_test_prediction = None
    test = None
    try:
        if use_clip:
            test_preds = teacher_predictions(config, "test")
            test = test_preds.table
            clip_test = test_preds.zeroshot_report()
            clip_test_prediction = test_preds.prediction
            clip_test["label_free"] = label_free_diagnostics(
                clip_test_prediction[test_preds.valid], test_preds.confidence[test_preds.valid], classes,
                true_accuracy=clip_test["top1"])
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
        text_classifier=preds.text_classifier if use_clip and clip_head else None,
        logit_scale=preds.logit_scale if use_clip and clip_head else None,
        clip_test_prediction=clip_test_prediction,
    )


def _steps(config: RunConfig, num_unlabeled: int) -> tuple[int, int, int]:
    optim = config.optim
    per_epoch = optim.steps_per_epoch or max(1, num_unlabeled // (optim.batch_size * optim.mu))
    total = per_epoch * optim.epochs
    warmup, capped = warmup_steps(optim.warmup_epochs, per_epoch, total)
    if capped:
        log.info("warm-up of %g epochs (%d steps) would take most of this %d-step run: capped at %d steps "
                 "(%g of the run, config.MAX_WARMUP_FRACTION)", optim.warmup_epochs,
                 int(round(optim.warmup_epochs * per_epoch)), total, warmup, MAX_WARMUP_FRACTION)
    return per_epoch, total, warmup


def make_evaluator(table: SampleTable, transform, *, accelerator, batch_size: int, num_workers: int, class_names,
                   clip_prediction: np.ndarray | None = None):
    """model -> classification_report (top-1, top-5, mean per-class recall, confusion, ...) on `table`,
    sharded across processes, plus its ``label_free`` diagnostics (reports.label_free: agreement with
    ``clip_prediction`` [len(table)], the predicted-class distribution, mean confidence and the Average-
    Confidence accuracy estimate, next to the true top-1 where labels exist). An unlabeled `table` gets
    the label-free entries only (every label-based one is None).

    Corrupt test images are skipped and counted, never scored (a black placeholder would be a wrong
    prediction): the report's ``num_corrupt_skipped`` says how many, and they are logged once."""
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader

    from zeroshot_adapt.data.datasets import TableDataset, ignore_stop_signals, unwrap_worker_errors

    rank, world = accelerator.process_index, accelerator.num_processes
    indices = np.arange(len(table))[rank::world]
    labels = np.asarray(table.labels) if table.has_labels else None
    warned: list[bool] = []

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        loader = DataLoader(TableDataset(table, transform, indices=indices, warn=False), batch_size=batch_size,
                            num_workers=num_workers, worker_init_fn=ignore_stop_signals if num_workers else None)
        was_training = model.training
        model.eval()
        logits, positions, corrupt = [], [], []
        for batch in unwrap_worker_errors(iter(loader)):
            ok = batch["ok"].numpy().astype(bool)
            where = indices[batch["position"].numpy()]
            corrupt.append(where[~ok])
            if not ok.any():
                continue
            with accelerator.autocast():
                logits.append(model(batch["image"][torch.from_numpy(ok)].to(accelerator.device)).float().cpu())
            positions.append(where[ok])
        model.train(was_training)
        local = (torch.cat(logits).numpy() if logits else np.zeros((0, len(class_names)), np.float32),
                 np.concatenate(positions) if positions else np.zeros(0, np.int64), np.concatenate(corrupt))
        parts = gather_object([local]) if world > 1 else [local]
        all_logits = np.concatenate([p[0] for p in parts])
        order = np.concatenate([p[1] for p in parts])
        skipped = np.concatenate([p[2] for p in parts])
        if len(skipped) and not warned:
            warned.append(True)
            shown = ", ".join(table.keys[i] for i in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
            log.warning("%d corrupt test image(s) of %s/%s skipped and not scored: %s", len(skipped), table.dataset,
                        table.split, shown)
        if not len(order):
            raise UserError(f"every one of the {len(table)} test images of {table.dataset}/{table.split} is corrupt")
        report = classification_report(all_logits, all_logits.argmax(1), None if labels is None else labels[order],
                                       class_names)
        report["num_corrupt_skipped"] = int(len(skipped))
        probabilities = torch.from_numpy(all_logits).softmax(dim=1).numpy()
        report["label_free"] = label_free_diagnostics(
            probabilities.argmax(1), probabilities.max(1), class_names,
            reference=None if clip_prediction is None else np.asarray(clip_prediction)[order],
            true_accuracy=report["top1"])
        return report

    return evaluate


def adapt(
    config: RunConfig,
    *,
    stop_after_steps: int | None = None,
    data: TrainingData | None = None,
    reevaluate: bool = False,
) -> dict[str, Any]:
    """The whole method: cache (if missing) -> filter -> train the student -> evaluate; resumable.

    data: train on these sets instead of `prepare_training_data(config)` (the multi-run stages in
    `stages.py` pass CReST's / alternate sampling's labeled set of human labels + pseudo-labels).
    A run directory is locked while a run uses it (a second run there is refused, naming the holder),
    its checkpoint must hold the same config (:func:`check_resume_config`), and a finished run re-opened
    returns its saved report without recomputing anything, unless `reevaluate`.
    """
    run_dir = Path(config.run_dir)
    with _run_directory_lock(run_dir):
        check_resume_config(config, run_dir)
        saved = None if reevaluate else finished_report(run_dir)
        if saved is not None:
            log.info("%s holds this run, finished: its saved report (evaluate it again with --reevaluate)", run_dir)
            return saved
        return _adapt(config, stop_after_steps=stop_after_steps, data=data)


def _adapt(config: RunConfig, *, stop_after_steps: int | None, data: TrainingData | None) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from zeroshot_adapt.launch import check_launch, use_cpu
    from zeroshot_adapt.models.acceleration import prepare_module
    from zeroshot_adapt.models.clip_student import is_clip_arch
    from zeroshot_adapt.models.student import EmanTeacher, check_student_initialisation, create_student
    from zeroshot_adapt.reports.plots import plot_confusion, plot_pseudo_label_distribution
    from zeroshot_adapt.train import LoopSettings, atomic_torch_save, train

    check_student_initialisation(config)  # label-leak refusal / random-init warning, before any expensive stage
    log.info("%s", describe_recipe(config))
    run_dir = Path(config.run_dir)
    check_launch()
    accelerator = Accelerator(mixed_precision=config.optim.mixed_precision, log_with=config.log_with,
                              project_dir=str(run_dir), cpu=use_cpu())
    if data is None:
        data = prepare_training_data(config)
        if not config.ssl.enabled and len(data.labeled_indices) == 0:  # T-ZSL: nothing to learn from
            raise UserError(empty_labeled_set_message(config, data))
    if accelerator.is_main_process:  # only now: a refused dataset, labels file, ... leaves no run behind
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, run_dir / "config.yaml")
    if config.log_with:
        accelerator.init_trackers("zeroshot-adapt")
    if len(data.labeled_indices) == 0:
        log.warning("the labeled set is empty (tau_clip=%s): training on the unlabeled loss only",
                    config.pseudo.tau_clip)
    spec = get_spec(config.data.dataset)
    hflip = spec.hflip if config.data.hflip is None else config.data.hflip
    transforms = student_transforms(config, recipe=config.data.augment, hflip=hflip)
    num_views = 2 if config.algorithm.multiview else 1
    labeled, unlabeled, batch_pipeline = training_views(config, data, transforms, num_views, accelerator.device)
    # Seed here, after the data stage: building a missing CLIP cache consumes the global RNG, and the
    # student's initial weights must not depend on whether the cache already existed.
    set_seed(config.seed)
    student = (_clip_student(config, data) if is_clip_arch(config.student.arch)
               else create_student(config.student.arch, data.num_classes, config.student.pretrained))
    prepare_module(student, channels_last=config.student.channels_last)
    ema = EmanTeacher(student)
    for model in (student, ema.module):  # compiled in place after the copy: state_dict keys stay plain
        prepare_module(model, compile=config.student.compile)
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
    warn_large_student_on_cpu(config, student, accelerator.device, total)
    evaluate = None
    if data.test is not None:  # unlabeled: label-free diagnostics only
        evaluate = make_evaluator(data.test, transforms.eval, accelerator=accelerator,
                                  batch_size=config.optim.batch_size * 2, num_workers=config.data.num_workers,
                                  class_names=data.class_names, clip_prediction=data.clip_test_prediction)
    result = train(
        accelerator=accelerator, student=student, ema=ema, algorithm=algorithm,
        labeled=labeled if len(labeled) else None, unlabeled=unlabeled, settings=settings,
        num_classes=data.num_classes, run_dir=run_dir, evaluate=evaluate, stop_after_steps=stop_after_steps,
        run_config=_plain(to_dict(config)), batch_pipeline=batch_pipeline,
    )
    report: dict[str, Any] = {
        "dataset": config.data.dataset,
        "algorithm": config.algorithm.name,
        "completed": result.completed,
        "step": result.step,
        "total_steps": total,
        "labeled_set": {"size": int(len(data.labeled_indices)), "source": "human" if config.ssl.enabled else "clip",
                        "tau_clip": None if config.ssl.enabled else config.pseudo.tau_clip,
                        "select": None if config.ssl.enabled else config.pseudo.select,
                        "teacher_method": config.transduct.method},
        "unlabeled_set": {"size": int(len(data.unlabeled_indices))},
        "method": method_summary(config),
        "provenance": provenance_summary(config, data),
    }
    if result.history:
        report["corrupt_training_images_skipped"] = result.history[-1].get("corrupt_images_skipped", 0)
    if data.clip_test is not None:
        report["clip_zeroshot"] = {k: data.clip_test[k] for k in ("top1", "mean_per_class_recall", "label_free")
                                   if k in data.clip_test}
    final = result.final_evaluation  # the loop's last-epoch evaluation: no second pass over the test set
    if result.completed and evaluate is not None and not final:  # re-evaluation of a finished run
        final = {"student": evaluate(accelerator.unwrap_model(student)), "ema": evaluate(ema)}
    if result.completed:
        for prefix, full in final.items():
            report[prefix] = {k: full[k] for k in ("top1", "mean_per_class_recall", "top5", "label_free")
                              if k in full}
            report[prefix]["confusion"] = full["confusion"]
            if accelerator.is_main_process and full["confusion"] is not None:
                plot_confusion(np.asarray(full["confusion"]), data.class_names, run_dir / f"confusion_{prefix}.png")
        if "student" in final:
            report["test_set"] = {"size": len(data.test), "corrupt_skipped": final["student"]["num_corrupt_skipped"],
                                  "has_labels": data.test.has_labels}
    notes = ground_truth_notes(data)
    if notes:
        report["notes"] = notes
        if result.completed:
            for note in notes:
                log.info("note: %s", note)
    if accelerator.is_main_process:
        if result.history:
            plot_pseudo_label_distribution(
                [(r["epoch"], r["pseudo_label_counts"]) for r in result.history],
                run_dir / "pseudo_label_distribution.png", class_names=data.class_names,
            )
        atomic_torch_save(accelerator.unwrap_model(student).state_dict(), run_dir / "student.pt")
        write_json(report, run_dir / "report.json")  # last: a completed report.json means every output is there
    accelerator.end_training()
    return report


def student_transforms(config: RunConfig, *, recipe: str, hflip: bool):
    """The student's weak / strong / eval views: at data.image_size with ImageNet mean / std, or, for a CLIP
    student (student.arch=clip), at CLIP's own input size, mean / std and eval preprocessing."""
    from zeroshot_adapt.data.transforms import build_transforms
    from zeroshot_adapt.models.clip_student import clip_student_transforms, is_clip_arch

    if is_clip_arch(config.student.arch):
        return clip_student_transforms(config, recipe=recipe, hflip=hflip)
    return build_transforms(config.data.image_size, recipe=recipe, hflip=hflip)


def _student_image_size(config: RunConfig) -> int:
    """The student's input size: data.image_size, or a CLIP student's own."""
    from zeroshot_adapt.models.clip_student import clip_preprocess, is_clip_arch

    if is_clip_arch(config.student.arch):
        return clip_preprocess(config.teacher.model, config.teacher.pretrained).size
    return config.data.image_size


def _clip_student(config: RunConfig, data: TrainingData):
    """The CLIP student (models/clip_student.py), its head the cached zero-shot classifier."""
    from zeroshot_adapt.models.clip_student import count_parameters, create_clip_student

    if data.text_classifier is None or data.logit_scale is None:  # SSL without CLIP: open the cache for it
        preds = teacher_predictions(config, "train")
        data = replace(data, text_classifier=preds.text_classifier, logit_scale=preds.logit_scale)
    student = create_clip_student(config, data.num_classes, data.text_classifier, data.logit_scale)
    trainable, total = count_parameters(student)
    log.info("CLIP student %s (clip_train=%s): %d of %d parameters train", config.teacher.model,
             config.student.clip_train, trainable, total)
    return student


def ground_truth_notes(data: TrainingData) -> list[str]:
    """What the report leaves out for want of labels (never faked), one sentence each."""
    if data.test is None:
        return ["no test split: nothing is scored (neither accuracy nor the label-free diagnostics)"]
    if data.test.has_labels:
        return []
    return [f"the {len(data.test)} test images have no labels: top-1, top-5, mean per-class recall and the "
            "confusion matrix are not computed; see label_free (agreement with CLIP, predicted-class "
            "distribution, mean confidence and the Average-Confidence accuracy estimate, which assumes a "
            "calibrated model and usually overestimates a self-trained student)"]


def empty_labeled_set_message(config: RunConfig, data: TrainingData) -> str:
    """Why a T-ZSL run has no labeled image, with CLIP's confidence histogram and what to pass instead."""
    from zeroshot_adapt.pseudo_labels import confidence_histogram_text, suggest_tau_clip

    confidence = np.asarray(data.clip_confidence if data.clip_confidence is not None else [], dtype=np.float64)
    lines = [f"the labeled set is empty: no CLIP prediction on the {len(confidence)} training images has "
             f"confidence >= tau_clip={config.pseudo.tau_clip:g} ({config.transduct.method} teacher), so there "
             "is nothing to train on. CLIP's confidences:", confidence_histogram_text(confidence)]
    tau = suggest_tau_clip(confidence)
    per_class = max(1, len(confidence) // (10 * max(1, data.num_classes)))
    options = [f"--select topk --per-class {per_class} (the most confident images of each predicted class)"]
    if tau is not None:
        options.insert(0, f"--tau-clip {tau:g} (keeps {int((confidence >= tau).sum())} images)")
    return "\n".join(lines) + "\ntry " + " or ".join(options)


def warn_large_student_on_cpu(config: RunConfig, student: torch.nn.Module, device: torch.device,
                              total_steps: int) -> None:
    """On CPU, a large student (ResNet-50 ...) is slow: say so up front with a measured estimate."""
    from zeroshot_adapt.models.cost import LARGE_STUDENT_PARAMS, large_student_message, measure_seconds_per_image

    num_params = sum(p.numel() for p in student.parameters())
    if torch.device(device).type != "cpu" or num_params < LARGE_STUDENT_PARAMS:
        return
    views = 2 if config.algorithm.multiview else 1
    images_per_step = config.optim.batch_size * (1 + config.optim.mu * 2 * views)  # labeled + weak and strong views
    seconds = measure_seconds_per_image(student, _student_image_size(config))
    log.warning("%s", large_student_message(config.student.arch, num_params, "cpu", seconds, images_per_step,
                                            total_steps))


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
        "views": f"{config.data.augment} {_student_image_size(config)} px",
    }


def provenance_summary(config: RunConfig, data: TrainingData) -> dict[str, Any]:
    """Where a run's student comes from (report.json "provenance", read by `zsa export`'s model card): the
    CLIP teacher and its prompts (None without CLIP: SSL on human labels only), the student's output classes
    in order, and each split's dataset, size and fingerprint (every sample's key and content id)."""
    teacher = None
    if not config.ssl.enabled or config.ssl.use_clip:
        prompts = prompts_for(config, data.train)
        teacher = {
            "model": config.teacher.model,
            "pretrained": config.teacher.pretrained,
            "prompts": {"source": prompts.source, "provenance": prompts.provenance,
                        "num_templates": len(prompts.templates), "per_class_prompts": prompts.class_prompts is not None,
                        "digest": prompts.digest()},
        }

    def split(table: SampleTable | None) -> dict[str, Any] | None:
        return None if table is None else {"dataset": table.dataset, "split": table.split, "size": len(table),
                                           "fingerprint": table.fingerprint}

    return {"teacher": teacher, "class_names": list(data.class_names), "train": split(data.train),
            "test": split(data.test)}


def training_views(config: RunConfig, data: TrainingData, transforms, num_views: int, device: torch.device):
    """(labeled dataset, unlabeled dataset, batch pipeline) for ``data.pipeline``: the CPU pipeline's PIL
    views (batch pipeline None: the loop's plain host-to-device copy), or the device pipeline's encoded
    items and the DeviceViews that decodes and augments them on ``device``."""
    from zeroshot_adapt.data.datasets import LabeledViews, UnlabeledViews
    from zeroshot_adapt.data.device import DeviceViews, EncodedLabeledViews, EncodedUnlabeledViews, resolve_pipeline

    if resolve_pipeline(config.data.pipeline, device) == "device":
        labeled = EncodedLabeledViews(data.train, data.labeled_indices, data.labeled_targets, transforms.spec)
        unlabeled = EncodedUnlabeledViews(
            data.train, data.unlabeled_indices, transforms.spec, num_views=num_views,
            clip_label=data.clip_label, clip_confidence=data.clip_confidence,
        )
        views = DeviceViews(transforms.spec, transforms.mean, transforms.std,
                            channels_last=config.student.channels_last)
        return labeled, unlabeled, views
    labeled = LabeledViews(data.train, data.labeled_indices, data.labeled_targets, transforms.weak)
    unlabeled = UnlabeledViews(
        data.train, data.unlabeled_indices, transforms.weak, transforms.strong, num_views=num_views,
        clip_label=data.clip_label, clip_confidence=data.clip_confidence,
    )
    return labeled, unlabeled, None


# ----------------------------------------------------------------------------- run directories: lock, resume

RUN_LOCK_NAME = ".zsa-run.lock"

RESUME_IGNORED_KEYS: dict[str, str] = {
    "data.num_workers": "every item carries its own augmentation seed (data/sampling.py), so the batches are the "
    "same for any worker count (tests/test_train.py::test_resume_with_workers_and_accumulation)",
    "teacher.num_workers": "decoding workers of the CLIP cache build: they decode, they do not change a prediction",
    "teacher.cache_dir": "where the prediction cache lives; the cache's identity holds everything that changes "
    "its content, so a moved cache is the same cache",
    "run_dir": "the run directory's own path: a moved run directory resumes",
    "log_with": "Accelerate trackers only receive the metrics",
    "checkpoint_every_steps": "a checkpoint can be written at any step and resuming from it equals not stopping "
    "(tests/test_train.py::test_resume_equals_uninterrupted)",
    "eval_every_epochs": "evaluation changes no weight and leaves every RNG as it was "
    "(tests/test_train.py::test_evaluation_changes_nothing): it only decides which epoch records carry test "
    "metrics, and the last epoch is always evaluated",
}
"""Config keys the resume guard does not compare, each with the reason it cannot change the result."""


def _plain(value: Any) -> Any:
    """JSON round trip: tuples become lists, so saved and current configs compare equal."""
    return json.loads(json.dumps(value, default=str))


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = "(absent)"


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key that differs, except RESUME_IGNORED_KEYS.

    defaults: the config's defaults; a key the saved config lacks (added to the config since the run
    started) counts as its default, which is what that run used."""
    old, new = _flatten(_plain(saved)), _flatten(_plain(current))
    for key, value in _flatten(_plain(defaults or {})).items():
        if key in new:
            old.setdefault(key, value)
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
            if k not in RESUME_IGNORED_KEYS and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


# ----------------------------------------------------------------------------- robustness evaluation

ROBUSTNESS_SUMMARY_KEYS = ("top1", "top5", "mean_per_class_recall")


def variant_config(run_config: RunConfig, dataset: str, *, data_dir: str | None = None,
                   prompts: str | None = None) -> RunConfig:
    """The config that scores `run_config`'s student (and its CLIP teacher) on another dataset, e.g. an
    ImageNet-adapted run on ImageNet-V2 / -R / -Sketch / -A: the run's teacher, student and image size, the
    variant's data and prompts (its own prompt file unless `prompts`), and the whole split when the variant
    has a single one (holdout 0: every image is scored)."""
    spec = get_spec(dataset)
    data = replace(run_config.data, dataset=spec.name, data_dir=data_dir, train_split=None, test_split=None,
                   holdout_fraction=0.0)
    return validate_config(replace(run_config, data=data, teacher=replace(run_config.teacher, prompts=prompts)))


def model_classes(config: RunConfig) -> PromptSet:
    """The classes a run's student outputs, in output order: the run's prompt file (its --prompts or the
    dataset's own), else its training split's class names (generic image folders)."""
    name = config.teacher.prompts or get_spec(config.data.dataset).prompts
    if name is not None and config.teacher.classes is None and config.teacher.templates is None:
        return load_prompts(name)
    return prompts_for(config, load_table(config, "train"))


def evaluate_student_on(run_dir: str | Path, config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Score the student saved in `run_dir` on `config`'s test split (see `variant_config`), next to CLIP
    zero-shot on the same images.

    Dataset classes are mapped onto the student's outputs from data (`class_subsets.class_columns`: the
    prompt files' WordNet ids for ImageNet-R / -A, identical class lists for -V2 ...); the student's logits
    are restricted to those columns before the argmax (the standard 200-class protocol of -R and -A).
    ``student_all_outputs_top1`` is the unmasked accuracy (argmax over every output), for comparison.
    Images the CLIP cache marked corrupt are skipped for both, and counted."""
    from zeroshot_adapt.class_subsets import all_outputs_top1, class_columns, restrict_logits
    from zeroshot_adapt.stages import load_trained_student, predict_table, run_config

    run_dir = Path(run_dir)
    trained = run_config(run_dir)
    outputs = model_classes(trained)
    preds = teacher_predictions(config, "test", progress=progress)
    table, classes = preds.table, preds.prompts
    if not table.has_labels:
        raise UserError(f"dataset {config.data.dataset!r} has no labels in its test split: nothing to score")
    mapping = class_columns(classes.classes, outputs.classes, dataset_ids=classes.folder_names,
                            model_ids=outputs.folder_names, dataset=repr(config.data.dataset))
    student = load_trained_student(trained, len(outputs.classes), run_dir / "student.pt")
    valid = np.flatnonzero(preds.valid)
    transform = student_transforms(trained, recipe="auto", hflip=False).eval
    logits, _ = predict_table(student, table, valid, transform, num_workers=config.data.num_workers)
    labels = np.asarray(table.labels)[valid]
    restricted = restrict_logits(logits, mapping.columns)
    report = classification_report(restricted, restricted.argmax(axis=1), labels, list(classes.classes))
    clip = preds.zeroshot_report()
    return {
        "dataset": config.data.dataset,
        "run_dir": str(run_dir),
        "trained_on": trained.data.dataset,
        "num_samples": int(len(table)),
        "num_corrupt_skipped": int(len(table) - len(valid)),
        "class_mapping": {"dataset_classes": int(len(mapping.columns)), "model_outputs": mapping.num_model_classes,
                          "matched_by": mapping.matched_by, "identity": mapping.is_identity},
        "student": {k: report[k] for k in (*ROBUSTNESS_SUMMARY_KEYS, "prediction_counts")},
        "student_all_outputs_top1": all_outputs_top1(logits, labels, mapping.columns),
        "clip_zeroshot": {k: clip[k] for k in (*ROBUSTNESS_SUMMARY_KEYS, "prediction_counts")},
        "teacher": {"model": config.teacher.model, "pretrained": config.teacher.pretrained},
        "student_arch": trained.student.arch,
        "dataset_fingerprint": table.fingerprint,
    }


def robustness_report(run_dir: str | Path, configs: list[tuple[str, RunConfig]], out_dir: str | Path) -> dict[str, Any]:
    """`evaluate_student_on` for each (label, variant config); writes robustness.json and robustness.md."""
    out_dir = Path(out_dir)
    results = {label: evaluate_student_on(run_dir, config) for label, config in configs}
    write_json({"run_dir": str(run_dir), "datasets": results}, out_dir / "robustness.json")
    lines = ["| dataset | classes (of outputs) | student top-1 | student, all outputs | CLIP zero-shot top-1 |",
             "|---|---|---|---|---|"]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    for label, result in results.items():
        mapping = result["class_mapping"]
        lines.append(f"| {label} | {mapping['dataset_classes']} of {mapping['model_outputs']} "
                     f"({mapping['matched_by']}) | {pct(result['student']['top1'])} | "
                     f"{pct(result['student_all_outputs_top1'])} | {pct(result['clip_zeroshot']['top1'])} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "robustness.md", f"# Robustness of {run_dir}\n\n{table}")
    return {"run_dir": str(run_dir), "datasets": results, "table": table}



def check_resume_config(config: RunConfig, run_dir: Path) -> None:
    """Resuming into a run directory with a different config would silently mix two runs: refuse, naming
    every differing key with both values.

    The saved config is read from the checkpoint itself (never from config.yaml, which may be missing or
    edited). Keys that cannot change the result (RESUME_IGNORED_KEYS) are not compared."""
    from zeroshot_adapt.train import CHECKPOINT_NAME, read_checkpoint

    checkpoint = Path(run_dir) / "checkpoints" / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return
    saved = read_checkpoint(checkpoint, mmap=True).get("config")
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {str(checkpoint)!r} holds no run config; delete it (or use another --run-dir) "
                        "to start the run over")
    changed = config_differences(saved, to_dict(config), to_dict(RunConfig()))
    if changed:
        lines = "\n  ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed)
        raise UserError(
            f"run directory {str(run_dir)!r} holds a run with a different config ({len(changed)} key(s) differ):\n  "
            f"{lines}\nuse another --run-dir, or delete that one to start over (not compared, since they cannot "
            f"change the result: {', '.join(RESUME_IGNORED_KEYS)})"
        )


def finished_report(run_dir: Path) -> dict[str, Any] | None:
    """The saved report.json of a finished run in `run_dir` (all its outputs written, and its checkpoint,
    which :func:`check_resume_config` compares with the current config, still there), else None."""
    from zeroshot_adapt.train import CHECKPOINT_NAME

    path = Path(run_dir) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    finished = isinstance(report, dict) and report.get("completed") and report.get("step") == report.get("total_steps")
    outputs = (Path(run_dir) / "student.pt", Path(run_dir) / "checkpoints" / CHECKPOINT_NAME)
    return report if finished and all(path.is_file() for path in outputs) else None


@contextlib.contextmanager
def _run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (main process only; the other processes of a launch share its run).
    A run directory this call created and left holding nothing but the lock (a refused command) is removed."""
    from accelerate import PartialState

    from zeroshot_adapt.locks import exclusive_lock

    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        yield
        return
    created = not run_dir.exists()
    lock = run_dir / RUN_LOCK_NAME
    try:
        with exclusive_lock(lock, what=f"run directory {str(run_dir)!r}"):
            yield
    finally:
        if created and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == [RUN_LOCK_NAME]:
            with contextlib.suppress(OSError):
                lock.unlink()
                run_dir.rmdir()
