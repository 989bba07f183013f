"""Request limits (body size, rows, layers, items, jobs per key) and admin deletion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from service.auth import KeyStore
from store import Store
from store.settings import Settings
from tests.factories import pending_featureset

# Redis databases of the session's private server that only this module uses. Jobs queued
# there never reach the session workers, so they stay queued for as long as a test needs.
LIMITS_DB = 9
FRESH_DB = 10


def _redis_url(redis_server: Any, db: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def limits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits-store")


@pytest.fixture(scope="module")
def limits(
    settings: Settings, redis_server: Any, limits_store: Path
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """A client of an app with small limits, and headers with a write and an admin key."""
    redis = Redis.from_url(_redis_url(redis_server, LIMITS_DB))
    redis.flushdb()
    key_store = KeyStore(redis)
    headers = {
        scope: {"Authorization": f"Bearer {key_store.create(f'limits-{scope}', scope)}"}
        for scope in ("write", "admin")
    }
    app = create_app(
        settings.model_copy(
            update={
                "store": str(limits_store),
                "redis_url": _redis_url(redis_server, LIMITS_DB),
                "max_body_bytes": 2048,
                "max_rows_per_fetch": 5,
                "max_layers_per_extraction": 2,
                "max_items_per_extraction": 50,
                "max_blocks_per_extraction": 4,
                "max_jobs_per_key": 1,
            }
        )
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, headers
    redis.flushdb()
    redis.close()


@pytest.fixture(scope="module")
def queued_featureset(limits: tuple[TestClient, dict[str, str]]) -> str:
    """A feature set whose extraction job stays queued (it uses the key's one job)."""
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["write"],
        json={"model": "pixels", "dataset": "digits", "split": "train", "limit": 20},
    )
    assert response.status_code == 202
    return str(response.json()["featureset_id"])


def test_limits_body_size_by_content_length(limits: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["write"],
        json={"model": "m" * 3000, "dataset": "digits", "split": "train"},
    )
    assert response.status_code == 413
    assert "2048 bytes" in response.json()["detail"]["message"]


def test_limits_body_size_chunked(limits: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = limits
    chunks = iter([b'{"model": "', b"m" * 3000, b'"}'])
    response = client.post(
        "/v1/extractions",
        content=chunks,
        headers={**headers["write"], "Content-Type": "application/json"},
    )
    assert response.status_code == 413


def test_limits_items_per_extraction(limits: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["write"],
        json={"model": "pixels", "dataset": "digits", "split": "train", "limit": 100},
    )
    assert response.status_code == 413
    assert "at most 50" in response.json()["detail"]["message"]


def test_limits_blocks_per_extraction(limits: tuple[TestClient, dict[str, str]]) -> None:
    """Each block is one rq job, so a tiny block_rows would flood the queue."""
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["write"],
        json={
            "model": "pixels",
            "dataset": "digits",
            "split": "train",
            "limit": 20,
            "block_rows": 4,
        },
    )
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert detail["field"] == "block_rows"
    assert detail["value"] == 4
    assert "5 blocks" in detail["message"]
    assert "at most 4" in detail["message"]
    assert "block_rows >= 5" in detail["message"]
    assert "LAYERBANK_MAX_BLOCKS_PER_EXTRACTION" in detail["message"]


def test_default_block_rows_fit_limit(tmp_path: Path) -> None:
    """Without block_rows, blocks grow until the set fits in the block limit."""
    featureset = pending_featureset(tmp_path / "store", n_items=1000, dim=65536, max_blocks=10)
    assert featureset.block_rows == 100
    assert featureset.n_blocks == 10


def test_limits_layers_per_extraction(
    limits: tuple[TestClient, dict[str, str]], tiny_model: Path
) -> None:
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["write"],
        json={"model": str(tiny_model), "dataset": "digits", "split": "train", "limit": 10},
    )
    assert response.status_code == 413
    assert "at most 2" in response.json()["detail"]["message"]


def test_limits_jobs_per_key(
    limits: tuple[TestClient, dict[str, str]], queued_featureset: str
) -> None:
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["write"],
        json={"model": "pixels", "dataset": "digits", "split": "train", "limit": 30},
    )
    assert response.status_code == 429
    assert "the limit is 1" in response.json()["detail"]["message"]


def test_limits_jobs_per_key_counts_each_key(
    limits: tuple[TestClient, dict[str, str]], queued_featureset: str
) -> None:
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["admin"],
        json={"model": "pixels", "dataset": "digits", "split": "train", "limit": 30},
    )
    assert response.status_code == 202


def test_limits_same_request_returns_job_at_limit(
    limits: tuple[TestClient, dict[str, str]], queued_featureset: str
) -> None:
    client, headers = limits
    response = client.post(
        "/v1/extractions",
        headers=headers["write"],
        json={"model": "pixels", "dataset": "digits", "split": "train", "limit": 20},
    )
    assert response.status_code == 202
    assert response.json()["featureset_id"] == queued_featureset


def test_limits_rows_per_fetch(
    limits: tuple[TestClient, dict[str, str]], limits_store: Path
) -> None:
    featureset = pending_featureset(limits_store, n_items=20, dim=4, fingerprint="1" * 16)
    featureset.write_block(0, np.ones((1, 20, 4), dtype=np.float32))
    assert featureset.mark_complete()
    client, headers = limits
    for part in ("labels", "layers/0"):
        response = client.get(
            f"/v1/featuresets/{featureset.id}/{part}?start=2&stop=20", headers=headers["write"]
        )
        assert response.status_code == 413, part
        detail = response.json()["detail"]
        assert detail["field"] == "stop"
        assert detail["value"] == 20
        assert "send stop <= 7" in detail["message"]


def test_labels_of_queued_featureset_409(
    limits: tuple[TestClient, dict[str, str]], queued_featureset: str
) -> None:
    client, headers = limits
    response = client.get(
        f"/v1/featuresets/{queued_featureset}/labels?start=0&stop=2", headers=headers["write"]
    )
    assert response.status_code == 409
    assert response.json()["detail"]["field"] == "featureset_id"


# -- admin delete ---------------------------------------------------------------------------------


def test_delete_featureset_while_job_queued(
    limits: tuple[TestClient, dict[str, str]], queued_featureset: str
) -> None:
    client, headers = limits
    response = client.delete(f"/v1/featuresets/{queued_featureset}", headers=headers["admin"])
    assert response.status_code == 409
    assert "still being written" in response.json()["detail"]["message"]


def test_delete_featureset_removes_probe_results(
    settings: Settings,
    redis_server: Any,
    limits_store: Path,
    limits: tuple[TestClient, dict[str, str]],
    queued_featureset: str,
) -> None:
    # An app on a Redis database without the job record: the feature set has no active job.
    fresh = Redis.from_url(_redis_url(redis_server, FRESH_DB))
    fresh.flushdb()
    store = Store(str(limits_store))
    other = "f" * 24
    store.write_result(
        "probes",
        "a" * 24,
        {"spec": {"train_featureset": queued_featureset, "test_featureset": other}},
    )
    store.write_result(
        "probes", "b" * 24, {"spec": {"train_featureset": other, "test_featureset": other}}
    )
    store.write_result("projections", "c" * 24, {"spec": {"featureset": queued_featureset}})
    app = create_app(
        settings.model_copy(
            update={"store": str(limits_store), "redis_url": _redis_url(redis_server, FRESH_DB)}
        )
    )
    with TestClient(app) as client:
        deleted = client.delete(f"/v1/featuresets/{queued_featureset}")
        after = client.get(f"/v1/featuresets/{queued_featureset}")
    fresh.flushdb()
    assert deleted.status_code == 204
    assert after.status_code == 404
    assert store.read_result("probes", "a" * 24) is None
    assert store.read_result("projections", "c" * 24) is None
    assert store.read_result("probes", "b" * 24) is not None


def test_delete_featureset_unknown(limits: tuple[TestClient, dict[str, str]]) -> None:
    client, headers = limits
    response = client.delete(f"/v1/featuresets/{'e' * 24}", headers=headers["admin"])
    assert response.status_code == 404


@pytest.fixture()
def workerless(settings: Settings, redis_server: Any, tmp_path: Path) -> Iterator[TestClient]:
    """A client of an app on a Redis database no worker reads, with a store of its own."""
    fresh = Redis.from_url(_redis_url(redis_server, FRESH_DB))
    fresh.flushdb()
    app = create_app(
        settings.model_copy(
            update={
                "store": str(tmp_path / "store"),
                "redis_url": _redis_url(redis_server, FRESH_DB),
            }
        )
    )
    try:
        with TestClient(app) as client:
            yield client
    finally:
        fresh.flushdb()
        fresh.close()


def test_delete_featureset_while_probe_queued(workerless: TestClient, tmp_path: Path) -> None:
    from tests.store.test_read_path import _complete_featureset

    train, _ = _complete_featureset(tmp_path / "store")
    test, _ = _complete_featureset(tmp_path / "store")
    probe = workerless.post(
        "/v1/probes",
        json={"train_featureset": train.id, "test_featureset": test.id, "kind": "knn"},
    ).json()
    response = workerless.delete(f"/v1/featuresets/{test.id}")
    after = workerless.get(f"/v1/probes/{probe['probe_id']}")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert detail["field"] == "featureset_id"
    assert f"probe {probe['probe_id']!r}" in detail["message"]
    assert f"job {probe['job_id']!r} is queued" in detail["message"]
    assert after.status_code == 200


def test_extract_model_still_pretraining_is_409(workerless: TestClient) -> None:
    pretrain = workerless.post(
        "/v1/pretrain",
        json={"name": "queued-model", "n_layer": 1, "n_embd": 16, "n_head": 2, "steps": 3},
    ).json()
    response = workerless.post(
        "/v1/extractions",
        json={"model": "store:queued-model", "dataset": "digits", "split": "test"},
    )
    spaced = workerless.post(
        "/v1/extractions",
        json={"model": "store:queued-model ", "dataset": "digits", "split": "test"},
    )
    unknown = workerless.post(
        "/v1/extractions",
        json={"model": "store:never-made", "dataset": "digits", "split": "test"},
    )
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert detail["field"] == "model"
    assert f"pretraining job {pretrain['job_id']!r} is queued" in detail["message"]
    assert spaced.status_code == 409
    assert unknown.status_code == 422
    assert "pretrain it with POST /v1/pretrain first" in unknown.json()["detail"]["message"]
    # The checkpoints route names its path parameter with the value in the path.
    checkpoints = workerless.get("/v1/models/queued-model/checkpoints")
    assert checkpoints.status_code == 409
    assert checkpoints.json()["detail"]["field"] == "name"
    assert checkpoints.json()["detail"]["value"] == "queued-model"


@pytest.mark.parametrize("kind", ["probe", "projection"])
def test_new_job_waits_for_featureset_lock(
    workerless: TestClient, redis_server: Any, tmp_path: Path, kind: str
) -> None:
    """A probe or projection POST holds its feature sets' lock, which a delete takes too, so a
    delete can never run between the POST's checks and the job it records."""
    import threading

    from service.jobs import inputs_locked
    from tests.store.test_read_path import _complete_featureset

    train, _ = _complete_featureset(tmp_path / "store")
    test, _ = _complete_featureset(tmp_path / "store")
    if kind == "probe":
        path = "/v1/probes"
        body = {"train_featureset": train.id, "test_featureset": test.id, "kind": "knn"}
    else:
        path, body = "/v1/projections", {"featureset": test.id, "layer": 0, "method": "pca"}
    answers: list[Any] = []
    redis = Redis.from_url(_redis_url(redis_server, FRESH_DB))
    with inputs_locked(redis, [test.id]):
        thread = threading.Thread(target=lambda: answers.append(workerless.post(path, json=body)))
        thread.start()
        thread.join(timeout=1.5)
        waited = thread.is_alive()
    thread.join(timeout=30)
    deleted = workerless.delete(f"/v1/featuresets/{test.id}")

    assert waited
    assert answers[0].status_code == 202, answers[0].text
    assert deleted.status_code == 409, deleted.text
