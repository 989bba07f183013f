"""Error responses of the app: routing errors (404, 405) and the error of a failed job."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job, JobStatus
from rq.results import Result

from service.app import create_app
from service.jobs import new_job_id, save_job
from store.settings import Settings

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
        # GET and DELETE of a feature set are separate routes.
        ("PUT", f"/v1/featuresets/{ZERO_ID}", "GET, DELETE"),
        ("POST", f"/v1/featuresets/{ZERO_ID}", "GET, DELETE"),
        # POST and GET of /v1/probes and /v1/projections come from separate routes too.
        ("PUT", "/v1/probes", "GET, POST"),
        ("DELETE", "/v1/probes", "GET, POST"),
        ("PATCH", "/v1/projections", "GET, POST"),
        ("POST", "/healthz", "GET"),
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
