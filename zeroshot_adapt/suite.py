"""`zsa suite`: many datasets x many methods x seeds, one command, one table.

A *cell* is (dataset entry, method, seed). `run_suite` runs every cell of the grid in order (dataset by
dataset), writes one CLIP_benchmark-shaped JSON record per finished cell (`reports.records`), and builds
``results.csv``, ``results.md``, a Figure-9 style bar chart and per-dataset imbalance plots from the
records on disk. Layout of the output folder::

    suite.json                      the suite's settings (a re-run with other settings is refused)
    records/<dataset>/<method>[-seed<k>].json   one record per finished cell (written atomically)
    errors/<dataset>/<method>[-seed<k>].json    the error of a failed cell (removed when it later succeeds)
    runs/<dataset>/<method>[-seed<k>]/          each training cell's run directory (resumable by itself)
    results.csv  results.md  figure9_accuracy.png  plots/imbalance_<dataset>.png

Resuming: a cell is finished when its record exists; a re-run skips finished cells and re-tries failed
and missing ones (a training cell killed mid-run resumes from its own checkpoint). One failing cell does
not stop the others: its error is recorded, shown in the table, and `run_suite` reports it.

The CLIP cache is built once per dataset and shared by every method: cells reach CLIP only through
`pipeline.teacher_predictions`, which keys the cache by everything that changes CLIP's predictions.

Methods: each method *kind* is ONE entry of `METHOD_KINDS`, a `MethodKind` whose `run(context)` runs one
cell and returns a `CellResult`; a method name belongs to the kind that lists or accepts it. Kinds here:
``zeroshot`` (CLIP zero-shot on the test split), ``train`` (every algorithm of
`zeroshot_adapt.algorithms.ALGORITHMS` through `pipeline.adapt`) and ``transduct`` (every training-free
method of `zeroshot_adapt.transduct.METHODS`, and chains of them, on the test split's cached features). A
further kind is one `register_kind(MethodKind(...))` call."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from zeroshot_adapt.config import RunConfig, to_dict
from zeroshot_adapt.errors import UserError
from zeroshot_adapt.registry import Registry
from zeroshot_adapt.reports import records as rec
from zeroshot_adapt.reports.metrics import write_json

log = logging.getLogger(__name__)

SUITE_FILE = "suite.json"
RECORDS_DIR = "records"
ERRORS_DIR = "errors"
RUNS_DIR = "runs"
PLOTS_DIR = "plots"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
FIGURE9 = "figure9_accuracy.png"
DATASETS_FILE_SUFFIXES = (".yaml", ".yml", ".csv", ".txt")
ENTRY_FIELDS = ("name", "dataset", "data_dir", "prompts", "student_from", "overrides")
ZEROSHOT = "zeroshot"


class SuiteInterrupted(Exception):
    """A training cell stopped early (SIGINT / SIGTERM, checkpoint written): re-run the suite to resume."""


# ------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a suite.

    name: the label in the table and the records' "dataset" field (CLIP_benchmark names such as
        `imagenet1k` stay as typed). dataset: a registered name or alias (`zsa datasets`).
    data_dir: a local copy (image folder, save_to_disk directory, MNIST IDX); None: the hub or bundled data.
    prompts: a prompt file for this dataset (default: the dataset's own).
    student_from: the name of an earlier entry; training methods then do not train here but score the
        student trained on that entry (same method and seed) on this dataset, with the -R / -A class masking
        of `pipeline.evaluate_student_on`; the whole split is used (holdout 0) by every method.
    overrides: dotted config overrides for this dataset only (applied after the suite's).
    """

    name: str
    dataset: str
    data_dir: str | None = None
    prompts: str | None = None
    student_from: str | None = None
    overrides: tuple[str, ...] = ()


def parse_dataset_item(item: str) -> DatasetEntry:
    """`DATASET` or `DATASET=PATH` (a local copy). The name is DATASET, except for the generic `imagefolder`
    dataset, which is named after its folder."""
    dataset, sep, path = item.partition("=")
    dataset, path = dataset.strip(), path.strip()
    if not dataset or (sep and not path):
        raise UserError(f"dataset item {item!r} is not DATASET or DATASET=PATH (e.g. eurosat=/data/EuroSAT_RGB)")
    name = Path(path).name if (dataset == "imagefolder" and path) else dataset
    return DatasetEntry(name=name, dataset=dataset, data_dir=path or None)


def _entry_from_mapping(values: dict[str, Any], where: str) -> DatasetEntry:
    unknown = sorted(set(values) - set(ENTRY_FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown fields {unknown}; valid: {', '.join(ENTRY_FIELDS)}")
    dataset = values.get("dataset") or values.get("name")
    if not dataset:
        raise UserError(f"{where}: give at least 'dataset' (a registered name or alias) or 'name'")
    overrides = values.get("overrides") or ()
    if isinstance(overrides, str):
        overrides = [part for part in overrides.split(";") if part.strip()]
    if isinstance(overrides, dict):
        overrides = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    text = {key: (str(values[key]).strip() or None) if values.get(key) not in (None, "") else None
            for key in ("name", "data_dir", "prompts", "student_from")}
    data_dir = text["data_dir"]
    name = text["name"] or (Path(data_dir).name if str(dataset) == "imagefolder" and data_dir else str(dataset))
    return DatasetEntry(name=name, dataset=str(dataset), data_dir=data_dir, prompts=text["prompts"],
                        student_from=text["student_from"], overrides=tuple(str(o).strip() for o in overrides))


def load_datasets_file(path: str | Path) -> list[DatasetEntry]:
    """Dataset entries from a file.

    - YAML (.yaml / .yml): a list of mappings (or {"datasets": [...]}) with the fields of `DatasetEntry`
      (overrides: a list of `key=value` or a mapping), e.g. ``- {name: sat, dataset: eurosat, data_dir: /d}``;
    - CSV (.csv): a header with some of name, dataset, data_dir, prompts, student_from, overrides
      (`;`-separated);
    - text (.txt): one `DATASET` or `DATASET=PATH` per line (CLIP_benchmark's dataset files); `#` comments.
    Relative data_dir / prompts paths are relative to the file's folder.
    """
    import yaml

    path = Path(path)
    where = f"datasets file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {where}: {error}") from None
    if path.suffix == ".txt":
        items = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        entries = [parse_dataset_item(item) for item in items if item]
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        entries = [_entry_from_mapping({k.strip(): v for k, v in row.items() if k}, f"{where} line {i + 2}")
                   for i, row in enumerate(rows)]
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UserError(f"{where} is not valid YAML: {error}") from None
        if isinstance(data, dict) and "datasets" in data:
            data = data["datasets"]
        if not isinstance(data, list) or not all(isinstance(item, (dict, str)) for item in data):
            raise UserError(f"{where} must hold a list of dataset entries (mappings or DATASET[=PATH] strings)")
        entries = [parse_dataset_item(item) if isinstance(item, str) else _entry_from_mapping(item, f"{where} #{i}")
                   for i, item in enumerate(data)]
    if not entries:
        raise UserError(f"{where} lists no dataset")
    return [_relative_to(entry, path.parent) for entry in entries]


def _relative_to(entry: DatasetEntry, folder: Path) -> DatasetEntry:
    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = Path(value).expanduser()
        if candidate.is_absolute() or not (folder / candidate).exists():
            return str(candidate)
        return str(folder / candidate)

    prompts = entry.prompts
    if prompts is not None and (prompts.endswith(".json") or "/" in prompts):
        prompts = resolve(prompts)
    return replace(entry, data_dir=resolve(entry.data_dir), prompts=prompts)


def dataset_entries(items: Sequence[str]) -> list[DatasetEntry]:
    """`--datasets` items (`DATASET`, `DATASET=PATH`, or a datasets file) as checked entries: unique names,
    known datasets (aliases accepted), existing local folders, `student_from` naming an earlier entry."""
    from zeroshot_adapt.data.registry import get_spec

    entries: list[DatasetEntry] = []
    for item in items:
        path = Path(item).expanduser()
        if path.suffix in DATASETS_FILE_SUFFIXES and "=" not in item:
            if not path.is_file():
                raise UserError(f"datasets file {item!r} does not exist")
            entries.extend(load_datasets_file(path))
        else:
            entries.append(parse_dataset_item(item))
    seen: set[str] = set()
    for entry in entries:
        get_spec(entry.dataset)  # unknown name: UserError listing names and aliases
        if entry.name in seen:
            raise UserError(
                f"two datasets are named {entry.name!r}; give each its own name in a datasets file "
                "(YAML/CSV field 'name')"
            )
        if entry.data_dir is not None and not Path(entry.data_dir).exists():
            raise UserError(f"data_dir {entry.data_dir!r} of dataset {entry.name!r} does not exist")
        if entry.student_from is not None and entry.student_from not in seen:
            raise UserError(
                f"dataset {entry.name!r}: student_from={entry.student_from!r} must name a dataset listed before it "
                f"(listed so far: {', '.join(sorted(seen)) or 'none'})"
            )
        seen.add(entry.name)
    if not entries:
        raise UserError("no dataset given")
    return entries


# -------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Cell:
    entry: DatasetEntry
    method: str
    seed: int | None  # None: a deterministic method, run once

    @property
    def label(self) -> str:
        return f"{self.entry.name}/{self.method}" + ("" if self.seed is None else f"/seed{self.seed}")

    @property
    def stem(self) -> str:
        return slug(self.method) + ("" if self.seed is None else f"-seed{self.seed}")


@dataclass(frozen=True)
class CellContext:
    """What a method kind's `run` gets.

    config: the resolved config of the cell's dataset (suite recipe + entry overrides), with `seed` set for
        seeded kinds and `run_dir` = work_dir. The kind sets its own method knobs (e.g. algorithm.name).
    work_dir: the cell's own folder under runs/ (created on demand; resumable state goes here).
    source_work_dir: for an entry with `student_from`, the work dir of the same method and seed on that
        entry (where its trained student is); None otherwise.
    """

    cell: Cell
    config: RunConfig
    work_dir: Path
    source_work_dir: Path | None = None


@dataclass
class CellResult:
    """What a cell produced. metrics: acc1 / acc5 / mean_per_class_recall as fractions (None where
    undefined), optionally more (e.g. ema_acc1). prediction_counts: predictions per class on the scored
    split (for the imbalance plots). student: the model that predicted (None: CLIP itself). config: the
    config the kind actually ran with, when it changed the context's (e.g. algorithm.name); the record's
    recipe shows it. extra: more fields for the record (must not shadow CLIP_benchmark's)."""

    metrics: dict[str, float | None]
    prediction_counts: list[int] | None = None
    student: str | None = None
    tau_clip: float | None = None
    config: RunConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodKind:
    """One kind of suite method: one function runs any cell of any of its methods.

    methods(): the method names this kind runs (listed in errors and `zsa suite --help`).
    accepts(name): optional, for names beyond `methods()` (e.g. composed transduct chains `a,b`).
    seeded: False for deterministic methods (one cell per dataset, record seed null).
    """

    name: str
    run: Callable[[CellContext], CellResult]
    methods: Callable[[], Sequence[str]]
    accepts: Callable[[str], bool] | None = None
    seeded: bool = True
    description: str = ""

    def handles(self, method: str) -> bool:
        return method in self.methods() or (self.accepts is not None and self.accepts(method))


METHOD_KINDS: Registry[MethodKind] = Registry("suite method kind")
_kind_order: list[str] = []  # registration order: method names are listed and resolved kind by kind


def method_names() -> list[str]:
    """Every method name the registered kinds list (in registration order of the kinds)."""
    return [name for kind in (METHOD_KINDS.get(k) for k in _kind_order) for name in kind.methods()]


def register_kind(kind: MethodKind) -> MethodKind:
    METHOD_KINDS.add(kind.name, kind)
    _kind_order.append(kind.name)
    return kind


def method_kind(method: str) -> MethodKind:
    """The kind that runs `method`; a UserError listing the valid method names otherwise."""
    for name in _kind_order:
        kind = METHOD_KINDS.get(name)
        if kind.handles(method):
            return kind
    raise UserError(f"unknown suite method {method!r}; valid: {', '.join(method_names())}")


def _scored_counts(report: dict[str, Any]) -> list[int] | None:
    """Predictions per class of a report holding a confusion matrix [true][predicted] (column sums)."""
    confusion = report.get("confusion")
    return None if confusion is None else np.asarray(confusion).sum(axis=0).astype(int).tolist()


def run_zeroshot(context: CellContext) -> CellResult:
    """CLIP zero-shot on the dataset's test split, from the shared cache (built on first use)."""
    from zeroshot_adapt import pipeline
    from zeroshot_adapt.reports.label_free import label_free_diagnostics

    preds = pipeline.teacher_predictions(context.config, "test")
    report = preds.zeroshot_report()
    valid = preds.valid  # CLIP is the reference: its agreement with itself is left undefined
    diagnostics = label_free_diagnostics(preds.prediction[valid], preds.confidence[valid], list(preds.prompts.classes))
    return CellResult(
        metrics=rec.metrics_from_report(report) | rec.label_free_metrics(diagnostics),
        prediction_counts=list(report["prediction_counts"]),
        extra={"num_corrupt_skipped": int((~preds.valid).sum()), "logit_scale": preds.logit_scale},
    )


def run_training(context: CellContext) -> CellResult:
    """Adapt a student with the cell's algorithm (`pipeline.adapt`: cache -> filter -> train -> evaluate) and
    score it on the test split; or, for an entry with `student_from`, score the student trained there."""
    from zeroshot_adapt import pipeline

    config = replace(context.config, algorithm=replace(context.config.algorithm, name=context.cell.method))
    if context.source_work_dir is not None:
        return _score_source_student(context, config)
    report = pipeline.adapt(config)
    if not report["completed"]:
        raise SuiteInterrupted(f"{context.cell.label} stopped at step {report['step']}/{report['total_steps']}")
    if "student" not in report:
        raise UserError(f"dataset {context.cell.entry.name!r} has no labeled test split: the student cannot be scored")
    return CellResult(
        metrics=(rec.metrics_from_report(report["student"]) | rec.metrics_from_report(report["ema"], rec.EMA_PREFIX)
                 | rec.label_free_metrics(report["student"].get("label_free"))),
        prediction_counts=_scored_counts(report["student"]),
        student=config.student.arch,
        tau_clip=config.pseudo.tau_clip,
        config=config,
        extra={"clip_zeroshot_test": report.get("clip_zeroshot"), "labeled_set": report["labeled_set"],
               "unlabeled_set": report["unlabeled_set"], "train_steps": report["total_steps"]},
    )


def _score_source_student(context: CellContext, config: RunConfig) -> CellResult:
    from zeroshot_adapt import pipeline
    from zeroshot_adapt.stages import run_config

    source = context.source_work_dir
    report_path = source / "report.json"
    finished = report_path.is_file() and json.loads(report_path.read_text()).get("completed")
    if not finished or not (source / "student.pt").is_file():
        raise UserError(
            f"no finished student in {str(source)!r} (dataset {context.cell.entry.student_from!r}, method "
            f"{context.cell.method!r}, seed {context.cell.seed}): that cell failed or has not run"
        )
    trained = run_config(source)
    entry = context.cell.entry
    variant = pipeline.variant_config(trained, entry.dataset, data_dir=config.data.data_dir,
                                      prompts=config.teacher.prompts)
    result = pipeline.evaluate_student_on(source, variant)
    return CellResult(
        metrics=rec.metrics_from_report(result["student"]),
        prediction_counts=result["student"]["prediction_counts"],
        student=trained.student.arch,
        tau_clip=trained.pseudo.tau_clip,
        config=variant,
        extra={"student_from": entry.student_from, "class_mapping": result["class_mapping"],
               "student_all_outputs_acc1": result["student_all_outputs_top1"],
               "clip_zeroshot_same_images": rec.metrics_from_report(result["clip_zeroshot"])},
    )


def _algorithm_names() -> list[str]:
    from zeroshot_adapt.algorithms import ALGORITHMS

    return ALGORITHMS.names()


register_kind(MethodKind(
    name="zeroshot", run=run_zeroshot, methods=lambda: [ZEROSHOT], seeded=False,
    description="CLIP zero-shot on the test split (deterministic: one cell per dataset)",
))
register_kind(MethodKind(
    name="train", run=run_training, methods=_algorithm_names, seeded=True,
    description="adapt a student with a training algorithm (pipeline.adapt), one cell per seed",
))

def _transduct_methods() -> list[str]:
    from zeroshot_adapt.transduct import METHODS

    return [name for name in METHODS.names() if name != ZEROSHOT]  # CLIP zero-shot is the zeroshot kind's


def _is_transduct_chain(method: str) -> bool:
    from zeroshot_adapt.transduct import parse_chain

    if "," not in method:
        return False
    try:
        parse_chain(method)
    except UserError:
        return False
    return True


def run_transduct(context: CellContext) -> CellResult:
    """A training-free method (or chain) on the test split's cached CLIP features and logits (transductive:
    the split it refines is the split it is scored on, as in TransCLIP and ZLaP); the refined set is stored
    with the cache (`pipeline.refined_predictions`)."""
    from zeroshot_adapt import pipeline
    from zeroshot_adapt.reports.label_free import label_free_diagnostics
    from zeroshot_adapt.reports.metrics import classification_report

    config = replace(context.config, transduct=replace(context.config.transduct, method=context.cell.method))
    preds = pipeline.teacher_predictions(config, "test")
    refined = pipeline.refined_predictions(config, preds)
    valid = preds.valid
    labels = np.asarray(preds.table.labels)[valid] if preds.table.has_labels else None
    probabilities = np.asarray(refined.derived.probabilities[valid], dtype=np.float32)
    prediction = refined.derived.prediction[valid]
    classes = list(preds.prompts.classes)
    report = classification_report(probabilities, prediction, labels, classes)
    diagnostics = label_free_diagnostics(prediction, probabilities.max(axis=1), classes,
                                         reference=preds.prediction[valid],  # agreement with zero-shot CLIP
                                         true_accuracy=report["top1"])
    return CellResult(
        metrics=rec.metrics_from_report(report) | rec.label_free_metrics(diagnostics),
        prediction_counts=list(report["prediction_counts"]),
        config=config,
        extra={"num_corrupt_skipped": int((~valid).sum()), "transduct_steps": refined.steps},
    )


register_kind(MethodKind(
    name="transduct", run=run_transduct, methods=_transduct_methods, accepts=_is_transduct_chain, seeded=False,
    description="a training-free method on the cached CLIP features (zsa transduct-methods); chains such as "
    "label-propagation,sinkhorn are one method (deterministic: one cell per dataset)",
))


# ----------------------------------------------------------------------------------------------- grid


def slug(text: str) -> str:
    """A file-name-safe form of a dataset or method name (`vtab/eurosat` -> `vtab_eurosat`)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def plan_cells(entries: Sequence[DatasetEntry], methods: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """The grid, dataset by dataset, in the order given; deterministic kinds get one cell (seed None).
    Unknown methods, repeated methods or seeds, and names that collide as file names are UserErrors."""
    if not methods:
        raise UserError("no method given")
    if not seeds:
        raise UserError("no seed given")
    for what, values in (("method", methods), ("seed", seeds)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise UserError(f"{what}s given twice: {', '.join(repeated)}")
    kinds = {method: method_kind(method) for method in methods}
    for what, names in (("dataset", [e.name for e in entries]), ("method", list(methods))):
        slugs: dict[str, str] = {}
        for name in names:
            other = slugs.setdefault(slug(name), name)
            if other != name:
                raise UserError(f"{what}s {other!r} and {name!r} share the file name {slug(name)!r}; rename one")
    return [Cell(entry, method, seed)
            for entry in entries for method in methods
            for seed in (seeds if kinds[method].seeded else [None])]


# Overrides that change where or how fast things run, never a result: left out of the suite's identity, so a
# re-run may move the cache or change the worker count.
RUNTIME_KEYS = ("teacher.cache_dir", "data.num_workers", "teacher.num_workers", "teacher.batch_size",
                "teacher.shard_size", "log_with")


@dataclass(frozen=True)
class SuiteSettings:
    """The recipe every cell shares: a YAML config file and dotted overrides (teacher flags included),
    applied to each dataset's own preset (`pipeline.resolve_config`)."""

    out_dir: Path
    config_file: str | None = None
    overrides: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What makes two suites' records comparable (a re-run into the same folder must match it): the config
        file's content and the overrides, less the RUNTIME_KEYS ones."""
        digest = None
        if self.config_file is not None:
            digest = hashlib.sha256(Path(self.config_file).read_bytes()).hexdigest()
        return {"config_file_sha256": digest, "overrides": normalized_overrides(self.overrides)}


def normalized_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`key=value` overrides as {key: parsed value}, sorted, the last one of a key winning, RUNTIME_KEYS left
    out: `teacher.model=x` and `teacher.model="x"` (what the CLI flags produce) are the same recipe."""
    import yaml

    values: dict[str, Any] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key in RUNTIME_KEYS:
            continue
        try:
            values[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            values[key] = raw
    return dict(sorted(values.items()))


@dataclass
class SuiteSummary:
    cells: list[Cell]
    rows: list[rec.ResultRow]
    ran: list[str] = field(default_factory=list)  # cells computed by this call
    skipped: list[str] = field(default_factory=list)  # finished before (record on disk)
    failed: list[str] = field(default_factory=list)  # failed in this call

    @property
    def num_failed(self) -> int:
        return sum(row.status == rec.STATUS_FAILED for row in self.rows)


def record_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / RECORDS_DIR / slug(cell.entry.name) / f"{cell.stem}.json"


def error_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / ERRORS_DIR / slug(cell.entry.name) / f"{cell.stem}.json"


def work_dir(out_dir: Path, entry: DatasetEntry, method: str, seed: int | None) -> Path:
    return out_dir / RUNS_DIR / slug(entry.name) / (slug(method) + ("" if seed is None else f"-seed{seed}"))


def entry_config(entry: DatasetEntry, settings: SuiteSettings) -> RunConfig:
    """The resolved config of one dataset: its preset < the suite's config file < the suite's overrides <
    the entry's data_dir / prompts / overrides (a `student_from` entry is scored whole: holdout 0)."""
    from zeroshot_adapt import pipeline

    overrides = list(settings.overrides)
    if entry.data_dir is not None:
        overrides.append(f"data.data_dir={json.dumps(entry.data_dir)}")
    if entry.prompts is not None:
        overrides.append(f"teacher.prompts={json.dumps(entry.prompts)}")
    if entry.student_from is not None:
        overrides.append("data.holdout_fraction=0")
    overrides.extend(entry.overrides)
    try:
        return pipeline.resolve_config(entry.dataset, config_file=settings.config_file, overrides=overrides)
    except UserError as error:
        raise UserError(f"dataset {entry.name!r}: {error}") from None


def _check_settings(out_dir: Path, settings: SuiteSettings, entries: Sequence[DatasetEntry]) -> None:
    """Refuse to mix two suites in one folder: same recipe, and each dataset name meaning the same data."""
    path = out_dir / SUITE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    identity = settings.identity()
    if saved and saved.get("settings") != identity:
        changed = [k for k in identity if saved.get("settings", {}).get(k) != identity[k]]
        raise UserError(
            f"{str(out_dir)!r} holds a suite with other settings ({', '.join(changed)} changed); its records "
            "would not be comparable: use another --out, or delete that folder to start over"
        )
    known = dict(saved.get("datasets", {}))
    for entry in entries:
        now = {k: v for k, v in asdict(entry).items() if k != "name"}
        now["overrides"] = list(now["overrides"])
        if entry.name in known and known[entry.name] != now:
            raise UserError(
                f"{str(out_dir)!r} already holds dataset {entry.name!r} as {known[entry.name]}; now it is {now}: "
                "give it another name, or use another --out"
            )
        known[entry.name] = now
    write_json({"settings": identity, "config_file": settings.config_file, "datasets": known}, path)


def dataset_protocol(config: RunConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(split protocol, content fingerprints) of the dataset `config` names: source, split names, holdout,
    sizes; sha256 fingerprints of the train and test sample lists."""
    from zeroshot_adapt import pipeline
    from zeroshot_adapt.data.registry import get_spec

    spec = get_spec(config.data.dataset)
    train, test = pipeline.load_table(config, "train"), pipeline.load_table(config, "test")
    protocol = {
        "source": config.data.data_dir or spec.hf_id or "bundled",
        "registered_dataset": spec.name,
        "train_split": config.data.train_split or spec.train_split,
        "test_split": config.data.test_split or spec.test_split,
        # used only when the source has a single split: then test = this stratified fraction of it (seed 0)
        "holdout_fraction_if_single_split": config.data.holdout_fraction,
        "num_train": len(train),
        "num_test": len(test),
        "train_is_test": train.fingerprint == test.fingerprint,  # transductive: scored on the images it adapted to
    }
    return protocol, {"train": train.fingerprint, "test": test.fingerprint}


def _record(cell: Cell, config: RunConfig, result: CellResult, settings: SuiteSettings, protocol, fingerprints,
            seconds: float) -> dict[str, Any]:
    resolved = to_dict(config)
    resolved.pop("run_dir", None)
    return rec.make_record(
        dataset=cell.entry.name,
        model=config.teacher.model,
        pretrained=config.teacher.pretrained,
        method=cell.method,
        seed=cell.seed,
        metrics=result.metrics,
        student=result.student,
        tau_clip=result.tau_clip,
        recipe={"config_file": settings.config_file, "overrides": [*settings.overrides, *cell.entry.overrides],
                "resolved": resolved},
        split_protocol=protocol,
        dataset_fingerprint=fingerprints,
        prediction_counts=result.prediction_counts,
        seconds=round(seconds, 3),
        **result.extra,
    )


def run_cell(cell: Cell, config: RunConfig, settings: SuiteSettings,
             protocols: dict[str, tuple[dict, dict]]) -> dict[str, Any]:
    """Run one cell and return its record (not written)."""
    kind = method_kind(cell.method)
    out = settings.out_dir
    config = replace(config, seed=cell.seed if cell.seed is not None else config.seed,
                     run_dir=str(work_dir(out, cell.entry, cell.method, cell.seed)))
    source = None
    if cell.entry.student_from is not None and kind.name != "zeroshot":
        source_entry = replace(cell.entry, name=cell.entry.student_from)
        source = work_dir(out, source_entry, cell.method, cell.seed)
    start = time.perf_counter()
    result = kind.run(CellContext(cell=cell, config=config, work_dir=Path(config.run_dir), source_work_dir=source))
    seconds = time.perf_counter() - start
    config = result.config or config
    if cell.entry.name not in protocols:
        protocols[cell.entry.name] = dataset_protocol(config)
    protocol, fingerprints = protocols[cell.entry.name]
    return _record(cell, config, result, settings, protocol, fingerprints, seconds)


def _error_text(error: BaseException) -> str:
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


def run_suite(
    entries: Sequence[DatasetEntry],
    methods: Sequence[str],
    seeds: Sequence[int],
    settings: SuiteSettings,
    *,
    on_cell_done: Callable[[Cell, str], None] | None = None,
) -> SuiteSummary:
    """Run every unfinished cell of the grid, then write the tables and figures (also when interrupted).

    on_cell_done(cell, status): called after each cell with "ok", "failed" or "skipped" (progress hooks).
    A cell that raises is recorded as failed and the suite goes on; Ctrl-C / SIGTERM (KeyboardInterrupt,
    SuiteInterrupted) stop it after writing the tables. Returns which cells ran, were skipped, failed."""
    out = Path(settings.out_dir)
    cells = plan_cells(entries, methods, seeds)
    configs = {entry.name: entry_config(entry, settings) for entry in entries}  # bad overrides: fail up front
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings, entries)
    summary = SuiteSummary(cells=cells, rows=[])
    protocols: dict[str, tuple[dict, dict]] = {}
    try:
        for number, cell in enumerate(cells, start=1):
            target = record_path(out, cell)
            if target.is_file():
                summary.skipped.append(cell.label)
                log.info("[%d/%d] %s: finished before, skipped", number, len(cells), cell.label)
                if on_cell_done:
                    on_cell_done(cell, "skipped")
                continue
            log.info("[%d/%d] %s: running", number, len(cells), cell.label)
            try:
                record = run_cell(cell, configs[cell.entry.name], settings, protocols)
            except (KeyboardInterrupt, SuiteInterrupted):
                raise
            except Exception as error:  # one failing cell must not stop the others; its error is recorded
                message = _error_text(error)
                log.error("[%d/%d] %s failed: %s", number, len(cells), cell.label, message)
                write_json({"cell": cell.label, "error": message, "traceback": traceback.format_exc()},
                           error_path(out, cell))
                summary.failed.append(cell.label)
                status = rec.STATUS_FAILED
            else:
                write_json(record, target)
                error_path(out, cell).unlink(missing_ok=True)
                summary.ran.append(cell.label)
                acc1 = record["metrics"].get("acc1")
                log.info("[%d/%d] %s: acc1 %s (%.1f s)", number, len(cells), cell.label,
                         "n/a" if acc1 is None else f"{100 * acc1:.2f}%", record["seconds"])
                status = rec.STATUS_OK
            if on_cell_done:
                on_cell_done(cell, status)
    finally:
        summary.rows = write_results(cells, entries, methods, settings)
    return summary


# --------------------------------------------------------------------------------------------- tables


def result_rows(cells: Sequence[Cell], out_dir: Path) -> list[rec.ResultRow]:
    """Each cell's state on disk: its record (ok), its error file (failed), or neither (pending)."""
    rows = []
    for cell in cells:
        path, error = record_path(out_dir, cell), error_path(out_dir, cell)
        base = {"dataset": cell.entry.name, "method": cell.method, "seed": cell.seed}
        if path.is_file():
            record = rec.read_record(path)
            rows.append(rec.ResultRow(**base, status=rec.STATUS_OK, metrics=record["metrics"],
                                      seconds=record.get("seconds"), record=str(path.relative_to(out_dir))))
        elif error.is_file():
            rows.append(rec.ResultRow(**base, status=rec.STATUS_FAILED, error=json.loads(error.read_text())["error"]))
        else:
            rows.append(rec.ResultRow(**base, status=rec.STATUS_PENDING))
    return rows


def write_results(cells: Sequence[Cell], entries: Sequence[DatasetEntry], methods: Sequence[str],
                  settings: SuiteSettings) -> list[rec.ResultRow]:
    """results.csv, results.md, the Figure-9 chart and the per-dataset imbalance plots, from the files on disk."""
    from zeroshot_adapt.fileio import atomic_write_text
    from zeroshot_adapt.reports.plots import plot_accuracy_bars, plot_prediction_counts_by_method

    out = Path(settings.out_dir)
    rows = result_rows(cells, out)
    atomic_write_text(out / RESULTS_CSV, rec.results_csv(rows))
    names = [entry.name for entry in entries]
    failures = rec.failure_lines(rows)
    pending = sum(row.status == rec.STATUS_PENDING for row in rows)
    teachers = sorted({_teacher_of(out, cell) for cell in cells} - {None})
    text = [
        "# Suite results",
        "",
        f"Top-1 accuracy (%), mean ± std over seeds (sample std); **bold**: best per dataset. "
        f"{len(rows) - pending - len(failures)} of {len(rows)} cells finished, {len(failures)} failed, "
        f"{pending} pending. Teacher: {', '.join(teachers) or 'n/a'}.",
        "",
    ]
    unlabeled = _unlabeled_datasets(rows, names)
    labeled = [name for name in names if name not in unlabeled]
    if labeled or not unlabeled:
        text += [rec.markdown_table(rows, labeled, methods, "acc1"), "Mean per-class recall (%):", "",
                 rec.markdown_table(rows, labeled, methods, "mean_per_class_recall")]
    if unlabeled:
        text += ["Datasets without labels (no accuracy can be computed; label-free columns instead, "
                 "reports/label_free.py). Estimated top-1 (%): Average Confidence (Hendrycks & Gimpel 2017), "
                 "which assumes a calibrated model and usually overestimates a self-trained student:", "",
                 rec.markdown_table(rows, unlabeled, methods, "estimated_acc1"),
                 "Agreement with CLIP's predictions (%; CLIP itself: —):", "",
                 rec.markdown_table(rows, unlabeled, methods, "clip_agreement"),
                 "Normalised entropy of the predicted classes (%; 100 = uniform):", "",
                 rec.markdown_table(rows, unlabeled, methods, "prediction_entropy")]
    if failures:
        text += ["Failed cells (full errors and tracebacks in errors/):", "", *failures, ""]
    atomic_write_text(out / RESULTS_MD, "\n".join(text))
    _write_plots(rows, cells, names, methods, out, plot_accuracy_bars, plot_prediction_counts_by_method)
    return rows


def _unlabeled_datasets(rows: Sequence[rec.ResultRow], names: Sequence[str]) -> list[str]:
    """Datasets whose finished cells have label-free metrics but no accuracy (their test split has no labels)."""
    unlabeled = []
    for name in names:
        done = [row for row in rows if row.dataset == name and row.status == rec.STATUS_OK]
        if done and all(row.value("acc1") is None for row in done) and any(
                row.value("estimated_acc1") is not None for row in done):
            unlabeled.append(name)
    return unlabeled


def _teacher_of(out: Path, cell: Cell) -> str | None:
    path = record_path(out, cell)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return f"{record['model']} / {record['pretrained']}"


def _write_plots(rows, cells, names, methods, out: Path, bars, lines) -> None:
    summary = rec.summarize(rows, "acc1")
    means = {d: {m: summary[(d, m)].mean for m in methods if (d, m) in summary} for d in names}
    stds = {d: {m: summary[(d, m)].std for m in methods if (d, m) in summary} for d in names}
    if any(v is not None for scores in means.values() for v in scores.values()):
        bars(means, out / FIGURE9, title="CLIP zero-shot vs adapted students (top-1, mean over seeds)",
             errors=stds)
    for name in names:
        counts: dict[str, list[np.ndarray]] = {}
        for cell in cells:
            path = record_path(out, cell)
            if cell.entry.name != name or not path.is_file():
                continue
            vector = json.loads(path.read_text()).get("prediction_counts")
            if vector is not None:
                counts.setdefault(cell.method, []).append(np.asarray(vector, dtype=np.float64))
        if counts and len({len(v[0]) for v in counts.values()}) == 1:
            averaged = {method: np.mean(vectors, axis=0) for method, vectors in counts.items()}
            lines(averaged, out / PLOTS_DIR / f"imbalance_{slug(name)}.png",
                  title=f"Predictions per class on {name} (test split, mean over seeds)")
