"""Every plot writes a real, non-blank PNG without touching pyplot's global state."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zeroshot_adapt.pseudo_labels import threshold_sweep
from zeroshot_adapt.reports import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 5.0  # not a blank canvas
    assert (pixels < 128).mean() > 0.002  # something dark was drawn (bars, lines, text)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def _pyplot_figures() -> list[int] | None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    return None if pyplot is None else list(pyplot.get_fignums())


@pytest.fixture(autouse=True)
def no_global_figure_state():
    before = _pyplot_figures()
    yield
    assert _pyplot_figures() == before  # pyplot neither imported by plots nor left with open figures


def _sweep(num_classes: int, with_labels: bool = True, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    num_samples = 20 * num_classes
    labels = rng.integers(0, num_classes, num_samples)
    prediction = np.where(rng.random(num_samples) < 0.7, labels, rng.integers(0, num_classes, num_samples))
    confidence = rng.beta(5, 2, num_samples)
    return threshold_sweep(confidence, prediction, labels if with_labels else None, num_classes)


def test_predictions_per_class(tmp_path):
    counts = np.array([148, 16, 40, 0, 90, 75, 60, 33, 120, 174])
    path = plots.plot_predictions_per_class(counts, [str(i) for i in range(10)], tmp_path / "a" / "counts.png", "t")
    assert path == tmp_path / "a" / "counts.png"
    _assert_real_png(path)
    _assert_real_png(plots.plot_predictions_per_class(counts, None, tmp_path / "log.png", log_scale=True))


def test_predictions_per_class_1000_classes(tmp_path):
    counts = np.random.default_rng(0).zipf(1.6, 1000).clip(max=5000)
    counts[:70] = 0  # empty classes on a log scale
    names = [f"class {i}" for i in range(1000)]
    _assert_real_png(plots.plot_predictions_per_class(counts, names, tmp_path / "in1k.png", log_scale=True))


def test_threshold_sweep_plot(tmp_path):
    _assert_real_png(plots.plot_threshold_sweep(_sweep(10), tmp_path / "sweep.png"))
    _assert_real_png(plots.plot_threshold_sweep(_sweep(10, with_labels=False), tmp_path / "nolabel.png"))
    _assert_real_png(plots.plot_threshold_sweep(_sweep(1000), tmp_path / "sweep1000.png"))


def test_pseudo_label_distribution(tmp_path):
    rng = np.random.default_rng(0)
    history = [(epoch, rng.integers(0, 100 // (epoch + 1) + 5, 10)) for epoch in range(4)]
    history[-1][1][3] = 0  # a starved class
    _assert_real_png(plots.plot_pseudo_label_distribution(history, tmp_path / "dist.png", list("abcdefghij")))
    long_history = [(epoch, rng.integers(0, 50, 1000)) for epoch in range(30)]
    _assert_real_png(plots.plot_pseudo_label_distribution(long_history, tmp_path / "dist1000.png"))
    with pytest.raises(ValueError, match="same length"):
        plots.plot_pseudo_label_distribution([(0, [1, 2]), (1, [1, 2, 3])], tmp_path / "bad.png")


def test_confusion(tmp_path):
    confusion = np.array([[5, 1, 0], [0, 6, 0], [4, 0, 2]])
    _assert_real_png(plots.plot_confusion(confusion, ["a", "b", "c"], tmp_path / "conf.png"))
    _assert_real_png(plots.plot_confusion(confusion, None, tmp_path / "counts.png", normalize=False))
    big = np.random.default_rng(0).integers(0, 3, (1000, 1000)) + 40 * np.eye(1000, dtype=int)
    _assert_real_png(plots.plot_confusion(big, None, tmp_path / "conf1000.png"))


def test_accuracy_bars(tmp_path):
    table = {
        "EuroSAT": {"CLIP zero-shot": 40.81, "DebiasPL student": 69.8},
        "MNIST": {"CLIP zero-shot": 57.55, "DebiasPL student": 83.7, "FixMatch student": None},
        "CIFAR-10": {"CLIP zero-shot": 71.57},
    }
    _assert_real_png(plots.plot_accuracy_bars(table, tmp_path / "bars.png"))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_accuracy_bars({}, tmp_path / "none.png")


@pytest.mark.parametrize("count", [3, 10, 11, 20])
def test_series_colors_stay_distinct_up_to_twenty(count):
    """A suite of 11 methods (zeroshot + 5 algorithms + 5 training-free) once drew its 11th bar in the 1st color."""
    colors = plots._category_colors(count)
    assert len(colors) == count and len(set(colors)) == count
