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
