"""HEAD on every GET route: the status and headers of GET, and no body."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from store import FeatureSet
from store.settings import Settings
from tests.factories import pending_featureset

ZERO_ID = "0" * 24
N_ITEMS = 20
DIM = 3
BLOCK_ROWS = 4


@pytest.fixture(scope="module")
def complete_set(settings: Settings) -> FeatureSet:
    """A complete feature set of five blocks in the store of the session's API."""
    featureset = pending_featureset(
        Path(settings.store),
        n_items=N_ITEMS,
        dim=DIM,
        layers=(0, 1),
        fingerprint="4ead" * 4,
        block_rows=BLOCK_ROWS,
    )
    features = np.arange(2 * N_ITEMS * DIM, dtype=np.float32).reshape(2, N_ITEMS, DIM)
    for block in range(N_ITEMS // BLOCK_ROWS):
        rows = slice(block * BLOCK_ROWS, (block + 1) * BLOCK_ROWS)
        featureset.write_block(block, features[:, rows])
    assert featureset.mark_complete()
    return featureset


@pytest.fixture(scope="module")
def http(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60) as client:
        yield client


def _same_headers(get: httpx.Response, head: httpx.Response) -> None:
    for name in ("content-type", "content-length", "allow", "retry-after"):
        assert head.headers.get(name) == get.headers.get(name), name


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/v1/featuresets",
        "/v1/jobs?limit=1",
        "/v1/probes",
        "/openapi.json",
        f"/v1/featuresets/{ZERO_ID}",
        "/v1/featuresets/not-an-id",
    ],
)
def test_head_matches_get(http: httpx.Client, path: str) -> None:
    get = http.get(path)
    head = http.head(path)
    assert head.status_code == get.status_code
    _same_headers(get, head)
    assert head.content == b""


def test_head_of_set_and_layer(http: httpx.Client, complete_set: FeatureSet) -> None:
    for path in (
        f"/v1/featuresets/{complete_set.id}",
        f"/v1/featuresets/{complete_set.id}/layers/1",
        f"/v1/featuresets/{complete_set.id}/layers/1?start=0&stop=2",
        f"/v1/featuresets/{complete_set.id}/labels",
    ):
        get = http.get(path)
        head = http.head(path)
        assert get.status_code == 200, get.text
        assert head.status_code == 200, path
        _same_headers(get, head)
        assert int(head.headers["content-length"]) == len(get.content)
        assert head.content == b""


def test_head_of_layer_reads_no_rows(
    http: httpx.Client, complete_set: FeatureSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .npy stream of a whole layer is not read for HEAD: its length is known up front."""

    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("HEAD read the layer's rows")

    monkeypatch.setattr(FeatureSet, "iter_layer", no_read)
    head = http.head(f"/v1/featuresets/{complete_set.id}/layers/0")
    assert head.status_code == 200
    header_bytes = 128  # An .npy 1.0 header of this shape is padded to 128 bytes.
    assert int(head.headers["content-length"]) == header_bytes + N_ITEMS * DIM * 4


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/featuresets", "GET, HEAD"),
        ("POST", f"/v1/featuresets/{ZERO_ID}", "GET, HEAD, DELETE"),
        ("DELETE", "/v1/probes", "GET, HEAD, POST"),
        ("HEAD", "/v1/extractions", "POST"),
    ],
)
def test_allow_lists_head(http: httpx.Client, method: str, path: str, allowed: str) -> None:
    response = http.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    if method != "HEAD":
        assert f"use {allowed}" in response.json()["detail"]["message"]


def test_openapi_states_head_once(settings: Settings, tmp_path: Path) -> None:
    document = create_app(settings.model_copy(update={"store": str(tmp_path)})).openapi()
    head_operations = [path for path, item in document["paths"].items() if "head" in item]
    assert head_operations == []
    assert "Every path with a GET operation also answers HEAD" in document["info"]["description"]
