"""Multi-run pipeline stages: the long-tail baselines of REFERENCE.md section 5, run end to end.

Every training run here is a normal `pipeline.adapt` run (the one shared loop, its checkpoints, its
report.json) on a labeled set the stage chooses; `baselines.py` holds the pure math these stages walk
through. Each stage writes one run directory:

- `logit_adjusted_report`: post-hoc logit adjustment (Menon et al. 2021) of a finished run's student
  on the test split, with the labeled set's class prior; adds ``student_la`` to that run's report.json.
- `run_crest`: CReST / CReST+ (Wei et al. 2021). ``run_dir/gen0``, ``gen1``, ... are ordinary runs; the
  labeled set of generation g >= 1 is the human labels plus the pseudo-labels that generation g - 1's
  student picked at the class-rebalancing rates (`baselines.run_crest_generations`). CReST+ trains every
  generation with distribution alignment (algorithm ``distalign``) toward
  ``crest_plus_target(p(y), t_g)`` (``algorithm.extra.target_prior``, saved in each generation's
  config.yaml). Every generation starts from the same initialization (``student.pretrained``).
- `run_alternate`: alternate sampling (Peng et al. 2021) following `baselines.alternate_schedule`:
  embedding phase = a shared-loop run (``run_dir/round<r>``; round r >= 1 fine-tunes round r - 1's
  model on human labels + pseudo-labels); classifier phase = a linear head re-trained with class-balanced
  sampling on the frozen features of the human-labeled set (`decoupled_classifier_retrain`) and copied
  into the student; pseudo-label phase = that student's predictions on the unlabeled pool.

Resumable: a generation / round whose report.json says ``completed`` is not trained again (its saved
student is reloaded); an interrupted one resumes from its checkpoint through `adapt`. A directory that
holds a different labeled set or config is refused. Stages run in one process (CPU or one GPU).
Ground-truth labels of the unlabeled pool are read only for reporting pseudo-label precision.
"Human labels" means the run's labeled set: the SSL subset, or CLIP's confident labels in T-ZSL.
Pseudo-labels come from the student (not the EMA teacher), predicted with the eval transform.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zeroshot_adapt.baselines import (
    class_prior_from_labels,
    crest_sampling_rates,
    decoupled_classifier_retrain,
    evaluate_logit_adjusted,
    run_crest_generations,
)
from zeroshot_adapt.config import RunConfig
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.fileio import atomic_write
from zeroshot_adapt.pipeline import TrainingData, adapt, check_resume_config, prepare_training_data
from zeroshot_adapt.reports.metrics import classification_report, write_json

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"
STUDENT_NAME = "student.pt"  # what `adapt` saves
LABELED_SET_NAME = "labeled_set.npz"  # the labeled set a generation / round trained on
POOL_PROBS_NAME = "pool_probs.npy"  # CReST: a generation's probabilities on the unlabeled pool
BALANCED_STUDENT_NAME = "student_balanced.pt"  # alternate sampling: student + re-trained classifier
ROUND_REPORT_NAME = "round.json"
PREDICT_BATCH_SIZE = 256
SUMMARY_KEYS = ("top1", "mean_per_class_recall")
CREST_ALPHA = 1.0 / 3.0  # CReST on CIFAR-LT (REFERENCE.md section 5)
CREST_T_MIN = 0.5  # CReST+ final alignment temperature (REFERENCE.md section 5)
CREST_PLUS_ALGORITHM = "distalign"  # FixMatch + distribution alignment toward extra.target_prior
CLASSIFIER_EPOCHS = 30  # decoupled_classifier_retrain's default


class _Interrupted(Exception):
    """A shared-loop run stopped early (SIGINT / SIGTERM); re-running the stage resumes it."""


# ----------------------------------------------------------------------------- shared helpers


def _require_single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "the multi-run stages (CReST, alternate sampling, logit adjustment) run in one process; "
            "launch them without torchrun / accelerate launch"
        )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eval_transform(config: RunConfig):
    from zeroshot_adapt.data.registry import get_spec
    from zeroshot_adapt.pipeline import student_transforms

    spec = get_spec(config.data.dataset)
    return student_transforms(config, recipe=config.data.augment, hflip=spec.hflip).eval


def run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a finished run saved (``run_dir/config.yaml``), e.g. to logit-adjust it later."""
    import yaml

    from zeroshot_adapt.config import from_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} holds no config.yaml: is it a run directory?")
    return from_dict(yaml.safe_load(path.read_text()) or {})


def load_trained_student(config: RunConfig, num_classes: int, path: str | Path) -> nn.Module:
    """The student architecture of `config` with the weights `adapt` saved at `path` (eval mode)."""
    from zeroshot_adapt.models.clip_student import clip_student_architecture, is_clip_arch
    from zeroshot_adapt.models.student import create_student, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no trained student at {str(path)!r}: run the training stage first")
    if is_clip_arch(config.student.arch):  # architecture from the teacher's config, nothing downloaded
        model = clip_student_architecture(config, num_classes)
    else:
        model = create_student(config.student.arch, num_classes, pretrained=None)
    model.load_state_dict(read_state_dict(path))
    return model.eval()


def _linear_head(model: nn.Module) -> nn.Linear:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear) or not hasattr(model, "forward_head"):
        raise UserError(
            f"{type(model).__name__} has no plain linear classifier after forward_head(pre_logits=True); "
            "alternate sampling needs one (ResNet, WRN, EfficientNet, ... students have it)"
        )
    return head


@torch.no_grad()
def predict_table(
    model: nn.Module,
    table,
    indices: np.ndarray,
    transform,
    *,
    with_features: bool = False,
    batch_size: int = PREDICT_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits [N, C], features [N, D] or None), float32, of `model` (eval mode) on `table[indices]`.

    with_features: logits = classifier(pre-logit features), features from
    ``forward_head(forward_features(x), pre_logits=True)`` (timm's split; the input of the linear head).
    """
    from torch.utils.data import DataLoader

    from zeroshot_adapt.data.datasets import TableDataset

    device = device or _device()
    model = model.to(device).eval()
    head = _linear_head(model) if with_features else None
    loader = DataLoader(TableDataset(table, transform, indices=indices), batch_size=batch_size,
                        num_workers=num_workers)
    logits, features = [], []
    for batch in loader:
        images = batch["image"].to(device)
        if head is None:
            logits.append(model(images).float().cpu())
        else:
            pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
            features.append(pre_logits.float().cpu())
            logits.append(head(pre_logits).float().cpu())
    logits_np = torch.cat(logits).numpy() if logits else np.zeros((0, model.num_classes), np.float32)
    features_np = torch.cat(features).numpy() if features else None
    return logits_np, features_np


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def _summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if report is None else {k: report.get(k) for k in SUMMARY_KEYS}


def _read_report(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / REPORT_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _finished(run_dir: Path) -> bool:
    report = _read_report(run_dir)
    return bool(report and report.get("completed")) and (run_dir / STUDENT_NAME).is_file()


def _label_stats(indices: np.ndarray, labels: np.ndarray, data: TrainingData) -> dict[str, Any]:
    """Size, per-class counts and (where ground truth is known) precision of a set of labels."""
    truth = np.asarray(data.train.labels)[indices] if data.train.has_labels else np.full(len(indices), -1)
    known = truth >= 0
    return {
        "size": int(len(indices)),
        "per_class": np.bincount(labels, minlength=data.num_classes).astype(int).tolist(),
        "precision": float((labels[known] == truth[known]).mean()) if known.any() else None,
    }


def _check_labeled_set(run_dir: Path, indices: np.ndarray, labels: np.ndarray) -> None:
    """Record the labeled set a run trains on; refuse a directory that trained on another one."""
    path = run_dir / LABELED_SET_NAME
    if path.is_file():
        saved = np.load(path)
        if not (np.array_equal(saved["indices"], indices) and np.array_equal(saved["labels"], labels)):
            raise UserError(
                f"run directory {str(run_dir)!r} trained on a different labeled set (another alpha, seed, "
                "label split or an earlier generation changed); use another --run-dir, or delete it to start over"
            )
        return
    with atomic_write(path, "wb") as handle:
        np.savez(handle, indices=indices, labels=labels)


def _train_run(config: RunConfig, data: TrainingData, indices: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """One shared-loop run in `config.run_dir` on `data` with the labeled set (indices, labels);
    skipped when that directory already holds a finished run."""
    run_dir = Path(config.run_dir)
    _check_labeled_set(run_dir, indices, labels)
    if _finished(run_dir):
        check_resume_config(config, run_dir)
        log.info("%s is finished: not training it again", run_dir)
        return _read_report(run_dir)
    report = adapt(config, data=replace(data, labeled_indices=indices, labeled_targets=labels))
    if not report["completed"]:
        raise _Interrupted(str(run_dir))
    return report


def _copy_state(model: nn.Module, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        torch.save(model.state_dict(), handle)


# ----------------------------------------------------------------------------- logit adjustment


def logit_adjusted_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    labeled_labels: np.ndarray,
    class_names: list[str],
    *,
    tau: float = 1.0,
    smoothing: float = 1.0,
) -> dict[str, Any]:
    """Test metrics of post-hoc logit adjustment (Menon et al. 2021, eq. 9).

    logits: [N, C] test logits; labels: [N] test ground truth; labeled_labels: [K] the labeled set's
    labels, whose smoothed class frequencies are the prior (`class_prior_from_labels`). Returns
    ``{"top1", "mean_per_class_recall", "prediction_counts", "tau", "smoothing", "prior"}``.
    """
    prior = class_prior_from_labels(labeled_labels, len(class_names), smoothing=smoothing)
    predictions = evaluate_logit_adjusted(torch.as_tensor(logits), prior=prior, tau=tau).numpy()
    report = classification_report(None, predictions, labels, class_names)
    return {
        "top1": report["top1"],
        "mean_per_class_recall": report["mean_per_class_recall"],
        "prediction_counts": report["prediction_counts"],
        "tau": tau,
        "smoothing": smoothing,
        "prior": prior.tolist(),
    }


def logit_adjusted_report(
    config: RunConfig,
    *,
    run_dir: str | Path | None = None,
    data: TrainingData | None = None,
    tau: float = 1.0,
    smoothing: float = 1.0,
) -> dict[str, Any]:
    """Post-hoc logit adjustment of the finished run in `run_dir` (default ``config.run_dir``).

    Re-predicts the test split with the run's saved student, adjusts the logits with the prior of the
    run's labeled set (`data`, default `prepare_training_data(config)`: the human labels in SSL) and adds
    ``student_la`` ({top1, mean_per_class_recall, ...}) to the run's report.json. Returns that entry.
    """
    _require_single_process()
    run_dir = Path(run_dir or config.run_dir)
    report = _read_report(run_dir)
    if report is None or not report.get("completed"):
        raise UserError(f"{str(run_dir)!r} holds no finished run (report.json with completed=true)")
    data = prepare_training_data(config) if data is None else data
    if data.test is None or not data.test.has_labels:
        raise UserError(f"dataset {config.data.dataset!r} has no labeled test split to evaluate on")
    model = load_trained_student(config, data.num_classes, run_dir / STUDENT_NAME)
    logits, _ = predict_table(model, data.test, np.arange(len(data.test)), _eval_transform(config),
                              num_workers=config.data.num_workers)
    entry = logit_adjusted_metrics(logits, np.asarray(data.test.labels), data.labeled_targets, data.class_names,
                                   tau=tau, smoothing=smoothing)
    report["student_la"] = entry
    write_json(report, run_dir / REPORT_NAME)
    return entry


# ----------------------------------------------------------------------------- CReST / CReST+


def run_crest(
    config: RunConfig,
    num_generations: int,
    alpha: float = CREST_ALPHA,
    progressive_alignment: bool = False,
    t_min: float = CREST_T_MIN,
) -> dict[str, Any]:
    """CReST (or CReST+ with `progressive_alignment`) for `num_generations` shared-loop runs.

    Generation g trains in ``config.run_dir/gen<g>`` with ``config``'s algorithm (CReST+: ``distalign``
    with ``algorithm.extra.target_prior`` = the tempered labeled prior) on the human labels plus the
    pseudo-labels generation g - 1's student selected (`baselines.run_crest_generations`). Writes
    ``config.run_dir/report.json`` with per-generation accuracy and pseudo-label counts; returns it.
    """
    _require_single_process()
    if num_generations < 1:
        raise UserError(f"num_generations={num_generations} must be >= 1")
    method = "crest+" if progressive_alignment else "crest"
    root = Path(config.run_dir)
    if progressive_alignment and config.algorithm.name not in (CREST_PLUS_ALGORITHM, "fixmatch"):
        log.warning("CReST+ trains with %r (FixMatch + distribution alignment), not %r",
                    CREST_PLUS_ALGORITHM, config.algorithm.name)
    data = prepare_training_data(config)
    if len(data.labeled_indices) == 0:
        raise UserError("CReST needs a labeled set to compute its sampling rates; it is empty")
    human_counts = np.bincount(data.labeled_targets, minlength=data.num_classes)
    finished = 0  # generations whose pool probabilities have been produced
    transform = _eval_transform(config)

    def train_generation(indices: np.ndarray, labels: np.ndarray, da_target: np.ndarray | None) -> np.ndarray:
        nonlocal finished
        generation = finished
        gen_dir = root / f"gen{generation}"
        gen_config = replace(config, run_dir=str(gen_dir))
        if da_target is not None:
            algorithm = replace(config.algorithm, name=CREST_PLUS_ALGORITHM,
                                extra={**config.algorithm.extra, "target_prior": [float(p) for p in da_target]})
            gen_config = replace(gen_config, algorithm=algorithm)
        log.info("%s generation %d/%d: %d labeled (%d pseudo-labels)", method, generation + 1, num_generations,
                 len(indices), len(indices) - len(data.labeled_indices))
        _train_run(gen_config, data, indices, labels)
        probs_path = gen_dir / POOL_PROBS_NAME
        if probs_path.is_file():
            probs = np.load(probs_path)
        else:
            model = load_trained_student(gen_config, data.num_classes, gen_dir / STUDENT_NAME)
            logits, _ = predict_table(model, data.train, data.unlabeled_indices, transform,
                                      num_workers=config.data.num_workers)
            probs = _softmax(logits)
            with atomic_write(probs_path, "wb") as handle:
                np.save(handle, probs)
        finished += 1
        return probs

    report: dict[str, Any] = {
        "method": method,
        "dataset": config.data.dataset,
        "algorithm": CREST_PLUS_ALGORITHM if progressive_alignment else config.algorithm.name,
        "num_generations": num_generations,
        "alpha": alpha,
        "progressive_alignment": progressive_alignment,
        "t_min": t_min if progressive_alignment else None,
        "sampling_rates": crest_sampling_rates(human_counts, alpha).tolist(),
        "labeled_set": {**_label_stats(data.labeled_indices, data.labeled_targets, data),
                        "source": "human" if config.ssl.enabled else "clip"},
        "unlabeled_pool": int(len(data.unlabeled_indices)),
        "completed": False,
    }
    try:
        history = run_crest_generations(
            train_generation,
            labeled_indices=data.labeled_indices,
            labeled_labels=data.labeled_targets,
            unlabeled_indices=data.unlabeled_indices,
            num_classes=data.num_classes,
            num_generations=num_generations,
            alpha=alpha,
            progressive_alignment=progressive_alignment,
            t_min=t_min,
        )
    except _Interrupted as stopped:
        log.warning("%s interrupted in %s: re-run the same command to resume", method, stopped)
        report["generations_finished"] = finished
        write_json(report, root / REPORT_NAME)
        return report

    num_human = len(data.labeled_indices)
    generations = []
    for record in history:
        gen_dir = root / f"gen{record.generation}"
        run_report = _read_report(gen_dir) or {}
        pseudo = slice(num_human, None)
        generations.append({
            "generation": record.generation,
            "run_dir": str(gen_dir),
            "labeled_set_size": int(len(record.labeled_indices)),
            "pseudo_labels_trained_on": _label_stats(record.labeled_indices[pseudo], record.labels[pseudo], data),
            "temperature": record.temperature,
            "da_target": None if record.da_target is None else record.da_target.tolist(),
            "student": _summary(run_report.get("student")),
            "ema": _summary(run_report.get("ema")),
            "selected_for_next": _label_stats(record.pseudo_indices, record.pseudo_labels, data),
        })
    report.update(generations=generations, student=generations[-1]["student"], ema=generations[-1]["ema"],
                  completed=True)
    write_json(report, root / REPORT_NAME)
    return report


# ----------------------------------------------------------------------------- alternate sampling


def run_alternate(
    config: RunConfig,
    num_rounds: int,
    *,
    classifier_epochs: int = CLASSIFIER_EPOCHS,
    pseudo_threshold: float = 0.0,
) -> dict[str, Any]:
    """Alternate sampling (Peng et al. 2021) with `num_rounds` alternate rounds after round 0.

    Walks `baselines.alternate_schedule(num_rounds)`: per round an embedding run (shared loop, random
    sampling; ``run_dir/round<r>``), a class-balanced linear classifier on the frozen features of the
    human-labeled set copied into the student (`decoupled_classifier_retrain`, `classifier_epochs`), and
    — before every round r >= 1 — pseudo-labels on the unlabeled pool from that balanced student (those
    with confidence >= `pseudo_threshold`; 0 keeps all), which join the human labels for round r's
    embedding run; round r starts from round r - 1's balanced student. Writes ``run_dir/report.json``
    with the test accuracy of each round's embedding student and of its balanced classifier.
    """
    from zeroshot_adapt.baselines import alternate_schedule
    from zeroshot_adapt.models.student import read_state_dict

    _require_single_process()
    if not 0.0 <= pseudo_threshold <= 1.0:
        raise UserError(f"pseudo_threshold={pseudo_threshold!r} must be in [0, 1]")
    schedule = alternate_schedule(num_rounds)
    root = Path(config.run_dir)
    data = prepare_training_data(config)
    if len(data.labeled_indices) == 0:
        raise UserError("alternate sampling re-trains its classifier on the labeled set; it is empty")
    if data.test is None or not data.test.has_labels:
        raise UserError(f"dataset {config.data.dataset!r} has no labeled test split to evaluate on")
    transform = _eval_transform(config)
    human = set(data.labeled_indices.tolist())
    indices, labels = data.labeled_indices, data.labeled_targets
    init_checkpoint: Path | None = None
    model: nn.Module | None = None
    rounds: dict[int, dict[str, Any]] = {}
    report: dict[str, Any] = {
        "method": "alternate",
        "dataset": config.data.dataset,
        "algorithm": config.algorithm.name,
        "num_rounds": num_rounds,
        "classifier_epochs": classifier_epochs,
        "pseudo_threshold": pseudo_threshold,
        "labeled_set": {**_label_stats(data.labeled_indices, data.labeled_targets, data),
                        "source": "human" if config.ssl.enabled else "clip"},
        "unlabeled_pool": int(len(data.unlabeled_indices)),
        "completed": False,
    }
    for phase in schedule:
        round_dir = root / f"round{phase.round}"
        entry = rounds.setdefault(phase.round, {"round": phase.round, "run_dir": str(round_dir)})
        round_config = replace(config, run_dir=str(round_dir))
        if init_checkpoint is not None:
            round_config = replace(round_config, student=replace(config.student, pretrained=str(init_checkpoint)))
        if phase.kind == "pseudo_label":
            logits, _ = predict_table(model, data.train, data.unlabeled_indices, transform,
                                      num_workers=config.data.num_workers)
            probs = _softmax(logits)
            keep = (probs.max(1) >= pseudo_threshold) & np.array(
                [int(i) not in human for i in data.unlabeled_indices], dtype=bool
            )
            pseudo_indices = data.unlabeled_indices[keep]
            pseudo_labels = probs[keep].argmax(1).astype(np.int64)
            entry["pseudo_labels"] = _label_stats(pseudo_indices, pseudo_labels, data)
            indices = np.concatenate([data.labeled_indices, pseudo_indices])
            labels = np.concatenate([data.labeled_targets, pseudo_labels])
        elif phase.kind == "embedding":
            use = (data.labeled_indices, data.labeled_targets) if phase.data == "labeled" else (indices, labels)
            log.info("alternate sampling round %d: embedding run on %d labeled", phase.round, len(use[0]))
            try:
                run_report = _train_run(round_config, data, *use)
            except _Interrupted as stopped:
                log.warning("alternate sampling interrupted in %s: re-run the same command to resume", stopped)
                report["rounds"] = [rounds[r] for r in sorted(rounds)]
                write_json(report, root / REPORT_NAME)
                return report
            entry["labeled_set_size"] = int(len(use[0]))
            entry["embedding"] = {name: _summary(run_report.get(name)) for name in ("student", "ema")}
        else:  # classifier: class-balanced linear head on frozen features of the human-labeled set
            balanced_path = round_dir / BALANCED_STUDENT_NAME
            model = load_trained_student(round_config, data.num_classes, round_dir / STUDENT_NAME)
            saved = round_dir / ROUND_REPORT_NAME
            if balanced_path.is_file() and saved.is_file():
                model.load_state_dict(read_state_dict(balanced_path))
                entry["balanced"] = json.loads(saved.read_text())["balanced"]
            else:
                _, features = predict_table(model, data.train, data.labeled_indices, transform, with_features=True,
                                            num_workers=config.data.num_workers)
                classifier = decoupled_classifier_retrain(
                    torch.from_numpy(features), data.labeled_targets, data.num_classes,
                    sampling=phase.sampling, epochs=classifier_epochs, seed=config.seed,
                )
                head = _linear_head(model)
                with torch.no_grad():
                    head.weight.copy_(classifier.weight.to(head.weight.device))
                    head.bias.copy_(classifier.bias.to(head.bias.device))
                test_logits, _ = predict_table(model, data.test, np.arange(len(data.test)), transform,
                                               num_workers=config.data.num_workers)
                full = classification_report(test_logits, test_logits.argmax(1), np.asarray(data.test.labels),
                                             data.class_names)
                entry["balanced"] = {k: full[k] for k in (*SUMMARY_KEYS, "prediction_counts")}
                _copy_state(model, balanced_path)
                write_json({"balanced": entry["balanced"]}, saved)
            init_checkpoint = balanced_path
    last = rounds[max(rounds)]
    report.update(rounds=[rounds[r] for r in sorted(rounds)], student=_summary(last["balanced"]), completed=True)
    write_json(report, root / REPORT_NAME)
    return report
