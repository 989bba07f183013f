"""Error responses of the app: routing (404, 405), a failed job's error, pretrain name clashes,
and 503 with Retry-After when a resource is busy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job, JobStatus
from rq.results import Result

from service.app import create_app
from service.jobs import new_job_id, save_job
from service.schemas import PretrainCreate
from store.settings import Settings
from workers.datasets import load_split

ZERO_ID = "0" * 24


@pytest.fixture(scope="module")
def http_client(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"store": str(tmp_path_factory.mktemp("store"))}))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        # GET and DELETE of a feature set are separate routes. HEAD comes with every GET.
        ("PUT", f"/v1/featuresets/{ZERO_ID}", "GET, HEAD, DELETE"),
        ("POST", f"/v1/featuresets/{ZERO_ID}", "GET, HEAD, DELETE"),
        # POST and GET of /v1/probes and /v1/projections come from separate routes too.
        ("PUT", "/v1/probes", "GET, HEAD, POST"),
        ("DELETE", "/v1/probes", "GET, HEAD, POST"),
        ("PATCH", "/v1/projections", "GET, HEAD, POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("GET", "/v1/pretrain", "POST"),
        ("DELETE", f"/v1/jobs/{ZERO_ID}/resume", "POST"),
    ],
)
def test_405_allow_lists_every_method(
    http_client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = http_client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    detail = response.json()["detail"]
    assert detail["message"] == f"{method} is not allowed on {path}; use {allowed}"
    assert detail["field"] is None
    assert detail["value"] is None


def test_405_allowed_method_still_routes(http_client: TestClient) -> None:
    # Each method that the 405 lists must reach its route, which returns 404 for this id.
    for method in ("GET", "DELETE"):
        response = http_client.request(method, f"/v1/featuresets/{ZERO_ID}")
        assert response.status_code == 404, (method, response.text)


def test_404_unknown_path_json_body(http_client: TestClient) -> None:
    response = http_client.put("/v1/no-such-route")
    assert response.status_code == 404
    assert "allow" not in response.headers
    assert response.json()["detail"]["message"].startswith("PUT /v1/no-such-route not found")


def test_trailing_slash_is_404_naming_path(http_client: TestClient) -> None:
    """No redirect, whose Location would come from the Host header: a 404 naming the path."""
    response = http_client.get(
        "/v1/featuresets/", headers={"Host": "elsewhere.invalid"}, follow_redirects=False
    )

    assert response.status_code == 404
    assert "location" not in response.headers
    message = response.json()["detail"]["message"]
    assert message.endswith("routes have no trailing slash; use /v1/featuresets")
    assert "elsewhere" not in message


def test_abandoned_job_error_names_job_id(http_client: TestClient, settings: Settings) -> None:
    """A job whose worker died with no retries left gives a resume hint with its own id."""
    redis = Redis.from_url(settings.redis_url)
    # Saved but never enqueued, so no worker runs it and it stays failed.
    rq_job = Job.create("workers.jobs.pretrain", args=("abandoned", {}), connection=redis)
    rq_job.save()
    rq_job.set_status(JobStatus.FAILED)
    Result.create_failure(
        rq_job,
        ttl=600,
        exc_string="Traceback (most recent call last):\nrq.exceptions.AbandonedJobError: lost",
    )
    job_id = new_job_id()
    save_job(redis, job_id, kind="pretrain", target="model-abandoned", rq_ids=[rq_job.id])
    try:
        response = http_client.get(f"/v1/jobs/{job_id}")
    finally:
        rq_job.delete()
        redis.delete(f"layerbank:job:{job_id}", "layerbank:target:model-abandoned")
        redis.close()

    assert response.status_code == 200
    state = response.json()
    assert state["status"] == "failed"
    message = state["error"]["message"]
    assert message.startswith("the worker running this job stopped")
    assert f"POST /v1/jobs/{job_id}/resume" in message
    assert "<job_id>" not in message


def _pretrain_params(**changes: Any) -> dict[str, Any]:
    """Return the settings of a default pretraining request, with ``changes`` applied."""
    return {**PretrainCreate(name="unused").model_dump(exclude={"name"}), **changes}


def test_pretrain_clash_names_stored_differences(
    http_client: TestClient, settings: Settings
) -> None:
    store = http_client.app.state.store  # type: ignore[attr-defined]
    fingerprint = load_split("digits", "train", allowed_roots=settings.data_roots).fingerprint
    model_dir = store.models_dir() / "clash-stored"
    model_dir.mkdir(parents=True)
    record = {"params": _pretrain_params(), "dataset_fingerprint": fingerprint}
    (model_dir / "layerbank.json").write_text(json.dumps(record))

    same = http_client.post("/v1/pretrain", json={"name": "clash-stored"})
    assert same.status_code == 200, same.text
    assert same.json()["status"] == "complete"

    response = http_client.post(
        "/v1/pretrain", json={"name": "clash-stored", "steps": 500, "n_layer": 2}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["field"] == "name"
    assert "store:clash-stored already exists with different settings" in detail["message"]
    assert "n_layer (stored 4, requested 2)" in detail["message"]
    assert "steps (stored 1000, requested 500)" in detail["message"]
    assert "batch_size" not in detail["message"]
    assert "dataset_fingerprint" not in detail["message"]

    # The same settings on dataset files that changed since the model was trained.
    record["dataset_fingerprint"] = "stale"
    (model_dir / "layerbank.json").write_text(json.dumps(record))
    response = http_client.post("/v1/pretrain", json={"name": "clash-stored"})
    assert response.status_code == 422
    message = response.json()["detail"]["message"]
    assert f"dataset_fingerprint (stored 'stale', requested {fingerprint!r})" in message
    assert "steps" not in message


def test_pretrain_clash_names_running_differences(
    http_client: TestClient, settings: Settings
) -> None:
    redis = Redis.from_url(settings.redis_url)
    # Saved as queued but never enqueued, so no worker takes it.
    rq_job = Job.create(
        "workers.jobs.pretrain", args=("clash-running", _pretrain_params()), connection=redis
    )
    rq_job.save()
    rq_job.set_status(JobStatus.QUEUED)
    job_id = new_job_id()
    save_job(redis, job_id, kind="pretrain", target="model-clash-running", rq_ids=[rq_job.id])
    try:
        response = http_client.post(
            "/v1/pretrain", json={"name": "clash-running", "learning_rate": 0.01}
        )
    finally:
        rq_job.delete()
        redis.delete(f"layerbank:job:{job_id}", "layerbank:target:model-clash-running")
        redis.close()

    assert response.status_code == 422
    message = response.json()["detail"]["message"]
    assert f"store:clash-running is being pretrained by job {job_id}" in message
    assert "learning_rate (running 0.001, requested 0.01)" in message
    assert "steps" not in message


def test_busy_error_is_503_with_retry_after() -> None:
    import asyncio

    from starlette.requests import Request

    from service.app import _domain_error
    from workers.errors import BusyError

    request = Request({"type": "http", "method": "POST", "path": "/v1/extractions", "headers": []})
    error = BusyError("dataset 'hf:x': busy; retry in a minute", field="dataset", value="hf:x")
    response = asyncio.run(_domain_error(request, error))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    assert b"retry in a minute" in response.body


@pytest.mark.parametrize("kind", ["probes", "projections"])
def test_result_without_spec_left_out(http_client: TestClient, kind: str) -> None:
    """A result group whose creation stopped before its spec was written is not served."""
    from store import Store

    store = Store(http_client.app.state.settings.store)  # type: ignore[attr-defined]
    result_id = new_job_id()
    store.write_result(kind, result_id, {"status": "complete"})

    listing = http_client.get(f"/v1/{kind}")
    single = http_client.get(f"/v1/{kind}/{result_id}")

    assert listing.status_code == 200, listing.text
    assert result_id not in listing.text
    assert single.status_code == 404, single.text
    assert single.json()["detail"]["value"] == result_id


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/v1/extractions/"), ("GET", "/v1/featuresets/%2F")],
)
def test_404_no_slash_hint_where_it_misleads(
    http_client: TestClient, method: str, path: str
) -> None:
    """No route takes DELETE on /v1/extractions, and %2F is an id, not a trailing slash."""
    response = http_client.request(method, path)

    assert response.status_code == 404
    assert "trailing slash" not in response.json()["detail"]["message"]


@pytest.mark.parametrize("state", ["metadata deleted", "spec not written"])
def test_featureset_list_skips_incomplete_group(http_client: TestClient, state: str) -> None:
    """A delete removes a set's files one by one, and a creation writes the spec last: a list
    that runs meanwhile leaves the set out instead of failing."""
    import zarr

    from tests.service.test_requeue import _pending_featureset

    store = http_client.app.state.store  # type: ignore[attr-defined]
    intact_set = _pending_featureset(Path(store.root))
    incomplete_set = _pending_featureset(Path(store.root))
    if state == "metadata deleted":
        (Path(store.root) / "featuresets" / incomplete_set.id / "zarr.json").unlink()
    else:
        zarr.open_group(store.zarr_store, path=f"featuresets/{incomplete_set.id}", mode="w")
    store.forget(incomplete_set.id)

    response = http_client.get("/v1/featuresets")

    assert response.status_code == 200, response.text
    listed = [entry["featureset_id"] for entry in response.json()["data"]]
    assert intact_set.id in listed
    assert incomplete_set.id not in listed
