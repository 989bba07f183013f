"""Base URLs with a path, query, fragment or user information are rejected before any request,
and a response that is not JSON where JSON is expected raises a ClientError that names the URL
and what came back."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.client import Client, ClientError, InvalidUrlError, check_base_url
from tests.factories import local_http_server

REJECTED = {
    "http://127.0.0.1:18731?x=1": "query",
    "http://127.0.0.1:18731/?x=1": "query",
    "http://127.0.0.1:18731?": "query",
    "http://127.0.0.1:18731/v1": "path",
    "http://127.0.0.1:18731/v1/": "path",
    "http://127.0.0.1:18731#f": "fragment",
    "http://127.0.0.1:18731#": "fragment",
    "http://user:pw@127.0.0.1:18731": "user information",
    "http://user@127.0.0.1:18731": "user information",
    "http://@127.0.0.1:18731": "user information",
}


@pytest.mark.parametrize(("url", "part"), REJECTED.items())
def test_base_url_part_rejected(url: str, part: str) -> None:
    with pytest.raises(InvalidUrlError) as caught:
        Client(url)
    assert part in caught.value.reason
    assert caught.value.url == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:18731", "http://127.0.0.1:18731/"])
def test_base_url_plain_accepted(url: str) -> None:
    assert check_base_url(url) == url


def test_cli_url_query_is_usage_error() -> None:
    result = CliRunner().invoke(app, ["jobs", "--url", "http://127.0.0.1:18731?x=1"])
    assert result.exit_code == 2
    assert "query" in result.output
    assert "Traceback" not in result.output


class _HtmlHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        body = b"<html><body>a proxy login page</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def html_url() -> Iterator[str]:
    with local_http_server(_HtmlHandler) as url:
        yield url


def test_non_json_response_is_client_error(html_url: str) -> None:
    with Client(html_url, retries=0) as client, pytest.raises(ClientError) as caught:
        client.health()
    message = str(caught.value)
    assert f"{html_url}/healthz" in message
    assert "text/html" in message
    assert "<html><body>a proxy" in message
    assert caught.value.status_code == 200


def test_cli_non_json_response_one_line(html_url: str) -> None:
    result = CliRunner().invoke(app, ["jobs", "--url", html_url])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "text/html" in result.stderr
