"""Query strings: an unknown parameter or a repeated single-valued one is a 422 naming it."""

from __future__ import annotations

import httpx
import pytest

MISSING = "0" * 24


@pytest.mark.parametrize(
    ("path", "field", "words"),
    [
        ("/v1/featuresets?status=failed", "status", ["'status'", "no query parameters"]),
        ("/v1/probes?limit=5", "limit", ["'limit'", "GET /v1/probes"]),
        ("/v1/jobs?staus=failed", "staus", ["'staus'", "before, kind, limit, status"]),
        (f"/v1/featuresets/{MISSING}/layers/0?rows=5", "rows", ["'rows'", "format, start, stop"]),
        ("/v1/datasets?x=1", "x", ["'x'", "no query parameters"]),
        # The dashboard's JSON route is checked like the API; only its pages are not.
        ("/dashboard/probe-pairs?trian=x", "trian", ["'trian'", "use one of train"]),
    ],
)
def test_unknown_query_parameter_is_422(
    api_url: str, path: str, field: str, words: list[str]
) -> None:
    response = httpx.get(api_url + path)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field
    for word in words:
        assert word in detail["message"]


def test_repeated_query_parameter_is_422(api_url: str) -> None:
    response = httpx.get(f"{api_url}/v1/jobs?status=failed&status=finished")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "status"
    assert detail["value"] == ["failed", "finished"]
    assert "pass it once" in detail["message"]


def test_repeated_dashboard_pair_query_is_422(api_url: str) -> None:
    response = httpx.get(f"{api_url}/dashboard/probe-pairs?train={MISSING}&train={'1' * 24}")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "train"
    assert "pass it once" in detail["message"]


def test_list_query_parameter_may_repeat(api_url: str) -> None:
    # probe takes one id per checkpoint: repeating it is the API, so the ids are looked up.
    response = httpx.get(f"{api_url}/v1/claims/accuracy-vs-loss?probe={MISSING}&probe={'1' * 24}")
    assert response.status_code == 404, response.text
    assert response.json()["detail"]["field"] == "probe"


def test_declared_query_parameters_accepted(api_url: str) -> None:
    response = httpx.get(f"{api_url}/v1/jobs?status=failed&kind=probe&limit=3")
    assert response.status_code == 200, response.text


def test_dashboard_page_ignores_query(api_url: str) -> None:
    response = httpx.get(f"{api_url}/dashboard?tab=jobs&utm_source=mail")
    assert response.status_code == 200, response.text
    assert "text/html" in response.headers["content-type"]


def test_health_check_ignores_query(api_url: str) -> None:
    # Load balancers may add a cache-busting parameter to the open health check.
    response = httpx.get(f"{api_url}/healthz?nocache=123")
    assert response.status_code == 200, response.text
