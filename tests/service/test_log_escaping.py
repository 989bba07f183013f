"""Request-controlled text reaches the log with control characters escaped.

A client that puts terminal escapes, NUL or other non-printable characters into a path, a query,
a body or a key name must not be able to write them raw into the server's log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from store.logs import escape_nonprintable
from store.settings import Settings

# ESC [ 2 J clears a terminal and ESC [ 31 m turns its text red, NUL makes grep call a file binary.
HOSTILE_PATH = "/v1/nope%1b%5b2J%1b%5b31mPWNED%00"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text, ümlaut and 漢字", "plain text, ümlaut and 漢字"),
        ("\x1b[2J", "\\x1b[2J"),
        ("nul\x00", "nul\\x00"),
        ("tab\tnew\nline\rcr", "tab\\x09new\\x0aline\\x0dcr"),
        ("del\x7f", "del\\x7f"),
        ("c1\x9b31m", "c1\\x9b31m"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("lone\ud800", "lone\\ud800"),
        ("line\u2028separator", "line\\u2028separator"),
        ("private\U000f0000", "private\\U000f0000"),
    ],
)
def test_escape_nonprintable_cases(text: str, expected: str) -> None:
    assert escape_nonprintable(text) == expected


def test_escape_nonprintable_is_idempotent() -> None:
    once = escape_nonprintable("\x1b[31m\x00\u202e")
    assert escape_nonprintable(once) == once


def test_escape_nonprintable_takes_any_object() -> None:
    assert escape_nonprintable(["a\x1b"]) == "['a\\x1b']"


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def _assert_printable(text: str) -> None:
    bad = sorted({char for char in text if not char.isprintable() and char != "\n"})
    assert bad == [], f"non-printable characters {bad!r} in the log: {text!r}"


def test_404_path_escaped_in_log(api_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service")
    response = httpx.get(api_url + HOSTILE_PATH)
    assert response.status_code == 404
    text = _log_text(caplog)
    assert "nope\\x1b[2J\\x1b[31mPWNED\\x00" in text
    _assert_printable(text)


def test_405_path_escaped_in_log(api_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service")
    response = httpx.put(api_url + "/v1/featuresets%1b%5b2J")
    assert response.status_code in (404, 405)
    _assert_printable(_log_text(caplog))


def test_422_query_and_body_escaped_in_log(api_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service")
    unknown_query = httpx.get(api_url + "/v1/jobs?st%1batus=queued%00")
    assert unknown_query.status_code == 422
    unknown_key = httpx.post(
        api_url + "/v1/extractions",
        json={"model": "pixels", "dataset": "digits", "split": "train", "x\u001b[2J": 1},
    )
    assert unknown_key.status_code == 422
    bad_dataset = httpx.post(
        api_url + "/v1/extractions",
        json={"model": "pixels", "dataset": "dig\u001b[2Jits\u0000", "split": "train"},
    )
    assert bad_dataset.status_code == 422
    text = _log_text(caplog)
    assert "\\x1b[2J" in text
    _assert_printable(text)


def test_body_parse_error_escaped_in_log(api_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service")
    response = httpx.post(
        api_url + "/v1/extractions%1b",
        content=b"\xff\xfe{",
        headers={"content-type": "application/json"},
    )
    assert response.status_code in (404, 422)
    _assert_printable(_log_text(caplog))


def test_401_path_escaped_in_log(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A request with an unknown API key logs its path."""
    caplog.set_level(logging.INFO, logger="service")
    app = create_app(settings.model_copy(update={"store": str(tmp_path), "auth": "required"}))
    with TestClient(app) as client:
        response = client.get(
            "/v1/featuresets/x%1b%5b2J", headers={"Authorization": "Bearer not-a-key"}
        )
    assert response.status_code == 401
    text = _log_text(caplog)
    assert "featuresets/x\\x1b[2J" in text
    _assert_printable(text)


def test_internal_error_path_escaped_in_log(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unhandled exception logs the request's path with its traceback."""
    app = create_app(settings.model_copy(update={"store": str(tmp_path)}))

    @app.get("/boom/{rest}")
    def boom(rest: str) -> None:
        raise RuntimeError("boom")

    caplog.set_level(logging.ERROR, logger="service")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom/x%1b%5b2J")
    assert response.status_code == 500
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "x\\x1b[2J" in text
    _assert_printable(text)
