"""Result records in CLIP_benchmark's shape, and the tables built from them.

One JSON record per suite cell (dataset x method x seed), readable by CLIP_benchmark's `build` step
(`clip_benchmark build records/*.json --output benchmark.csv`) and by notebooks written for its records:

    {"dataset": "eurosat", "model": "RN50-quickgelu", "pretrained": "openai",
     "task": "zeroshot_classification", "language": "en",
     "metrics": {"acc1": 0.6981, "acc5": 0.97, "mean_per_class_recall": 0.69},
     "method": "debiaspl", "student": "resnet50", "seed": 0, "tau_clip": 0.95, ...}

CLIP_benchmark's fields (LAION-AI/CLIP_benchmark `clip_benchmark/cli.py`, `run()`): dataset, model,
pretrained, task, metrics (acc1, acc5, mean_per_class_recall, as fractions), language. Ours add: method,
student (None: CLIP itself predicts), seed (None for deterministic methods), tau_clip, recipe, the split
protocol and the dataset fingerprint. `model` / `pretrained` are always the CLIP teacher's. `task` is
"zeroshot_classification" for every method: adaptation is transductive zero-shot (no label is used), and
notebooks that filter CLIP_benchmark records by task keep ours; `method` tells them apart.
Training methods also report their EMA teacher as `metrics.ema_acc1` / `ema_acc5` /
`ema_mean_per_class_recall`. Undefined metrics (no labels) are null.

Its build step flattens each record: the metrics, then every top-level field (a field named like a
metric would win), minus "metrics", plus `model_fullname = model + " " + pretrained`.
`flatten_record` does the same, so tests can check our records survive it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK = "zeroshot_classification"
LANGUAGE = "en"
METRIC_KEYS = ("acc1", "acc5", "mean_per_class_recall")
REPORT_KEYS = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}
REQUIRED_FIELDS = ("dataset", "model", "pretrained", "task", "metrics", "method", "seed")
EMA_PREFIX = "ema_"
# Label-free columns (reports.label_free), fractions like the others: the student's Average-Confidence
# accuracy estimate, its agreement with CLIP's predictions and the normalised entropy of its predicted classes.
# The table shows them instead of accuracy for a dataset without labels.
LABEL_FREE_KEYS = ("estimated_acc1", "clip_agreement", "prediction_entropy")
PERCENT = 100.0
DECIMALS = 2  # the table's precision, in percent (CLIP_benchmark-style numbers: 59.82)

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_PENDING = "pending"


def metrics_from_report(report: Mapping[str, Any] | None, prefix: str = "") -> dict[str, float | None]:
    """classification_report's top1 / top5 / mean_per_class_recall as CLIP_benchmark's acc1 / acc5 /
    mean_per_class_recall (fractions; None where undefined), each name prefixed with `prefix`."""
    report = report or {}
    return {f"{prefix}{ours}": report.get(theirs) for theirs, ours in REPORT_KEYS.items()}


def label_free_metrics(diagnostics: Mapping[str, Any] | None) -> dict[str, float | None]:
    """A `reports.label_free.label_free_diagnostics` dict as the LABEL_FREE_KEYS metrics (None where absent)."""
    diagnostics = diagnostics or {}
    return {"estimated_acc1": (diagnostics.get("estimated_accuracy") or {}).get("value"),
            "clip_agreement": diagnostics.get("agreement_with_clip"),
            "prediction_entropy": diagnostics.get("normalized_entropy")}


def make_record(
    *,
    dataset: str,
    model: str,
    pretrained: str,
    method: str,
    seed: int | None,
    metrics: Mapping[str, float | None],
    **fields: Any,
) -> dict[str, Any]:
    """A CLIP_benchmark-shaped record; `fields` (student, tau_clip, recipe, split_protocol, ...) are added at the
    top level and must not shadow CLIP_benchmark's own fields or a metric name."""
    clash = sorted((set(fields) & {*REQUIRED_FIELDS, "language"}) | (set(fields) & set(metrics)))
    if clash:
        raise ValueError(f"record fields {clash} would shadow CLIP_benchmark fields or metrics")
    record = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": TASK,
        "metrics": dict(metrics),
        "language": LANGUAGE,
        "method": method,
        "seed": seed,
        **fields,
    }
    check_record(record)
    return record


def check_record(record: Mapping[str, Any], source: str = "record") -> None:
    """Raise ValueError unless `record` has CLIP_benchmark's fields with the right types and the three metrics
    (each a number in [0, 1] or null)."""
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"{source}: missing fields {missing}")
    for name in ("dataset", "model", "pretrained", "task", "method"):
        if not isinstance(record[name], str) or not record[name]:
            raise ValueError(f"{source}: {name!r} must be a non-empty string, got {record[name]!r}")
    if record["seed"] is not None and not isinstance(record["seed"], int):
        raise ValueError(f"{source}: 'seed' must be an int or null, got {record['seed']!r}")
    metrics = record["metrics"]
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{source}: 'metrics' must be an object")
    for name in METRIC_KEYS:
        if name not in metrics:
            raise ValueError(f"{source}: metrics has no {name!r}")
    for name, value in metrics.items():
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{source}: metrics.{name}={value!r} is not a fraction in [0, 1] or null")


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    check_record(record, str(path))
    return record


def flatten_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row the way CLIP_benchmark's build step makes it: metrics first, then the top-level fields
    (which win on a clash), without "metrics", plus model_fullname."""
    row: dict[str, Any] = {}
    row.update(record["metrics"])
    row.update(record)
    del row["metrics"]
    row["model_fullname"] = f"{row['model']} {row['pretrained']}"
    return row


# ----------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class ResultRow:
    """One cell of a suite: its metrics when it finished, its error when it failed."""

    dataset: str
    method: str
    seed: int | None
    status: str  # ok | failed | pending
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None
    record: str | None = None

    def value(self, metric: str) -> float | None:
        return self.metrics.get(metric) if self.status == STATUS_OK else None


CSV_FIELDS = ("dataset", "method", "seed", "status", *METRIC_KEYS,
              *(EMA_PREFIX + key for key in METRIC_KEYS), *LABEL_FREE_KEYS, "seconds", "error", "record")


def results_csv(rows: Sequence[ResultRow]) -> str:
    """Every cell, one line each (metrics as fractions, empty where undefined)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line: dict[str, Any] = {"dataset": row.dataset, "method": row.method, "seed": row.seed, "status": row.status,
                                "seconds": None if row.seconds is None else round(row.seconds, 1),
                                "error": row.error, "record": row.record}
        for key in CSV_FIELDS:
            if key in REPORT_KEYS.values() or key.startswith(EMA_PREFIX) or key in LABEL_FREE_KEYS:
                line[key] = row.value(key)
        writer.writerow({k: "" if v is None else v for k, v in line.items()})
    return buffer.getvalue()


@dataclass(frozen=True)
class CellSummary:
    """A (dataset, method) entry of the table: mean and sample std (ddof 1; 0 for one value) over the seeds
    that finished with a defined value, in percent."""

    mean: float | None
    std: float | None
    finished: int
    failed: int
    pending: int

    def text(self) -> str:
        if self.mean is None:
            if self.failed:
                return "failed" if not self.pending else f"failed ({self.failed}), {self.pending} pending"
            return "—" if self.pending or not self.finished else "n/a"
        shown = f"{self.mean:.{DECIMALS}f}" + (f" ± {self.std:.{DECIMALS}f}" if self.finished > 1 else "")
        notes = [f"{self.failed} failed"] * bool(self.failed) + [f"{self.pending} pending"] * bool(self.pending)
        return shown + (f" ({', '.join(notes)})" if notes else "")


def summarize(rows: Sequence[ResultRow], metric: str = "acc1") -> dict[tuple[str, str], CellSummary]:
    """(dataset, method) -> CellSummary of `metric` over its seeds."""
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.method), []).append(row)
    out = {}
    for key, members in groups.items():
        values = [PERCENT * v for v in (row.value(metric) for row in members) if v is not None]
        mean = math.fsum(values) / len(values) if values else None
        std = None
        if values:
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[key] = CellSummary(
            mean=mean,
            std=std,
            finished=sum(row.status == STATUS_OK for row in members),
            failed=sum(row.status == STATUS_FAILED for row in members),
            pending=sum(row.status == STATUS_PENDING for row in members),
        )
    return out


def best_methods(summary: Mapping[tuple[str, str], CellSummary], dataset: str, methods: Sequence[str]) -> set[str]:
    """The methods with the highest mean on `dataset`, compared at the table's precision (ties all win)."""
    shown = {m: round(summary[(dataset, m)].mean, DECIMALS) for m in methods
             if (dataset, m) in summary and summary[(dataset, m)].mean is not None}
    if not shown:
        return set()
    top = max(shown.values())
    return {m for m, value in shown.items() if value == top}


def markdown_table(rows: Sequence[ResultRow], datasets: Sequence[str], methods: Sequence[str],
                   metric: str = "acc1") -> str:
    """Dataset x method: mean ± std over seeds (percent), the best per dataset in bold, failed cells marked."""
    summary = summarize(rows, metric)
    lines = ["| dataset | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for dataset in datasets:
        best = best_methods(summary, dataset, methods)
        cells = []
        for method in methods:
            entry = summary.get((dataset, method))
            text = "—" if entry is None else entry.text()
            cells.append(f"**{text}**" if method in best else text)
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def failure_lines(rows: Sequence[ResultRow], max_chars: int = 300) -> list[str]:
    """One markdown bullet per failed cell: `dataset / method / seed: first line of the error`."""
    lines = []
    for row in rows:
        if row.status == STATUS_FAILED:
            first = (row.error or "").strip().splitlines()[0] if row.error else "unknown error"
            seed = "" if row.seed is None else f" / seed {row.seed}"
            lines.append(f"- {row.dataset} / {row.method}{seed}: {first[:max_chars]}")
    return lines
