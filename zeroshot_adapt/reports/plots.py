"""Figures for reports: pseudo-label imbalance, the tau_clip sweep, confusion, benchmark bars.

Headless and free of global state: each function builds its own ``matplotlib.figure.Figure`` on an Agg
canvas (``pyplot`` is never imported, so no figure is left open and no backend is switched), writes a
PNG atomically (temp file + os.replace, parent folders created) and returns its path.

Inputs are plain lists/arrays/tensors or the dicts made by :mod:`zeroshot_adapt.pseudo_labels`.
With many classes (ImageNet's 1000) per-class tick labels are dropped and bars become a filled step
curve, which stays fast and readable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from zeroshot_adapt.fileio import atomic_write
from zeroshot_adapt.pseudo_labels import class_name_list
from zeroshot_adapt.reports.metrics import as_numpy

MAX_TICK_LABELS = 40  # above this many classes, per-class tick labels are dropped
MAX_BARS = 200  # above this many classes, bars are drawn as one filled step curve
MAX_EPOCH_TICKS = 12  # at most this many epochs get a legend entry or a heatmap tick label
MAX_CELL_ANNOTATIONS = 12  # confusion matrices up to this size get a number in each cell
DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png")
    return Path(path)


def _as_counts(counts: Any, name: str = "counts") -> np.ndarray:
    values = as_numpy(counts).astype(np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array [C]; got shape {tuple(values.shape)}")
    return values


def _as_rates(values: Sequence[float | None] | None, length: int) -> np.ndarray:
    """Floats with None -> NaN (matplotlib leaves gaps there); all NaN when values is None."""
    if values is None:
        return np.full(length, np.nan)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _colors(count: int) -> list[Any]:
    """``count`` colors spread along viridis, for ordered series (early/low = dark, late/high = light)."""
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, count)]


def _category_colors(count: int) -> list[Any]:
    """``count`` colors for unordered series: tab10 up to 10, tab20 up to 20 (distinct), tab20 cycling beyond."""
    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["tab20"](i % 20) for i in range(count)]


def _bars(ax: Any, values: np.ndarray, **style: Any) -> None:
    positions = np.arange(len(values))
    if len(values) > MAX_BARS:
        ax.fill_between(positions, values, step="mid", alpha=0.8, **style)
    else:
        ax.bar(positions, values, width=0.85, **style)


NO_COUNTS_TEXT = "no data to plot: every class count is 0"
NO_PSEUDO_LABELS_TEXT = "no data to plot: no pseudo-label passed\nthe confidence threshold in any epoch"


def plot_predictions_per_class(
    counts: Any,
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    title: str = "Predictions per class",
    *,
    log_scale: bool = False,
) -> Path:
    """Bar chart of per-class counts sorted descending (the imbalance picture of DebiasPL Fig. 4).

    counts: [C] predictions (or kept pseudo-labels) per class. A dashed line marks the balanced
    count (total / C). ``log_scale`` uses a symmetric-log y axis (linear below 1, so empty classes show
    as 0). Class names label the ticks up to MAX_TICK_LABELS classes; beyond, the x axis is the rank.
    """
    values = _as_counts(counts)
    names = class_name_list(class_names, len(values))
    order = np.argsort(-values, kind="stable")
    sorted_values = values[order]

    figure = _new_figure(max(6.0, min(14.0, 0.3 * len(values))), 4.0)
    ax = figure.add_subplot()
    _bars(ax, sorted_values, color="tab:blue")
    ax.axhline(values.sum() / len(values), color="tab:red", linestyle="--", linewidth=1, label="balanced")
    if log_scale:
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0.0)  # counts are never negative; symlog would show an empty mirror half
    if len(values) <= MAX_TICK_LABELS:
        ax.set_xticks(np.arange(len(values)), [names[c] for c in order], rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("class (sorted by count)")
    else:
        ax.set_xlabel(f"class rank by count ({len(values)} classes)")
    ax.set_xlim(-0.6, len(values) - 0.4)
    empty = int((values == 0).sum())
    if values.sum() == 0:
        ax.text(0.5, 0.5, NO_COUNTS_TEXT, transform=ax.transAxes, ha="center", va="center", fontsize=11)
    ax.set_ylabel("count")
    ax.set_title(f"{title}  (empty classes: {empty})" if empty else title)
    ax.legend(loc="upper right")
    return _save(figure, path)


def plot_threshold_sweep(sweep: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Three panels (count / precision / recall per class ranked by count), one line per threshold.

    ``sweep`` is the output of :func:`zeroshot_adapt.pseudo_labels.threshold_sweep` (DebiasPL Fig. 11).
    Without labels the precision and recall panels say so instead of plotting.
    """
    if not sweep:
        raise ValueError("sweep is empty")
    figure = _new_figure(15.0, 4.2)
    axes = figure.subplots(1, 3)
    colors = _colors(len(sweep))
    panels = (("ranked_counts", "count"), ("ranked_precision", "precision"), ("ranked_recall", "recall"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        plotted = False
        for entry, color in zip(sweep, colors, strict=True):
            counts = entry["ranked_counts"]
            if entry.get(key) is None:
                continue
            values = _as_rates(entry[key], len(counts))
            legend = f"τ={entry['threshold']:g} ({entry['kept']})" if key == "ranked_counts" else None
            ax.plot(np.arange(len(values)), values, color=color, linewidth=1.2, label=legend)
            plotted = True
        ax.set_xlabel("class rank by kept count")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per class")
        if key != "ranked_counts":
            ax.set_ylim(-0.02, 1.02)
        if not plotted:
            ax.text(0.5, 0.5, "no labels", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    axes[0].legend(title="threshold (kept)", fontsize=8)
    figure.suptitle("CLIP confidence threshold sweep")
    return _save(figure, path)


def plot_pseudo_label_distribution(
    history: Sequence[tuple[float, Any]],
    path: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
    title: str = "Pseudo-label class distribution during training",
) -> Path:
    """How the pseudo-label class distribution evolves over training (DebiasPL Fig. 2).

    history: ``[(epoch, counts[C]), ...]`` in training order. Left: each epoch's counts sorted descending
    (a flatter line = more balanced), colored early (dark) to late (light). Right: a heatmap of each
    class's share of the epoch's pseudo-labels, classes ordered by the last epoch's count, so a class
    that starves shows up as a dark column.
    """
    if len(history) == 0:
        raise ValueError("history is empty; give [(epoch, counts), ...]")
    epochs = [float(epoch) for epoch, _ in history]
    rows = [_as_counts(row, name=f"counts of epoch {epoch:g}") for epoch, row in history]
    if len({len(row) for row in rows}) != 1:
        raise ValueError("every epoch's counts must have the same length (the number of classes)")
    counts = np.stack(rows)
    num_classes = counts.shape[1]
    names = class_name_list(class_names, num_classes)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    figure = _new_figure(13.0, 4.5)
    left, right = figure.subplots(1, 2)
    for epoch, row, color in zip(epochs, counts, _colors(len(epochs)), strict=True):
        left.plot(np.arange(num_classes), np.sort(row)[::-1], color=color, linewidth=1.2, label=f"{epoch:g}")
    left.set_xlabel("class rank by count")
    left.set_ylabel("pseudo-labels")
    left.set_title("sorted counts per epoch")
    if len(epochs) <= MAX_EPOCH_TICKS:
        left.legend(title="epoch", fontsize=8)

    order = np.argsort(-counts[-1], kind="stable")
    image = right.imshow(shares[:, order], aspect="auto", interpolation="nearest", cmap="magma")
    figure.colorbar(image, ax=right, label="share of the epoch's pseudo-labels")
    rows_labeled = np.unique(np.linspace(0, len(epochs) - 1, min(len(epochs), MAX_EPOCH_TICKS)).round()).astype(int)
    right.set_yticks(rows_labeled, [f"{epochs[r]:g}" for r in rows_labeled])
    right.set_ylabel("epoch")
    if num_classes <= MAX_TICK_LABELS:
        right.set_xticks(np.arange(num_classes), [names[c] for c in order], rotation=60, ha="right", fontsize=8)
        right.set_xlabel("class (ordered by last epoch's count)")
    else:
        right.set_xlabel("class rank by last epoch's count")
    right.set_title("per-class share")
    if counts.sum() == 0:
        for ax in (left, right):
            ax.text(0.5, 0.5, NO_PSEUDO_LABELS_TEXT, transform=ax.transAxes, ha="center", va="center", fontsize=10,
                    color="black", backgroundcolor="white")
    figure.suptitle(title)
    return _save(figure, path)


def plot_confusion(
    confusion: Any,
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    title: str = "Confusion (rows: true class, normalized)",
    *,
    normalize: bool = True,
) -> Path:
    """Heatmap of ``confusion[true][predicted]``; rows normalized to recall by default.

    Class names label the axes up to MAX_TICK_LABELS classes; matrices up to MAX_CELL_ANNOTATIONS
    classes also print each cell's value.
    """
    matrix = as_numpy(confusion).astype(np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
        raise ValueError(f"confusion must be a non-empty square [C, C] matrix; got shape {matrix.shape}")
    num_classes = matrix.shape[0]
    names = class_name_list(class_names, num_classes)
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)

    size = float(np.clip(0.35 * num_classes + 2.5, 5.0, 12.0))
    figure = _new_figure(size + 1.0, size)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, interpolation="nearest", cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    figure.colorbar(image, ax=ax, label="fraction of the true class" if normalize else "count")
    if num_classes <= MAX_TICK_LABELS:
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(ticks, names, fontsize=8)
    if num_classes <= MAX_CELL_ANNOTATIONS:
        threshold = 0.5 * (matrix.max() if matrix.max() > 0 else 1.0)
        for (row, col), value in np.ndenumerate(matrix):
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            ax.text(
                col,
                row,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > threshold else "black",
            )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _save(figure, path)


def plot_accuracy_bars(
    table: Mapping[str, Mapping[str, float | None]],
    path: str | os.PathLike[str],
    title: str = "Top-1 accuracy",
    ylabel: str = "top-1 accuracy (%)",
    *,
    errors: Mapping[str, Mapping[str, float | None]] | None = None,
) -> Path:
    """Grouped bars: one group per dataset, one bar per method (e.g. CLIP zero-shot vs student; the
    DebiasPL paper's Figure 9 when the methods are zero-shot and the adapted students).

    table: ``{dataset: {method: accuracy}}`` in any unit (say which with ``ylabel``). Methods are
    ordered by first appearance; a method missing (or None) for a dataset leaves a gap. Each bar is
    labeled with its value. errors: the same shape (e.g. the std over seeds), drawn as error bars.
    """
    if not table:
        raise ValueError("table is empty; give {dataset: {method: accuracy}}")
    datasets = list(table)
    methods: list[str] = []
    for scores in table.values():
        methods.extend(m for m in scores if m not in methods)
    if not methods:
        raise ValueError("table has no methods")

    width = 0.8 / len(methods)
    figure = _new_figure(max(6.0, 1.2 + len(datasets) * (0.4 + 0.45 * len(methods))), 4.5)
    ax = figure.add_subplot()
    positions = np.arange(len(datasets))
    for index, (method, color) in enumerate(zip(methods, _category_colors(len(methods)), strict=True)):
        values = np.array([np.nan if table[d].get(method) is None else float(table[d][method]) for d in datasets])
        offsets = positions + (index - (len(methods) - 1) / 2) * width
        spread = None
        if errors is not None:
            spread = np.array([np.nan if (errors.get(d) or {}).get(method) is None else float(errors[d][method])
                               for d in datasets])
            spread = np.where(np.isnan(values), np.nan, spread)
        bars = ax.bar(offsets, np.nan_to_num(values), width=width * 0.95, color=color, label=method,
                      yerr=None if spread is None or np.isnan(spread).all() else np.nan_to_num(spread),
                      capsize=2 if spread is not None else 0)
        for bar, value in zip(bars, values, strict=True):
            if np.isnan(value):
                bar.set_visible(False)
                continue
            ax.annotate(
                f"{value:.1f}",
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(positions, datasets, rotation=20 if len(datasets) > 4 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.12)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_class_count_comparison(
    series: Mapping[str, Any],
    class_names: Sequence[str] | None,
    path: str | os.PathLike[str],
    title: str = "Predictions per class",
) -> Path:
    """Per-class counts of several predictors side by side (e.g. CLIP zero-shot vs a transduction method).

    series: ``{name: counts [C]}``, all of one length; classes are sorted by the first series' count,
    descending, so a flatter second curve means a more balanced predictor. A dashed line marks the
    balanced count. Grouped bars up to MAX_BARS classes, step curves above; names label the ticks up
    to MAX_TICK_LABELS classes.
    """
    if not series:
        raise ValueError("series is empty; give {name: counts}")
    rows = {name: _as_counts(counts, name=f"counts of {name!r}") for name, counts in series.items()}
    lengths = {len(values) for values in rows.values()}
    if len(lengths) != 1:
        raise ValueError("every series must have one count per class (the same length)")
    num_classes = lengths.pop()
    names = class_name_list(class_names, num_classes)
    order = np.argsort(-next(iter(rows.values())), kind="stable")

    figure = _new_figure(max(6.0, min(14.0, 0.35 * num_classes * max(1, len(rows) / 2))), 4.0)
    ax = figure.add_subplot()
    positions = np.arange(num_classes)
    width = 0.85 / len(rows)
    for index, ((name, values), color) in enumerate(zip(rows.items(), _category_colors(len(rows)), strict=True)):
        if num_classes > MAX_BARS:
            ax.step(positions, values[order], where="mid", color=color, linewidth=1.2, label=name)
        else:
            ax.bar(positions + (index - (len(rows) - 1) / 2) * width, values[order], width=width, color=color,
                   label=name)
    total = next(iter(rows.values())).sum()
    ax.axhline(total / num_classes, color="black", linestyle="--", linewidth=1, label="balanced")
    if num_classes <= MAX_TICK_LABELS:
        ax.set_xticks(positions, [names[c] for c in order], rotation=60, ha="right", fontsize=8)
        ax.set_xlabel(f"class (sorted by {next(iter(rows))} count)")
    else:
        ax.set_xlabel(f"class rank by {next(iter(rows))} count ({num_classes} classes)")
    ax.set_xlim(-0.6, num_classes - 0.4)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_centroid_similarity(
    record: Mapping[str, Any],
    path: str | os.PathLike[str],
    title: str = "Class-centroid similarity (DebiasPL Fig. 5)",
) -> Path:
    """Cosine similarity of each class centroid to its nearest other centroids, by neighbour rank.

    record: :func:`zeroshot_adapt.transduct.centroids.centroid_neighbours` output. One thin line per
    class (blue: most predicted, red: least predicted), thick lines for each group's mean; higher
    curves mean a class whose images sit close to other classes (easy to confuse).
    """
    figure = _new_figure(7.0, 4.5)
    ax = figure.add_subplot()
    groups = (("most_predicted", "tab:blue", "most predicted"), ("least_predicted", "tab:red", "least predicted"))
    plotted = False
    for key, color, label in groups:
        curves = [entry["similarities"] for entry in record.get(key, []) if entry["similarities"]]
        for curve in curves:
            ax.plot(np.arange(1, len(curve) + 1), curve, color=color, alpha=0.3, linewidth=0.8)
        if curves:
            width = min(len(c) for c in curves)
            mean = np.mean([c[:width] for c in curves], axis=0)
            ax.plot(np.arange(1, width + 1), mean, color=color, linewidth=2.5,
                    label=f"{label} ({len(curves)} classes), mean {float(np.mean(mean)):.3f}")
            plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "fewer than 2 classes with samples", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("neighbour rank (nearest other class centroid first)")
    ax.set_ylabel("cosine similarity of centroids")
    ax.set_title(f"{title} (classes by {record.get('grouping', 'label')})")
    return _save(figure, path)
def plot_prediction_counts_by_method(
    counts: Mapping[str, Any],
    path: str | os.PathLike[str],
    title: str = "Predictions per class",
) -> Path:
    """Each method's predictions per class, sorted descending, one line per method (the imbalance picture of
    DebiasPL Fig. 1 / 4 for several methods on one dataset: a flatter line is a more balanced prediction).

    counts: ``{method: counts [C]}``, every vector the same length C (e.g. CLIP zero-shot vs each adapted
    student on one test split). A dashed line marks the balanced count (total / C of the first method).
    """
    if not counts:
        raise ValueError("counts is empty; give {method: counts}")
    vectors = {method: _as_counts(row, name=f"counts of {method}") for method, row in counts.items()}
    if len({len(row) for row in vectors.values()}) != 1:
        raise ValueError("every method's counts must have the same length (the number of classes)")
    num_classes = len(next(iter(vectors.values())))
    figure = _new_figure(7.0, 4.2)
    ax = figure.add_subplot()
    for (method, row), color in zip(vectors.items(), _category_colors(len(vectors)), strict=True):
        empty = int((row == 0).sum())
        label = f"{method} (empty: {empty})" if empty else method
        ax.step(np.arange(num_classes), np.sort(row)[::-1], where="mid", color=color, linewidth=1.4, label=label)
    first = next(iter(vectors.values()))
    ax.axhline(first.sum() / num_classes, color="black", linestyle="--", linewidth=1, label="balanced")
    ax.set_xlabel(f"class rank by count ({num_classes} classes)")
    ax.set_ylabel("predictions")
    ax.set_ylim(bottom=0.0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(figure, path)
