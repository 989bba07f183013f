"""The demo's whole path through the REST API, with a short pretraining, and its --url checks."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from service.demo import embedded_stack_address


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


def test_demo_name_taken_gives_name_option(
    client: Any, api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store model of the demo's name pretrained with other settings ends the demo with a
    fix that the demo accepts."""
    from service import cli, launcher
    from tests.conftest import wait_job

    monkeypatch.setattr(launcher, "terminate_on_sigterm", lambda: None)
    existing_name = f"taken-{uuid.uuid4().hex[:8]}"
    answer = client.pretrain(
        existing_name, dataset="digits", split="train", n_layer=1, n_embd=16, n_head=1, steps=2
    )
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state

    result = CliRunner().invoke(
        cli.app,
        ["demo", "--url", api_url, "--output", str(tmp_path / "out"), "--name", existing_name],
    )
    assert result.exit_code == 1
    assert f"store:{existing_name} already exists with different settings" in result.stderr
    assert "--name NEW" in result.stderr


def test_demo_output_on_file_one_error_line(
    api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import cli, launcher

    monkeypatch.setattr(launcher, "terminate_on_sigterm", lambda: None)
    (tmp_path / "afile").write_text("not a folder")
    for output in (tmp_path / "afile", tmp_path / "afile" / "out"):
        result = CliRunner().invoke(cli.app, ["demo", "--url", api_url, "--output", str(output)])
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: cannot create the --output folder {output}")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("http://127.0.0.1:8123/", ("127.0.0.1", 8123)),
        ("http://localhost:9000", ("127.0.0.1", 9000)),
        ("http://[::1]:8001", ("::1", 8001)),
    ],
)
def test_stack_address_valid_url(url: str, address: tuple[str, int]) -> None:
    assert embedded_stack_address(url) == address


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://127.0.0.1",
            "has no port, and the embedded stack needs one; add :PORT, e.g. "
            "--url http://127.0.0.1:8000",
        ),
        ("http://localhost/", "has no port"),
        ("https://127.0.0.1:8000", "serves plain HTTP"),
        ("127.0.0.1:8000", "serves plain HTTP"),
        ("http://127.0.0.1:99999", "'127.0.0.1:99999' is not a number from 1 to 65535"),
        ("http://127.0.0.1:port", "'127.0.0.1:port' is not a number from 1 to 65535"),
        ("http://127.0.0.1:0", "'127.0.0.1:0' is not a number from 1 to 65535"),
        ("http://10.1.2.3:8000", "only on a loopback address, not '10.1.2.3'"),
        ("http://127.0.0.1:8000/api", "remove '/api' from --url"),
    ],
)
def test_stack_address_invalid_url(url: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        embedded_stack_address(url)
    assert message in str(raised.value)


def test_demo_url_without_port_exit_two(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo rejects the URL before it starts a stack when no API responds there."""
    from service import cli, launcher
    from service.client import ApiConnectionError, Client

    def no_api(self: Client) -> dict[str, Any]:
        raise ApiConnectionError(self.base_url, httpx.ConnectError("connection refused"))

    def no_stack(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the demo started a process: {args}")

    # The demo would install a SIGTERM handler in the pytest process.
    monkeypatch.setattr(launcher, "terminate_on_sigterm", lambda: None)
    monkeypatch.setattr(Client, "health", no_api)
    monkeypatch.setattr(cli.subprocess, "Popen", no_stack)
    result = CliRunner().invoke(
        cli.app,
        ["demo", "--url", "http://127.0.0.1", "--output", str(tmp_path / "out")],
        catch_exceptions=False,
    )
    assert result.exit_code == 2
    assert "no API at http://127.0.0.1" in result.stderr
    assert "add :PORT" in result.stderr
    assert not (tmp_path / "out").exists()


def test_demo_url_of_other_server_one_error_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A port where another HTTP server listens gets one error line, not a started stack."""
    import threading
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    from service import cli, launcher

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # its lines would mix with the CLI's stderr

    monkeypatch.setattr(launcher, "terminate_on_sigterm", lambda: None)
    server = HTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result = CliRunner().invoke(
            cli.app, ["demo", "--url", url, "--output", str(tmp_path / "out")]
        )
    finally:
        server.shutdown()
        server.server_close()

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {url} responds, but not as a layerbank API; pass --url with a free port"
    ]
    assert not (tmp_path / "out").exists()


def test_progress_printer_prints_tenths() -> None:
    import io

    from rich.console import Console

    from service.demo import _progress_printer

    output = io.StringIO()
    show = _progress_printer(Console(file=output, width=120), "pretrain")
    show({"status": "queued", "progress": {"done": 0, "total": 1000}})
    for done in range(1001):
        show({"status": "running", "progress": {"done": done, "total": 1000}})
    show({"status": "finished", "progress": {"done": 1000, "total": 1000}})
    lines = output.getvalue().splitlines()
    assert lines[0] == "  pretrain: queued 0/1000"
    assert lines[1] == "  pretrain: running 0/1000"
    assert lines[-2] == "  pretrain: running 1000/1000"
    assert lines[-1] == "  pretrain: finished 1000/1000"
    assert len(lines) == 13
