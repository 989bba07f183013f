"""The demo's whole path through the REST API, with a short pretraining."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console


def test_demo_runs_and_writes_pictures(client: Any, tmp_path: Path) -> None:
    from service.demo import run_demo

    with (tmp_path / "out.txt").open("w") as out:
        result = run_demo(client, tmp_path, steps=5, console=Console(file=out, width=120))
    rows = result["rows"]
    assert [row["layer"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(row["converged"] for row in rows)
    assert result["baseline"]["test_accuracy"] > 0.9
    assert max(row["test_accuracy"] for row in rows) > 0.3
    for name in ("curve.png", "tsne.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "out.txt").read_text()
    assert "best layer by validation accuracy" in text
    assert "raw pixels" in text


def test_demo_second_run_reuses_everything(client: Any, tmp_path: Path) -> None:
    from service.demo import run_demo

    with (tmp_path / "out.txt").open("w") as out:
        console = Console(file=out, width=120)
        first = run_demo(client, tmp_path / "a", steps=5, console=console)
        second = run_demo(client, tmp_path / "b", steps=5, console=console)
    assert second["featuresets"] == first["featuresets"]
    assert second["probes"] == first["probes"]
    assert "already in the store: reused" in (tmp_path / "out.txt").read_text()
