"""PNG figures drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import functools
import io
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager, ft2font  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

logger = logging.getLogger(__name__)

# Fonts matplotlib falls back to, in this order, for characters DejaVu Sans lacks (Chinese,
# Japanese and Korean class names). Only installed ones are listed, because matplotlib logs a
# "not found" warning for a missing family each time it looks one up. The Docker image installs
# the first.
FALLBACK_FONTS = (
    "WenQuanYi Micro Hei",
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK KR",
    "Droid Sans Fallback",
)


def font_families() -> list[str]:
    """Return DejaVu Sans followed by the installed fonts of `FALLBACK_FONTS`."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]


plt.rcParams["font.family"] = font_families()


def layer_curve_figure(
    rows_by_kind: dict[str, list[dict[str, Any]]],
    *,
    title: str,
    baseline: float | None = None,
    baseline_label: str = "raw pixels",
    reference: list[tuple[int, float]] | None = None,
    reference_label: str = "reference",
) -> Figure:
    """Plot test accuracy per layer for each probe kind, best layer (by validation) marked.

    ``reference`` contains (layer, accuracy in [0, 1]) points from elsewhere, e.g. a published
    result, drawn as stars for comparison.
    """
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    probed_layers: set[int] = set()
    for kind, rows in rows_by_kind.items():
        rows = sorted(rows, key=lambda r: r["layer"])
        probed_layers.update(r["layer"] for r in rows)
        layers, accuracy = _break_at_gaps(
            [r["layer"] for r in rows], [100 * r["test_accuracy"] for r in rows]
        )
        (line,) = axes.plot(layers, accuracy, marker="o", label=f"{kind} (test)")
        best = max(rows, key=lambda r: r["val_accuracy"])
        axes.scatter(
            [best["layer"]],
            [100 * best["test_accuracy"]],
            s=160,
            facecolors="none",
            edgecolors=line.get_color(),
            linewidths=2,
            zorder=3,
        )
        axes.annotate(
            f"best by val: layer {best['layer']}\n{100 * best['test_accuracy']:.1f}%",
            (best["layer"], 100 * best["test_accuracy"]),
            textcoords="offset points",
            xytext=(8, -28),
            fontsize=8,
            color=line.get_color(),
        )
    if baseline is not None:
        axes.axhline(
            100 * baseline,
            color="grey",
            linestyle="--",
            label=f"{baseline_label} {100 * baseline:.1f}%",
        )
    if reference:
        axes.scatter(
            [layer for layer, _ in reference],
            [100 * acc for _, acc in reference],
            marker="*",
            s=140,
            color="black",
            zorder=4,
            label=reference_label,
        )
        for layer, acc in reference:
            axes.annotate(
                f"{100 * acc:.1f}%",
                (layer, 100 * acc),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
    _set_layer_ticks(axes, probed_layers | {layer for layer, _ in reference or []})
    axes.set_xlabel("layer (hidden-state index; 0 = embeddings)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return figure


def _break_at_gaps(layers: list[int], values: list[float]) -> tuple[list[float], list[float]]:
    """Insert a NaN point between non-adjacent layers, so that the line is broken there.

    A line from layer 1 to layer 3 would suggest a value at layer 2, which was not probed.
    matplotlib draws no segment to a NaN point, and the markers stay at the probed layers.
    """
    xs: list[float] = []
    ys: list[float] = []
    for index, (layer, value) in enumerate(zip(layers, values, strict=True)):
        if index > 0 and layer - layers[index - 1] > 1:
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs.append(layer)
        ys.append(value)
    return xs, ys


# Above this many layers the curve gets integer ticks chosen by matplotlib instead of one tick
# per layer, because the labels would overlap.
MAX_LAYER_TICKS = 25


def _set_layer_ticks(axes: Any, layers: set[int]) -> None:
    """Put x ticks at ``layers`` (integer positions), or at evenly spaced integers if many."""
    if not layers:
        return
    low, high = min(layers), max(layers)
    # Half a layer of margin on each side, because one layer alone would otherwise get a view
    # of +-0.1 around it and fractional ticks.
    axes.set_xlim(low - 0.5, high + 0.5)
    if len(layers) <= MAX_LAYER_TICKS:
        axes.set_xticks(sorted(layers))
    else:
        axes.xaxis.set_major_locator(
            MaxNLocator(nbins=MAX_LAYER_TICKS - 1, integer=True, min_n_ticks=1)
        )


def figure_png(figure: Any) -> bytes:
    """Return ``figure`` as PNG bytes and close it.

    Characters that no font of `font_families` has are replaced by U+FFFD before drawing, and
    one log line names them with the figure's title. matplotlib would otherwise draw boxes
    and warn once per character, and catching its warnings would change the process-wide
    warning filters, which other threads of the API change too.
    """
    title = figure.axes[0].get_title() if figure.axes else ""
    missing: set[str] = set()
    # Tick labels are made when the figure is drawn, so they are set again from their texts.
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            labels = [label.get_text() for label in axis.get_ticklabels()]
            drawn = [_displayable(label, missing) for label in labels]
            if drawn != labels:
                axis.set_ticklabels(drawn)
    for text in figure.findobj(Text):
        content = text.get_text()
        drawn_text = _displayable(content, missing)
        if drawn_text != content:
            text.set_text(drawn_text)
    if missing:
        names = ", ".join(f"U+{ord(char):04X}" for char in sorted(missing))
        logger.warning(
            "figure %r: %d characters have no glyph in the installed fonts and are drawn as %s: %s",
            title,
            len(missing),
            REPLACEMENT,
            names,
        )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


# Drawn in place of a character that no installed font has (DejaVu Sans has this one).
REPLACEMENT = "\ufffd"


def _displayable(text: str, missing: set[str]) -> str:
    """Return ``text`` with each character no font has replaced, adding those to ``missing``."""
    lacking = {char for char in text if not _has_glyph(char)}
    missing |= lacking
    return "".join(REPLACEMENT if char in lacking else char for char in text)


@functools.lru_cache(maxsize=4096)
def _has_glyph(char: str) -> bool:
    """Return whether a font of `font_families` has a glyph for ``char``."""
    if char in "\n\t ":
        return True
    return any(font.get_char_index(ord(char)) != 0 for font in _fonts())


@functools.lru_cache(maxsize=1)
def _fonts() -> list[Any]:
    """Return the font files of `font_families`, opened for glyph lookups."""
    fonts = []
    for family in font_families():
        path = font_manager.findfont(
            font_manager.FontProperties(family=family), fallback_to_default=False
        )
        fonts.append(ft2font.FT2Font(path))
    return fonts


# Maximum length of a drawn class label, in characters, ellipsis included. A longer name is
# cut, because a name of thousands of characters would push the plot out of the figure.
MAX_CLASS_LABEL_CHARS = 30


def class_labels(class_names: list[str]) -> list[str]:
    """Turn class names into labels that a plot can show and a reader can tell apart.

    Runs of whitespace become one space, and a name longer than `MAX_CLASS_LABEL_CHARS` is cut
    to that length with a trailing ellipsis. A label that is empty, or that two classes share
    (also after the cut), gets the class index appended: ["a", "a", ""] gives
    ["a #0", "a #1", "#2"].
    """
    shortened = [_shorten(" ".join(name.split())) for name in class_names]
    counts = Counter(shortened)
    labels = []
    for index, label in enumerate(shortened):
        if not label:
            labels.append(f"#{index}")
        elif counts[label] > 1:
            labels.append(f"{label} #{index}")
        else:
            labels.append(label)
    return labels


def _shorten(name: str) -> str:
    if len(name) <= MAX_CLASS_LABEL_CHARS:
        return name
    return name[: MAX_CLASS_LABEL_CHARS - 1] + "\u2026"


def scatter_figure(
    coords: np.ndarray, labels: np.ndarray, *, class_names: list[str], title: str, axis_label: str
) -> Figure:
    """Plot 2-D points coloured by class with a legend of class names (see `class_labels`).

    Parameters
    ----------
    coords
        Array of shape (n_points, 2).
    labels
        Integer array of shape (n_points,); label ``i`` is named ``class_names[i]`` when the
        list is long enough, else by its number.
    axis_label
        Prefix of the axis labels, e.g. "t-SNE" gives "t-SNE 1" and "t-SNE 2".
    """
    figure, axes = plt.subplots(figsize=(7, 6), dpi=110)
    classes = np.unique(labels)
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    names = class_labels(class_names)
    for index, label in enumerate(classes):
        members = labels == label
        name = names[label] if 0 <= label < len(names) else str(label)
        axes.scatter(
            coords[members, 0],
            coords[members, 1],
            s=10,
            alpha=0.8,
            color=colours(index % colours.N),
            label=f"{name} ({int(members.sum())})",
        )
    axes.set_xlabel(f"{axis_label} 1")
    axes.set_ylabel(f"{axis_label} 2")
    axes.set_title(title)
    axes.legend(
        title="class (points)",
        fontsize=8,
        markerscale=2,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
    )
    return figure


def confusion_png(matrix: np.ndarray, *, class_names: list[str], title: str) -> bytes:
    """Draw `confusion_figure` as PNG bytes."""
    return figure_png(confusion_figure(matrix, class_names=class_names, title=title))


def confusion_figure(matrix: np.ndarray, *, class_names: list[str], title: str) -> Figure:
    """Plot a confusion matrix, rows = true class, columns = predicted class.

    Cells are coloured by the fraction of their row (the recall of each class) and annotated
    with counts; ``matrix`` has shape (n_classes, n_classes). Classes without a name in
    ``class_names`` are named by their index, and the names are made into `class_labels`.
    """
    n = len(matrix)
    names = class_labels([class_names[i] if i < len(class_names) else str(i) for i in range(n)])
    totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = min(12.0, 3.0 + 0.5 * n)
    figure, axes = plt.subplots(figsize=(size + 1.2, size), dpi=110)
    layout = _class_label_layout(figure, names, matrix_inches=size)
    # Room for the labels: the y labels' width on the left, the x labels' height below.
    figure.set_size_inches(size + 1.2 + layout.width_inches, size + layout.height_inches)
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 30:
        for row in range(n):
            for column in range(n):
                colour = "white" if fractions[row, column] > 0.6 else "black"
                axes.text(
                    column,
                    row,
                    str(int(matrix[row, column])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color=colour,
                )
    axes.set_xticks(range(n), names, rotation=layout.x_rotation, fontsize=layout.font_size)
    axes.set_yticks(range(n), names, fontsize=layout.font_size)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    return figure


@dataclass(frozen=True)
class ClassLabelLayout:
    """Font size and x rotation of a confusion matrix's class labels, and the room they take."""

    font_size: float
    x_rotation: int
    width_inches: float
    height_inches: float


def _class_label_layout(
    figure: Figure, names: list[str], *, matrix_inches: float
) -> ClassLabelLayout:
    """Choose the size and x rotation of ``names`` on a matrix about ``matrix_inches`` wide.

    The font shrinks with the cells, from 10 points down to 4, so that the labels of
    neighbouring cells do not overlap. NOTE: at the 4-point floor they overlap again, which
    starts between 130 and 200 classes. The x labels stand vertically when the longest would
    not fit in its cell's width. Label widths are measured with the figure's renderer.
    """
    # An estimate: the axes take about 70% of the matrix size after the title, the colour
    # bar and the margins.
    cell_inches = 0.7 * matrix_inches / max(len(names), 1)
    font_size = min(10.0, max(4.0, 0.6 * cell_inches * 72))
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    font = font_manager.FontProperties(size=font_size)
    widths = []
    for name in names:
        # Measured as figure_png draws it, because measuring a character that no font has
        # would make matplotlib warn.
        drawn = _displayable(name, set())
        widths.append(renderer.get_text_width_height_descent(drawn, font, ismath=False)[0])
    longest_inches = max(widths, default=0.0) / figure.dpi
    line_inches = 1.3 * font_size / 72
    if longest_inches <= 0.8 * cell_inches:
        return ClassLabelLayout(font_size, 0, longest_inches, line_inches)
    return ClassLabelLayout(font_size, 90, longest_inches, longest_inches)


def accuracy_vs_loss_png(points: list[dict[str, Any]], *, title: str) -> bytes:
    """Draw probe test accuracy against validation bits per token, one point per checkpoint.

    Each point needs ``val_bits_per_token``, ``test_accuracy`` and ``step``; optional
    ``test_accuracy_ci95`` ([lo, hi]) gives an error bar.
    """
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    points = sorted(points, key=lambda p: p["step"])
    loss = [p["val_bits_per_token"] for p in points]
    accuracy = [100 * p["test_accuracy"] for p in points]
    errors = None
    if all(p.get("test_accuracy_ci95") for p in points):
        errors = np.array(
            [
                [
                    100 * (p["test_accuracy"] - p["test_accuracy_ci95"][0]),
                    100 * (p["test_accuracy_ci95"][1] - p["test_accuracy"]),
                ]
                for p in points
            ]
        ).T  # (2, n_points)
    axes.errorbar(
        loss,
        accuracy,
        yerr=errors,
        marker="o",
        capsize=3,
        linestyle="-",
        label="checkpoints in training order",
    )
    for point, x, y in zip(points, loss, accuracy, strict=True):
        axes.annotate(
            f"step {point['step']}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    # Lower loss to the right, so "better generative model" reads left to right.
    axes.invert_xaxis()
    axes.set_xlabel("validation loss (bits per token; lower is better)")
    axes.set_ylabel("probe test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return figure_png(figure)
