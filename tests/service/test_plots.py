"""PNG figures: class names in scripts that matplotlib's default font lacks, layer-curve axes."""

from __future__ import annotations

import warnings
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import font_manager

from service import plots

CJK_NAMES = ["猫", "고양이", "ねこ", "cat"]


def _installed_fallbacks() -> list[str]:
    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [name for name in plots.FALLBACK_FONTS if name in installed]


def test_font_families_start_with_default() -> None:
    families = plots.font_families()
    assert families[0] == "DejaVu Sans"
    assert families[1:] == _installed_fallbacks()


def test_cjk_class_names_have_glyphs() -> None:
    if not _installed_fallbacks():
        pytest.skip(
            "matplotlib knows no CJK font: run tests/install_fonts.sh, and delete matplotlib's "
            "font cache if it was built before the install"
        )
    matrix = np.array([[3, 1, 0, 0], [0, 4, 0, 0], [1, 0, 2, 1], [0, 0, 0, 5]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = plots.confusion_png(matrix, class_names=CJK_NAMES, title="猫 / cat")
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == []
    assert png.startswith(b"\x89PNG")


def test_missing_glyphs_logged_once_per_figure(caplog: pytest.LogCaptureFixture) -> None:
    """Characters no installed font has (Runic here) are replaced before drawing. The figure
    logs one warning naming its title and the characters, and matplotlib warns of nothing."""
    matrix = np.array([[2, 0], [1, 3]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level("WARNING", logger="service.plots"):
            png = plots.confusion_png(matrix, class_names=["ᚠᚢ", "cat"], title="runes")
    assert [w for w in caught if "missing from font" in str(w.message)] == []
    assert png.startswith(b"\x89PNG")
    records = [r for r in caplog.records if r.name == "service.plots"]
    assert len(records) == 1
    assert "'runes'" in records[0].getMessage()
    assert "U+16A0" in records[0].getMessage()  # RUNIC LETTER FEHU
    assert "U+16A2" in records[0].getMessage()


def _curve_row(layer: int, accuracy: float) -> dict[str, float]:
    return {"layer": layer, "test_accuracy": accuracy, "val_accuracy": accuracy}


def _visible_xticks(axes: Any) -> list[float]:
    low, high = sorted(axes.get_xlim())
    return [float(tick) for tick in axes.get_xticks() if low <= tick <= high]


def test_curve_single_layer_integer_tick() -> None:
    figure = plots.layer_curve_figure({"logistic": [_curve_row(2, 0.9)]}, title="one layer")
    figure.canvas.draw()
    axes = figure.axes[0]
    assert _visible_xticks(axes) == [2.0]
    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert [label for label in labels if label] == ["2"]
    plt.close(figure)


@pytest.mark.parametrize(
    ("layers", "expected_ticks"),
    [([1, 3], [1, 3]), ([0, 1, 2, 5], [0, 1, 2, 5]), ([0, 2, 4, 6], [0, 2, 4, 6])],
)
def test_curve_ticks_at_probed_layers(layers: list[int], expected_ticks: list[int]) -> None:
    rows = [_curve_row(layer, 0.5 + 0.05 * layer) for layer in layers]
    figure = plots.layer_curve_figure({"logistic": rows}, title="gaps")
    figure.canvas.draw()
    assert _visible_xticks(figure.axes[0]) == [float(tick) for tick in expected_ticks]
    plt.close(figure)


def test_curve_many_layers_integer_ticks() -> None:
    rows = [_curve_row(layer, 0.5) for layer in range(49)]
    figure = plots.layer_curve_figure({"logistic": rows}, title="deep model")
    figure.canvas.draw()
    ticks = _visible_xticks(figure.axes[0])
    assert 2 <= len(ticks) <= plots.MAX_LAYER_TICKS
    assert all(tick.is_integer() for tick in ticks)
    plt.close(figure)


def _drawn_segments(line: Any) -> list[tuple[float, float]]:
    """Return the (x0, x1) pairs that ``line`` connects, skipping NaN breaks."""
    xs = np.asarray(line.get_xdata(), dtype=float)
    ys = np.asarray(line.get_ydata(), dtype=float)
    finite = np.isfinite(xs) & np.isfinite(ys)
    return [(xs[i], xs[i + 1]) for i in range(len(xs) - 1) if finite[i] and finite[i + 1]]


def test_curve_line_broken_at_unprobed_layers() -> None:
    layers = [1, 3, 4, 5, 8]
    rows = [_curve_row(layer, 0.5 + 0.05 * layer) for layer in layers]
    figure = plots.layer_curve_figure({"logistic": rows}, title="gaps")
    (line,) = [line for line in figure.axes[0].get_lines() if line.get_label() == "logistic (test)"]
    assert line.get_marker() == "o"
    xs = np.asarray(line.get_xdata(), dtype=float)
    assert [int(x) for x in xs[np.isfinite(xs)]] == layers
    assert _drawn_segments(line) == [(3.0, 4.0), (4.0, 5.0)]
    plt.close(figure)


def test_class_labels_mark_repeats_and_empty() -> None:
    assert plots.class_labels(["a", "a", "", "b"]) == ["a #0", "a #1", "#2", "b"]
    assert plots.class_labels(["cat", " ", "dog"]) == ["cat", "#1", "dog"]


def test_class_labels_shorten_long_names() -> None:
    long_name = "x" * 5000
    (label,) = plots.class_labels([long_name])
    assert len(label) == plots.MAX_CLASS_LABEL_CHARS
    assert label.endswith("…")
    assert label.startswith("x" * (plots.MAX_CLASS_LABEL_CHARS - 1))


def test_class_labels_repeat_after_shortening() -> None:
    """Names that differ only after the cut get their class index appended too."""
    prefix = "y" * plots.MAX_CLASS_LABEL_CHARS
    labels = plots.class_labels([prefix + "1", prefix + "2"])
    assert labels[0] != labels[1]
    assert labels[0].endswith("#0")
    assert labels[1].endswith("#1")
    assert all(len(label) <= plots.MAX_CLASS_LABEL_CHARS + len(" #1") for label in labels)


def test_confusion_rows_distinguishable() -> None:
    matrix = np.array([[2, 0, 0], [1, 3, 0], [0, 0, 4]])
    figure = plots.confusion_figure(matrix, class_names=["a", "a", ""], title="repeats")
    figure.canvas.draw()
    axes = figure.axes[0]
    rows = [label.get_text() for label in axes.get_yticklabels()]
    columns = [label.get_text() for label in axes.get_xticklabels()]
    assert rows == ["a #0", "a #1", "#2"]
    assert columns == rows
    plt.close(figure)


def test_scatter_legend_shortens_long_name() -> None:
    coords = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    labels = np.array([0, 1, 1])
    long_name = "z" * 5000
    figure = plots.scatter_figure(
        coords, labels, class_names=[long_name, "b"], title="long", axis_label="PCA"
    )
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    shortened = "z" * (plots.MAX_CLASS_LABEL_CHARS - 1) + "…"
    assert legend == [f"{shortened} (1)", "b (2)"]
    plt.close(figure)


def _overlapping(boxes: list[Any]) -> list[tuple[int, int]]:
    return [
        (i, j)
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if boxes[i].overlaps(boxes[j])
    ]


@pytest.mark.parametrize("n_classes", [3, 10, 40])
def test_confusion_labels_readable_inside_figure(n_classes: int) -> None:
    """Long class names (cut to 30 characters) neither overlap nor leave the PNG's area."""
    names = [f"class {index} with a rather long descriptive name" for index in range(n_classes)]
    matrix = np.arange(n_classes * n_classes).reshape(n_classes, n_classes)
    figure = plots.confusion_figure(matrix, class_names=names, title="long names\nsecond line")
    # figure_png closes the figure, which detaches its Agg canvas, so the canvas is kept here.
    canvas = figure.canvas
    png = plots.figure_png(figure)
    assert png.startswith(b"\x89PNG")
    renderer = canvas.get_renderer()
    area = figure.bbox
    axes = figure.axes[0]
    xlabels = [label for label in axes.get_xticklabels() if label.get_text()]
    ylabels = [label for label in axes.get_yticklabels() if label.get_text()]
    assert len(xlabels) == n_classes
    assert len(ylabels) == n_classes
    for labels in (xlabels, ylabels):
        boxes = [label.get_window_extent(renderer) for label in labels]
        assert _overlapping(boxes) == []
    texts = [*xlabels, *ylabels, axes.xaxis.label, axes.yaxis.label, axes.title]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= area.x0, text.get_text()
        assert box.y0 >= area.y0, text.get_text()
        assert box.x1 <= area.x1, text.get_text()
        assert box.y1 <= area.y1, text.get_text()
