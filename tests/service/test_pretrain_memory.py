"""POST /v1/pretrain rejects a run whose estimated memory exceeds LAYERBANK_PRETRAIN_MEMORY_GIB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from store.settings import Settings

# A Redis database of the session's server that only this module uses. No worker reads it, so
# accepted requests stay queued.
PRETRAIN_DB = 14


@pytest.fixture
def redis_url(redis_server: Any) -> Iterator[str]:
    url = str(redis_server.url.rsplit("/", 1)[0] + f"/{PRETRAIN_DB}")
    connection = Redis.from_url(url)
    connection.flushdb()
    yield url
    connection.flushdb()
    connection.close()


def _client(settings: Settings, redis_url: str, store: Path, **update: Any) -> TestClient:
    app = create_app(
        settings.model_copy(update={"store": str(store), "redis_url": redis_url, **update})
    )
    return TestClient(app)


def test_pretrain_over_memory_limit_is_422(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    body = {
        "name": "huge",
        "n_layer": 48,
        "n_embd": 2048,
        "n_head": 64,
        "batch_size": 4096,
        "n_colors": 1024,
    }
    with _client(settings, redis_url, tmp_path / "store") as client:
        response = client.post("/v1/pretrain", json=body)
        jobs = client.get("/v1/jobs").json()

    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "n_embd"
    assert detail["value"] == 2048
    message = detail["message"]
    assert "n_layer=48, n_embd=2048, n_head=64, n_colors=1024 and batch_size=4096" in message
    assert "2.42 billion parameters" in message
    assert "GiB" in message
    assert f"limit of {settings.pretrain_memory_gib:g} GiB" in message
    assert "LAYERBANK_PRETRAIN_MEMORY_GIB" in message
    assert "smaller n_embd, n_layer or n_head" in message
    assert jobs["data"] == []


def test_pretrain_large_batch_names_batch_size(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    body = {"name": "wide-batch", "batch_size": 4096}
    with _client(settings, redis_url, tmp_path / "store") as client:
        rejected = client.post("/v1/pretrain", json=body)
        detail = rejected.json()["detail"]
        largest = int(detail["message"].split("pass batch_size <= ")[1].split(",")[0])
        accepted = client.post("/v1/pretrain", json={**body, "batch_size": largest})

    assert rejected.status_code == 422, rejected.text
    assert detail["field"] == "batch_size"
    assert detail["value"] == 4096
    assert accepted.status_code == 202, accepted.text


def test_pretrain_limit_follows_setting(settings: Settings, redis_url: str, tmp_path: Path) -> None:
    """The limit is the setting's: a request that the default accepts fails under 1 GiB."""
    body = {"batch_size": 1024}
    with _client(settings, redis_url, tmp_path / "default") as client:
        default = client.post("/v1/pretrain", json={"name": "default-limit", **body})
    with _client(settings, redis_url, tmp_path / "small", pretrain_memory_gib=1.0) as client:
        small = client.post("/v1/pretrain", json={"name": "small-limit", **body})

    assert default.status_code == 202, default.text
    assert small.status_code == 422, small.text
    assert "limit of 1 GiB" in small.json()["detail"]["message"]


def test_pretrain_defaults_accepted(settings: Settings, redis_url: str, tmp_path: Path) -> None:
    with _client(settings, redis_url, tmp_path / "store") as client:
        response = client.post("/v1/pretrain", json={"name": "defaults"})

    assert response.status_code == 202, response.text
