"""Errors of the Python client when no response comes: refused connections, timeouts, bad URLs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from service.client import (
    ApiConnectionError,
    Client,
    ClientError,
    InvalidUrlError,
    check_base_url,
)
from service.launcher import free_port


@pytest.fixture
def silent_url() -> Iterator[str]:
    """URL of a loopback port that accepts connections but never sends a response."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_refused_connection_names_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=0) as client, pytest.raises(ApiConnectionError) as caught:
        client.health()
    error = caught.value
    assert isinstance(error, ClientError)
    assert error.url == url
    assert isinstance(error.cause, httpx.ConnectError)
    assert error.status_code == 0
    assert str(error).startswith(f"cannot reach the layerbank API at {url}: ")
    assert "refused" in str(error).lower()


def test_refused_connection_retried_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.client.time.sleep", lambda seconds: None)
    sent = []
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=2) as client:
        client._http.event_hooks["request"].append(sent.append)
        with pytest.raises(ApiConnectionError):
            client.health()
    assert len(sent) == 3


def test_timeout_says_timed_out(silent_url: str) -> None:
    with Client(silent_url, retries=0, timeout=0.2) as client:
        with pytest.raises(ApiConnectionError) as caught:
            client.health()
    assert isinstance(caught.value.cause, httpx.TimeoutException)
    assert f"cannot reach the layerbank API at {silent_url}: timed out" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:abc", "the port 'abc' is not a number from 1 to 65535"),
        ("http://[::1]:abc", "the port 'abc' is not a number from 1 to 65535"),
        ("http://127.0.0.1:0", "the port '0' is not a number from 1 to 65535"),
        ("http://127.0.0.1:65536", "the port '65536' is not a number from 1 to 65535"),
        ("http://127.0.0.1:", "the port '' is not a number from 1 to 65535"),
        ("http://[::1", "its host is not a valid IPv6 address in brackets"),
        ("ftp://127.0.0.1:8000", "its scheme is 'ftp', not http or https"),
        ("127.0.0.1:8000", "it does not start with http:// or https://"),
        ("http://", "it has no host"),
    ],
)
def test_invalid_url_rejected_before_request(url: str, reason: str) -> None:
    with pytest.raises(InvalidUrlError) as caught:
        Client(url)
    error = caught.value
    assert isinstance(error, ClientError)
    assert isinstance(error, ValueError)
    assert error.url == url
    assert error.reason.startswith(reason)
    assert str(error).startswith(f"invalid API URL {url!r}: {reason}")
    assert str(error).endswith("; pass a URL like http://127.0.0.1:8000")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "https://127.0.0.1",
        "http://[::1]:1",
        "http://127.0.0.1:65535/",
        "http://localhost:8000",
    ],
)
def test_valid_url_accepted(url: str) -> None:
    assert check_base_url(url) == url


def test_live_api_still_answers(api_url: str) -> None:
    with Client(api_url, retries=0) as client:
        assert client.health()["status"] in ("ok", "degraded")
