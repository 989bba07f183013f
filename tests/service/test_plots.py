"""PNG figures: class names in scripts that matplotlib's default font lacks."""

from __future__ import annotations

import warnings

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
