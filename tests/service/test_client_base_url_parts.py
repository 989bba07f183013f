"""Base URLs with a path, query, fragment or user information are rejected before any request,
and a response that is not JSON where JSON is expected raises a ClientError that names the URL
and what came back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.client import Client, ClientError, InvalidUrlError, check_base_url
from tests.factories import local_http_server
from tests.service.test_client_answers import PROXY_PAGE, _ProxyHandler

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


@pytest.fixture()
def html_url() -> Iterator[str]:
    # The proxy page of the client answer tests: HTML with 200, or 502 under /v1/jobs.
    with local_http_server(_ProxyHandler) as url:
        yield url


def test_non_json_response_is_client_error(html_url: str) -> None:
    with Client(html_url, retries=0) as client, pytest.raises(ClientError) as caught:
        client.health()
    message = str(caught.value)
    assert f"{html_url}/healthz" in message
    assert "text/html" in message
    assert repr(PROXY_PAGE) in message
    assert caught.value.status_code == 200


def test_cli_non_json_response_one_line(html_url: str) -> None:
    result = CliRunner().invoke(app, ["jobs", "--url", html_url])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "text/html" in result.stderr
