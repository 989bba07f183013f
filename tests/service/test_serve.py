"""``python -m service.serve`` and the other entry points: logging and invalid configuration."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.launcher import free_port, wait_for_http

MISSING_ID = "0" * 24
LOG_LINE = (
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO service\.app: GET /v1/featuresets/0{24} -> 404"
)


def serve_env(redis_url: str, store: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "LAYERBANK_STORE": str(store),
        "REDIS_URL": redis_url,
        "LAYERBANK_HOST": "127.0.0.1",
        "LAYERBANK_PORT": str(port),
        "LAYERBANK_QUEUE": "layerbank-serve-test",
        "LAYERBANK_AUTH": "off",
    }


def serve_two_workers_and_request(redis_url: str, tmp_path: Path, log_level: str) -> str:
    """Run ``service.serve --workers 2``, request a missing feature set, return the output."""
    import httpx

    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.serve", "--workers", "2", "--log-level", log_level],
            env=serve_env(redis_url, tmp_path / "store", port),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=120)
        response = httpx.get(f"http://127.0.0.1:{port}/v1/featuresets/{MISSING_ID}", timeout=10)
        assert response.status_code == 404
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return log_path.read_text()


def test_serve_workers_log_formatted_lines(redis_server: Any, tmp_path: Path) -> None:
    output = serve_two_workers_and_request(redis_server.url, tmp_path, "info")
    assert re.search(LOG_LINE, output), output


def test_serve_workers_apply_log_level(redis_server: Any, tmp_path: Path) -> None:
    output = serve_two_workers_and_request(redis_server.url, tmp_path, "WARNING")
    assert "-> 404" not in output


def run_module(*args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_bogus_log_level_usage_error() -> None:
    result = run_module("service.serve", "--log-level", "bogus")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid choice: 'BOGUS'" in result.stderr
    assert "'DEBUG'" in result.stderr


def test_worker_bogus_log_level_usage_error() -> None:
    result = run_module("workers.main", "--log-level", "bogus")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid choice: 'BOGUS'" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("service.serve",),
        ("workers.main",),
        ("service.cli", "keys", "list"),
        ("service.cli", "worker"),
        # A free port and a private store, so a regression cannot reach a running service.
        ("service.cli", "up", "--port", "{port}", "--store", "{store}"),
    ],
)
def test_invalid_port_env_one_line(command: tuple[str, ...], tmp_path: Path) -> None:
    arguments = [part.format(port=free_port(), store=tmp_path / "store") for part in command]
    result = run_module(*arguments, env={"LAYERBANK_PORT": "notaport"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "LAYERBANK_PORT='notaport'" in lines[0]
    assert "expected an integer from 1 to 65535" in lines[0]
