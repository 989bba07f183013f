"""Option values that the ``layerbank`` CLI rejects itself, before it sends any request.

A rejected value is a usage error (exit code 2). The commands that test one get the URL of a
port where nothing listens, where a request would exit with code 1 instead. Accepted values go
to the live test API, whose response shows that it received them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.launcher import free_port

runner = CliRunner()

ID = "0" * 24
LAYER_FORMS = "'all' or hidden-state indices separated by commas, such as 0,3,5"
KIND_FORMS = "probe kinds separated by commas, such as logistic,knn"


@pytest.fixture
def dead_url() -> str:
    """URL of a free loopback port, so that a request fails to connect."""
    return f"http://127.0.0.1:{free_port()}"


def invoke(url: str, *args: str) -> Any:
    return runner.invoke(app, [*args, "--url", url], catch_exceptions=False)


def usage_message(result: Any) -> str:
    """Return the words of a usage error's stderr, without the box that rich draws around it."""
    return " ".join(result.stderr.replace("\u2502", " ").split())


@pytest.mark.parametrize("layers", ["ALL", "All", "x", "0,x", "1.5", "0,,3", "0,3,", ",0", ""])
@pytest.mark.parametrize("command", ["extract", "probe"])
def test_layers_invalid_is_usage_error(dead_url: str, command: str, layers: str) -> None:
    args = ("m", "digits", "test") if command == "extract" else (ID, ID)
    result = invoke(dead_url, command, *args, "--layers", layers)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    message = usage_message(result)
    assert "Invalid value for '--layers'" in message
    assert f"{layers!r}" in message
    assert LAYER_FORMS in message
    assert "cannot reach" not in message


@pytest.mark.parametrize("layers", ["all", "0", "0,3,5", " 0, 3 ", "-1"])
def test_layers_valid_reach_request(api_url: str, layers: str) -> None:
    # The API checks the layers' type before the model, so an error about the unknown model
    # shows that it accepted them. It rejects -1 only after it has resolved the model and its
    # range, so the CLI sends it on like any other integer.
    result = invoke(api_url, "extract", "no-such-model", "digits", "test", f"--layers={layers}")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: HTTP 422: ")
    assert "'no-such-model'" in result.stderr
    assert "layers" not in result.stderr


@pytest.mark.parametrize("kind", ["a,,b", "logistic,,knn", "logistic,", ",knn", "", ",", " "])
def test_probe_kind_empty_entry_is_usage_error(dead_url: str, kind: str) -> None:
    result = invoke(dead_url, "probe", ID, ID, "--kind", kind)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    message = usage_message(result)
    assert "Invalid value for '--kind'" in message
    assert f"{kind!r}" in message
    assert KIND_FORMS in message


@pytest.mark.parametrize("kind", ["logistic", "logistic,knn", " logistic , knn "])
def test_probe_kind_valid_reaches_request(api_url: str, kind: str) -> None:
    # Neither feature set exists, and the API looks them up after it has read the body.
    result = invoke(api_url, "probe", ID, ID, "--kind", kind)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: HTTP 404: ")


@pytest.mark.parametrize("limit", ["0", "-5", "1001"])
def test_jobs_limit_out_of_range_names_value(dead_url: str, limit: str) -> None:
    result = invoke(dead_url, "jobs", "--limit", limit)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    message = usage_message(result)
    assert f"Invalid value for '--limit': {limit} is out of range" in message
    assert "pass a number of jobs from 1 to 1000" in message


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_jobs_limit_in_range_reaches_request(api_url: str, limit: str) -> None:
    result = invoke(api_url, "jobs", "--limit", limit, "--json")
    assert result.exit_code == 0, result.output
    assert "data" in json.loads(result.stdout)
