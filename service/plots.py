"""PNG figures drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def layer_curve_png(rows_by_kind: dict[str, list[dict[str, Any]]], *, title: str,
                    baseline: float | None = None, baseline_label: str = "raw pixels") -> bytes:
    """Draw test accuracy per layer for each probe kind, best layer (by validation) marked."""
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for kind, rows in rows_by_kind.items():
        rows = sorted(rows, key=lambda r: r["layer"])
        layers = [r["layer"] for r in rows]
        line, = axes.plot(layers, [100 * r["test_accuracy"] for r in rows], marker="o",
                          label=f"{kind} (test)")
        best = max(rows, key=lambda r: r["val_accuracy"])
        axes.scatter([best["layer"]], [100 * best["test_accuracy"]], s=160, facecolors="none",
                     edgecolors=line.get_color(), linewidths=2, zorder=3)
        axes.annotate(f"best by val: layer {best['layer']}\n{100 * best['test_accuracy']:.1f}%",
                      (best["layer"], 100 * best["test_accuracy"]), textcoords="offset points",
                      xytext=(8, -28), fontsize=8, color=line.get_color())
    if baseline is not None:
        axes.axhline(100 * baseline, color="grey", linestyle="--",
                     label=f"{baseline_label} {100 * baseline:.1f}%")
    axes.set_xlabel("layer (hidden-state index; 0 = embeddings)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
