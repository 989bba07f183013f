"""The --url option of every API command: an invalid URL is a usage error before any request."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.launcher import free_port

runner = CliRunner()

# One command of each kind that takes --url: lists, a job query, a creation, and the demo.
COMMANDS = [
    ["featuresets"],
    ["jobs"],
    ["extract", "pixels", "digits", "train"],
    ["demo"],
]

INVALID_URLS = [
    ("http://127.0.0.1:abc", "the port 'abc' is not a number from 1 to 65535"),
    ("http://[::1", "its host is not a valid IPv6 address in brackets"),
    ("http://[::1]:abc", "the port 'abc' is not a number from 1 to 65535"),
    ("http://127.0.0.1:0", "the port '0' is not a number from 1 to 65535"),
    ("ftp://127.0.0.1:8000", "its scheme is 'ftp', not http or https"),
    ("127.0.0.1:8000", "it does not start with http:// or https://"),
]


def usage_message(result: Any) -> str:
    """Return the words of a usage error's stderr, without the box that rich draws around it."""
    return " ".join(result.stderr.replace("\u2502", " ").split())


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command[0])
@pytest.mark.parametrize(("url", "reason"), INVALID_URLS)
def test_invalid_url_usage_error(command: list[str], url: str, reason: str) -> None:
    result = runner.invoke(app, [*command, "--url", url], catch_exceptions=False)
    message = usage_message(result)
    assert result.exit_code == 2, message
    assert "Invalid value for '--url'" in message
    assert f"{url!r}: {reason}" in message
    assert "pass a URL like http://127.0.0.1:8000" in message
    assert "Traceback" not in result.output
    assert "httpx" not in message


def test_invalid_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERBANK_URL", "http://127.0.0.1:abc")
    result = runner.invoke(app, ["featuresets"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "the port 'abc' is not a number from 1 to 65535" in usage_message(result)


def test_unreachable_api_one_error_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["featuresets", "--url", url], catch_exceptions=False)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach the layerbank API at {url}: ")
    assert lines[0].endswith("; start it with `layerbank up` or pass --url")


def test_valid_url_reaches_api(api_url: str) -> None:
    result = runner.invoke(app, ["featuresets", "--url", api_url, "--json"])
    assert result.exit_code == 0, result.output
