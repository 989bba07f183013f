"""A feature set whose job failed, was canceled or is lost reads so, with the job and the fix."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from rq import Queue

from service.jobs import enqueue_extraction
from tests.conftest import wait_job
from tests.factories import pending_featureset, tiny_imagegpt


def _nan_model(path: Path) -> Path:
    """Save a tiny ImageGPT whose token embeddings are NaN, so every block write fails."""
    import torch
    from safetensors.torch import load_file, save_file

    tiny_imagegpt(path, seed=7)
    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    name = next(key for key in weights if key.endswith("wte.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, weights_file, metadata={"format": "pt"})
    return path


def _listed(api_url: str, featureset_id: str) -> dict[str, Any]:
    listing = httpx.get(f"{api_url}/v1/featuresets", timeout=30).json()
    return next(item for item in listing["data"] if item["featureset_id"] == featureset_id)


@pytest.fixture(scope="module")
def failed_extraction(client: Any, stack_dirs: dict[str, Path]) -> dict[str, Any]:
    model = _nan_model(stack_dirs["models"] / f"nan-igpt-{uuid.uuid4().hex[:6]}")
    answer = client.extract(str(model), "digits", "test", limit=20, block_rows=20)
    state = wait_job(client, answer["job_id"], timeout=240)
    assert state is not None
    assert state["status"] == "failed", state
    return {"featureset_id": answer["featureset_id"], "job_id": answer["job_id"], "state": state}


def test_failed_job_in_single_read(api_url: str, failed_extraction: dict[str, Any]) -> None:
    featureset_id = failed_extraction["featureset_id"]
    job_id = failed_extraction["job_id"]
    body = httpx.get(f"{api_url}/v1/featuresets/{featureset_id}", timeout=30).json()
    assert body["status"] == "failed"
    assert body["job_id"] == job_id
    assert body["error"]["message"] == failed_extraction["state"]["error"]["message"]
    assert "/resume" not in body["hint"]
    assert "fix what the error names" in body["hint"]
    assert "send the same POST /v1/extractions again" in body["hint"]


def test_permanent_failure_hint_matches_resume(
    api_url: str, failed_extraction: dict[str, Any]
) -> None:
    """The hint does not offer a resume that the resume route rejects."""
    featureset_id = failed_extraction["featureset_id"]
    job_id = failed_extraction["job_id"]
    hint = httpx.get(f"{api_url}/v1/featuresets/{featureset_id}", timeout=30).json()["hint"]
    response = httpx.post(f"{api_url}/v1/jobs/{job_id}/resume", timeout=30)
    assert response.status_code == 409
    assert "a resume would repeat it" in response.json()["detail"]["message"]
    assert "resume" not in hint.replace("a resume would repeat", "")


def test_failed_job_in_list(api_url: str, failed_extraction: dict[str, Any]) -> None:
    featureset_id = failed_extraction["featureset_id"]
    job_id = failed_extraction["job_id"]
    listed = _listed(api_url, featureset_id)
    assert listed["status"] == "failed"
    assert listed["job_id"] == job_id
    assert listed["error"]["message"] == failed_extraction["state"]["error"]["message"]
    assert (
        listed["hint"]
        == httpx.get(f"{api_url}/v1/featuresets/{featureset_id}", timeout=30).json()["hint"]
    )


def test_layer_conflict_uses_same_hint(api_url: str, failed_extraction: dict[str, Any]) -> None:
    featureset_id = failed_extraction["featureset_id"]
    hint = httpx.get(f"{api_url}/v1/featuresets/{featureset_id}", timeout=30).json()["hint"]
    response = httpx.get(f"{api_url}/v1/featuresets/{featureset_id}/layers/0", timeout=30)
    assert response.status_code == 409
    assert response.json()["detail"]["message"].endswith(hint)


def test_probe_pairs_of_failed_set_use_same_hint(
    api_url: str, failed_extraction: dict[str, Any]
) -> None:
    """The dashboard's pair list names a failed train set's status as the set's read does."""
    featureset_id = failed_extraction["featureset_id"]
    read = httpx.get(f"{api_url}/v1/featuresets/{featureset_id}", timeout=30).json()
    response = httpx.get(
        f"{api_url}/dashboard/probe-pairs", params={"train": featureset_id}, timeout=30
    )
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert detail["field"] == "train"
    assert "pending" not in detail["message"]
    assert detail["message"].endswith(read["hint"])


def test_queued_job_reads_pending(api_url: str, redis_server: Any, settings: Any) -> None:
    redis = Redis.from_url(redis_server.url)
    # A queue no worker listens to, so the job stays queued.
    queue = Queue(f"idle-{uuid.uuid4().hex[:8]}", connection=redis)
    featureset = pending_featureset(
        Path(settings.store), n_items=4, dim=3, fingerprint=uuid.uuid4().hex[:16]
    )
    job_id = enqueue_extraction(queue, featureset, timeout=60)
    try:
        body = httpx.get(f"{api_url}/v1/featuresets/{featureset.id}", timeout=30).json()
        assert body["status"] == "pending"
        assert body["job_id"] == job_id
        assert body["error"] is None
        assert f"wait for its job {job_id}" in body["hint"]
        assert _listed(api_url, featureset.id)["status"] == "pending"
    finally:
        queue.empty()
        redis.close()


def test_retryable_failure_hint_offers_resume(
    api_url: str, redis_server: Any, settings: Any
) -> None:
    """For a job that failed on an error a rerun may not repeat, the hint offers a resume."""
    from rq.job import Job, JobStatus

    redis = Redis.from_url(redis_server.url)
    # A queue no worker listens to: the block job is marked failed here instead of by a worker.
    queue = Queue(f"idle-{uuid.uuid4().hex[:8]}", connection=redis)
    featureset = pending_featureset(
        Path(settings.store), n_items=4, dim=3, fingerprint=uuid.uuid4().hex[:16]
    )
    job_id = enqueue_extraction(queue, featureset, timeout=60)
    try:
        rq_job = Job.fetch(queue.get_job_ids()[0], connection=redis)
        rq_job.meta["error"] = {
            "message": "ConnectionError: the Hub did not respond",
            "field": None,
            "value": None,
            "type": "ConnectionError",
            "permanent": False,
        }
        rq_job.save_meta()
        queue.remove(rq_job.id)
        rq_job.set_status(JobStatus.FAILED)
        body = httpx.get(f"{api_url}/v1/featuresets/{featureset.id}", timeout=30).json()
        assert body["status"] == "failed"
        assert body["job_id"] == job_id
        assert f"resume it with POST /v1/jobs/{job_id}/resume" in body["hint"]
    finally:
        queue.empty()
        redis.close()


def test_set_without_job_reads_failed(api_url: str, settings: Any) -> None:
    """A set whose job was never queued, or whose record was lost, reads failed with the fix."""
    featureset = pending_featureset(
        Path(settings.store), n_items=4, dim=3, fingerprint=uuid.uuid4().hex[:16]
    )
    body = httpx.get(f"{api_url}/v1/featuresets/{featureset.id}", timeout=30).json()
    assert body["status"] == "failed"
    assert body["job_id"] is None
    assert body["error"]["message"]
    assert "send the same POST /v1/extractions again" in body["hint"]
    assert _listed(api_url, featureset.id)["status"] == "failed"


def test_set_being_created_reads_pending(api_url: str, redis_server: Any, settings: Any) -> None:
    """While a request holds the feature set's lock to queue its job, the set is pending."""
    from service.jobs import target_lock

    featureset = pending_featureset(
        Path(settings.store), n_items=4, dim=3, fingerprint=uuid.uuid4().hex[:16]
    )
    redis = Redis.from_url(redis_server.url)
    try:
        with target_lock(redis, featureset.id):
            body = httpx.get(f"{api_url}/v1/featuresets/{featureset.id}", timeout=30).json()
        assert body["status"] == "pending"
        assert body["job_id"] is None
        assert body["error"] is None
    finally:
        redis.close()


def test_complete_set_has_no_hint(api_url: str, digits_featuresets: dict[str, str]) -> None:
    body = httpx.get(f"{api_url}/v1/featuresets/{digits_featuresets['test']}", timeout=30).json()
    assert body["status"] == "complete"
    assert body["error"] is None
    assert body["hint"] is None


def test_replaced_failed_job_points_to_newer_job(client: Any, stack_dirs: dict[str, Path]) -> None:
    """A failed job whose work a later request took over names the newer job, not a resume."""
    model = _nan_model(stack_dirs["models"] / f"nan-igpt-{uuid.uuid4().hex[:6]}")
    first = client.extract(str(model), "digits", "test", limit=21, block_rows=21)
    state = wait_job(client, first["job_id"], timeout=240)
    assert state is not None
    assert state["status"] == "failed", state
    second = client.extract(str(model), "digits", "test", limit=21, block_rows=21)
    assert second["job_id"] != first["job_id"]
    old = client.request("GET", f"/v1/jobs/{first['job_id']}").json()
    assert old["status"] == "failed"
    assert f"GET /v1/jobs/{second['job_id']}" in old["error"]["message"]
    assert "/resume" not in old["error"]["message"]
    wait_job(client, second["job_id"], timeout=240)
