"""Responses that the layerbank API would not send, such as a proxy's HTML page in place of an
.npy body or of an error's JSON, raise a ClientError that names the request and what came back.
A base URL with whitespace is rejected before any request."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.client import Client, ClientError, InvalidUrlError, check_base_url
from tests.factories import local_http_server

FEATURESET_ID = "0" * 24
PROXY_PAGE = b"<html><body>Bad gateway from proxy</body></html>"
SHORT_PAGE = b"<p>"


class _ProxyHandler(BaseHTTPRequestHandler):
    """Send an HTML page for every GET, with 502 under /bad-gateway/ and /v1/jobs, else 200.

    A request with ``stop=1`` in its query gets a 3-byte page, shorter than an .npy header.
    """

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        status = 502 if self.path.startswith(("/bad-gateway/", "/v1/jobs")) else 200
        body = SHORT_PAGE if "stop=1" in self.path else PROXY_PAGE
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def proxy_url() -> Iterator[str]:
    with local_http_server(_ProxyHandler) as url:
        yield url


def test_layer_array_html_is_client_error(proxy_url: str) -> None:
    with Client(proxy_url, retries=0) as client, pytest.raises(ClientError) as caught:
        client.layer_array(FEATURESET_ID, layer=0)
    message = str(caught.value)
    url = f"{proxy_url}/v1/featuresets/{FEATURESET_ID}/layers/0"
    assert caught.value.status_code == 200
    assert f"GET {url} returned HTTP 200" in message
    assert "text/html; charset=utf-8" in message
    assert "not an .npy array" in message
    assert repr(PROXY_PAGE) in message
    assert f"check that {proxy_url} is the layerbank API" in message
    assert caught.value.detail["value"] == url


def test_layer_array_short_html_is_client_error(proxy_url: str) -> None:
    # A body shorter than the .npy header is still recognized as not .npy, not as cut short.
    with Client(proxy_url, retries=0) as client, pytest.raises(ClientError) as caught:
        client.layer_array(FEATURESET_ID, layer=0, start=0, stop=1)
    assert "not an .npy array" in str(caught.value)
    assert repr(SHORT_PAGE) in str(caught.value)
    assert "ended early" not in str(caught.value)


def test_labels_html_is_client_error(proxy_url: str) -> None:
    with Client(proxy_url, retries=0) as client, pytest.raises(ClientError) as caught:
        client.labels(FEATURESET_ID)
    url = f"{proxy_url}/v1/featuresets/{FEATURESET_ID}/labels"
    assert f"GET {url} returned HTTP 200" in str(caught.value)
    assert "not an .npy array" in str(caught.value)


def test_non_json_error_names_url(proxy_url: str) -> None:
    with Client(proxy_url, retries=0) as client, pytest.raises(ClientError) as caught:
        client.request("GET", "/bad-gateway/x")
    message = str(caught.value)
    assert caught.value.status_code == 502
    assert f"GET {proxy_url}/bad-gateway/x returned HTTP 502" in message
    assert "text/html; charset=utf-8" in message
    assert "not the layerbank API's error JSON" in message
    assert repr(PROXY_PAGE) in message
    assert f"check that {proxy_url} is the layerbank API" in message


def test_cli_non_json_error_names_url(proxy_url: str) -> None:
    result = CliRunner().invoke(app, ["jobs", "--url", proxy_url])
    assert result.exit_code == 1
    assert f"error: HTTP 502: GET {proxy_url}/v1/jobs" in result.output
    assert "not the layerbank API's error JSON" in result.output
    assert "Traceback" not in result.output


def test_non_json_and_npy_share_wording(proxy_url: str) -> None:
    with Client(proxy_url, retries=0) as client:
        with pytest.raises(ClientError) as not_json:
            client.health()
        with pytest.raises(ClientError) as not_npy:
            client.layer_array(FEATURESET_ID, layer=0)
        with pytest.raises(ClientError) as not_error_json:
            client.request("GET", "/bad-gateway/x")
    for caught in (not_json, not_npy, not_error_json):
        message = caught.value.detail["message"]
        assert " with text/html; charset=utf-8 that is not " in message
        assert f", starting with {PROXY_PAGE[:80]!r}; check that " in message
        assert message.endswith("is the layerbank API and not a proxy or another server")


@pytest.mark.parametrize(
    "url",
    [
        " http://127.0.0.1:18440",
        "http://127.0.0.1:18440 ",
        "http://127.0.0.1:18440\n",
        "\thttp://127.0.0.1:18440",
        "http://127.0.0.1 :18440",
    ],
)
def test_base_url_whitespace_rejected(url: str) -> None:
    with pytest.raises(InvalidUrlError) as caught:
        check_base_url(url)
    assert "whitespace" in caught.value.reason
    assert "remove" in caught.value.reason
    assert repr(url) in str(caught.value)


def test_cli_url_whitespace_is_usage_error() -> None:
    result = CliRunner().invoke(app, ["jobs", "--url", " http://127.0.0.1:18440"])
    assert result.exit_code == 2
    assert "whitespace" in result.output
    assert "Traceback" not in result.output
