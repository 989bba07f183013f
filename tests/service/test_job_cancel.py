"""POST /v1/jobs/{id}/cancel and `layerbank cancel` against the session's API and real workers."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis import Redis
from rq import Queue
from rq.executions import ExecutionRegistry
from rq.job import Job, JobStatus
from typer.testing import CliRunner

from service.cli import app
from service.client import Client, ClientError
from service.jobs import (
    BLOCK_RETRIES,
    _cancel_waiting,
    busy_job,
    clear_cancel,
    enqueue_extraction,
    enqueue_single,
    job_state,
    load_job,
    request_cancel,
)
from service.routes.fsck import repair_featureset
from store import NotReadyError, Store
from tests.conftest import rq_starts, wait_job
from tests.service.test_requeue import _pending_featureset

ZERO_ID = "0" * 24
ENDED = ("finished", "failed", "canceled")
# rq statuses of a job that a worker may still take or still runs.
PENDING = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED)


@pytest.fixture(scope="module")
def redis(redis_server: Any) -> Iterator[Redis]:
    connection = Redis.from_url(redis_server.url)
    yield connection
    connection.close()


def _cancel(client: Client, job_id: str) -> Any:
    return client.request("POST", f"/v1/jobs/{job_id}/cancel")


def _rq_statuses(redis: Redis, job_id: str) -> list[JobStatus | None]:
    jobs = Job.fetch_many(load_job(redis, job_id)["rq_ids"], connection=redis)
    return [job.get_status(refresh=False) if job else None for job in jobs]


def _wait_rq_idle(redis: Redis, job_id: str, timeout: float = 30.0) -> list[JobStatus | None]:
    """Wait until no rq job of ``job_id`` is queued or running; return their statuses."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = _rq_statuses(redis, job_id)
        if not any(status in PENDING for status in statuses):
            return statuses
        if time.monotonic() > deadline:
            raise TimeoutError(f"rq jobs of job {job_id} still pending: {statuses}")
        time.sleep(0.1)


def _wait_rq_started(redis: Redis, job_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while JobStatus.STARTED not in _rq_statuses(redis, job_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no rq job of job {job_id} started within {timeout}s")
        time.sleep(0.05)


def _idle_probe_job(redis: Redis) -> tuple[Queue, str, str]:
    """Queue a probe job for a new probe id on a queue no worker serves, so it stays queued.

    Returns the queue (the test deletes it at the end), the probe id and the job id.
    """
    probe_id = uuid.uuid4().hex[:24]
    queue = Queue(f"idle-{uuid.uuid4().hex[:8]}", connection=redis)
    job_id = enqueue_single(
        queue, "workers.jobs.run_probe", (probe_id,), kind="probe", target=probe_id, timeout=60
    )
    return queue, probe_id, job_id


def _slow_extraction(client: Client, model: Path, split: str, limit: int, seed: int) -> Any:
    """Queue an extraction of blocks of 20 rows, one image per forward pass.

    Each block runs 20 forward passes, so most blocks are still queued when the test cancels
    the job right after this returns. ``seed`` selects the subset, which keeps the
    feature set ids of these tests apart from those of other tests.
    """
    return client.extract(
        str(model),
        "digits",
        split,
        layers="all",
        limit=limit,
        seed=seed,
        block_rows=20,
        batch_size=1,
    )


def test_cancel_queued_extraction_then_resume(
    client: Client, redis: Redis, tiny_model: Path, stack_dirs: dict[str, Path]
) -> None:
    answer = _slow_extraction(client, tiny_model, "train", limit=600, seed=9101)  # 30 blocks
    job_id, featureset_id = answer["job_id"], answer["featureset_id"]

    response = _cancel(client, job_id)

    assert response.status_code == 202
    canceled = response.json()
    assert canceled["status"] == "canceled"
    assert canceled["error"]["message"].startswith("canceled by request at ")
    assert f"POST /v1/jobs/{job_id}/resume" in canceled["error"]["message"]
    statuses = _wait_rq_idle(redis, job_id)
    assert client.job(job_id)["status"] == "canceled"
    summary = client.featureset(featureset_id)
    assert summary["status"] != "complete"
    written = summary["progress"]["blocks_done"]
    assert written < 30
    # Each block was either written before the cancel took effect, canceled in rq, or taken
    # by a worker between the cancel's record and its rq cancel, which then stopped it at its
    # first check (failed with the cancel error; rq may also have marked it canceled). The
    # finalize job was canceled in rq.
    assert statuses[-1] == JobStatus.CANCELED
    assert statuses.count(JobStatus.FINISHED) == written, statuses
    stopped = Job.fetch_many(load_job(redis, job_id)["rq_ids"], connection=redis)
    for job, status in zip(stopped, statuses, strict=True):
        if status == JobStatus.FAILED:
            assert job is not None and job.meta["error"]["type"] == "JobCanceledError", job
    failed = [s for s in statuses if s == JobStatus.FAILED]
    assert statuses.count(JobStatus.CANCELED) + len(failed) == 30 - written + 1, statuses
    with pytest.raises(ClientError) as not_ready:
        client.layer_array(featureset_id, 0)
    assert not_ready.value.status_code == 409
    # The 409 names the canceled job and its resume, not a wait for a job that will not run.
    assert f"its job {job_id} is canceled" in str(not_ready.value)
    assert f"POST /v1/jobs/{job_id}/resume" in str(not_ready.value)

    resumed = client.request("POST", f"/v1/jobs/{job_id}/resume")

    assert resumed.status_code == 202
    # A resume keeps the time the job was created.
    assert resumed.json()["created"] == canceled["created"]
    assert resumed.json()["status"] in ("queued", "running")
    # Only the blocks missing at the resume are queued, plus one finalize job.
    assert len(load_job(redis, job_id)["rq_ids"]) == 30 - written + 1
    final = wait_job(client, job_id, timeout=120)
    assert final is not None and final["status"] == "finished", final
    assert client.featureset(featureset_id)["status"] == "complete"

    # The same weights under another path give another feature set, extracted without a cancel.
    copy = stack_dirs["models"] / f"tiny-igpt-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_model, copy)
    reference = _slow_extraction(client, copy, "train", limit=600, seed=9101)
    assert reference["featureset_id"] != featureset_id
    done = wait_job(client, reference["job_id"], timeout=120)
    assert done is not None and done["status"] == "finished", done
    for layer in range(3):
        np.testing.assert_array_equal(
            client.layer_array(featureset_id, layer),
            client.layer_array(reference["featureset_id"], layer),
        )


def test_cancel_running_pretraining_stops(
    client: Client, redis: Redis, settings: Any, stack_dirs: dict[str, Path]
) -> None:
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    job_id = client.pretrain(
        name,
        n_layer=1,
        n_embd=16,
        n_head=1,
        n_colors=4,
        batch_size=4,
        steps=1_000_000,
        eval_every=1_000_000,
        checkpoint_every=20,
    )["job_id"]
    models_dir = Store(settings.store).models_dir()
    try:
        _wait_rq_started(redis, job_id)
        # Steps are running once a step checkpoint exists.
        deadline = time.monotonic() + 60
        while not list(models_dir.glob(f".{name}.*.checkpoints/step-20")):
            assert time.monotonic() < deadline, "pretraining wrote no step checkpoint"
            time.sleep(0.05)
        # Its checkpoints are listed once it ends: until then a 409 names the running job.
        with pytest.raises(ClientError) as listing:
            client.request("GET", f"/v1/models/{name}/checkpoints")
        assert listing.value.status_code == 409
        assert listing.value.detail["field"] == "name"
        assert job_id in listing.value.detail["message"]

        started = time.monotonic()
        response = _cancel(client, job_id)
        statuses = _wait_rq_idle(redis, job_id, timeout=15)
        stopped_after = time.monotonic() - started

        assert response.status_code == 202
        assert response.json()["status"] == "canceled"
        assert stopped_after < 8, stopped_after
        # The rq job failed and was not retried: it started once.
        assert statuses == [JobStatus.FAILED]
        assert rq_starts(stack_dirs["logs"], load_job(redis, job_id)["rq_ids"][0]) == 1
        state = client.job(job_id)
        assert state["status"] == "canceled"
        assert f"POST /v1/jobs/{job_id}/resume" in state["error"]["message"]
        assert not (models_dir / name).exists()
        assert list(models_dir.glob(f".{name}.*")) == []

        # A resume deletes the cancel time: the run starts again and keeps running.
        resumed = client.request("POST", f"/v1/jobs/{job_id}/resume")
        assert resumed.status_code == 202
        assert resumed.json()["status"] in ("queued", "running")
        # The resumed run may be retried after a worker dies, as a new job may.
        rq_job = Job.fetch(load_job(redis, job_id)["rq_ids"][0], connection=redis)
        assert rq_job.retries_left == BLOCK_RETRIES
        _wait_rq_started(redis, job_id)
        time.sleep(1.5)
        assert _rq_statuses(redis, job_id) == [JobStatus.STARTED]
        assert client.job(job_id)["status"] == "running"
    finally:
        _cancel(client, job_id)
        _wait_rq_idle(redis, job_id, timeout=15)
    assert client.job(job_id)["status"] == "canceled"


def test_cancel_running_adapter_stops_within_layer(
    client: Client, redis: Redis, digits_featuresets: dict[str, str]
) -> None:
    """An adapter probe checks for a cancel each epoch, not only after each layer."""
    answer = client.probe(
        digits_featuresets["train"],
        digits_featuresets["test"],
        kind="adapter",
        layers=[1],
        params={"epochs": 10_000, "bottleneck": 4},
        seed=int(uuid.uuid4().int % 2**31),  # a new probe id, so the run starts fresh
    )
    job_id = answer["job_id"]
    try:
        _wait_rq_started(redis, job_id)
        time.sleep(2.0)  # well inside the layer's first epochs
        started = time.monotonic()
        response = _cancel(client, job_id)
        statuses = _wait_rq_idle(redis, job_id, timeout=60)
        stopped_after = time.monotonic() - started
    finally:
        _cancel(client, job_id)
    assert response.status_code == 202
    assert statuses == [JobStatus.FAILED]
    assert stopped_after < 30, stopped_after
    assert client.job(job_id)["status"] == "canceled"


def test_cancel_of_short_running_probe_stays_canceled(
    client: Client, redis: Redis, digits_featuresets: dict[str, str]
) -> None:
    """A cancel that reaches a short probe between two cancel checks keeps the job canceled:
    the worker reads the cancel time again before it writes the result."""
    landed = 0
    for _ in range(3):
        answer = client.probe(
            digits_featuresets["train"],
            digits_featuresets["test"],
            kind="logistic",
            layers=[0, 1, 2],
            params={"engine": "torch", "C": [0.01, 0.1, 1.0, 10.0, 100.0]},
            seed=int(uuid.uuid4().int % 2**31),  # a new probe id, so the fit runs
        )
        job_id = answer["job_id"]
        _wait_rq_started(redis, job_id)
        time.sleep(0.3)  # past the fit's first cancel check, which reads at once
        response = _cancel(client, job_id)
        _wait_rq_idle(redis, job_id, timeout=60)
        state = client.job(job_id)
        if response.json()["status"] == "canceled":
            landed += 1
            assert state["status"] == "canceled", state
            assert client.probe_result(answer["probe_id"])["status"] == "canceled"
    assert landed > 0, "every cancel arrived after its probe had finished"


def test_cancel_finished_job_is_200_unchanged(client: Client) -> None:
    answer = client.extract("pixels", "digits", "test", limit=40, seed=9102, block_rows=20)
    before = wait_job(client, answer["job_id"], timeout=60)
    assert before is not None and before["status"] == "finished", before

    response = _cancel(client, answer["job_id"])

    assert response.status_code == 200
    assert response.json() == before
    assert client.job(answer["job_id"]) == before


def test_cancel_unknown_job_is_404(client: Client) -> None:
    with pytest.raises(ClientError) as info:
        client.cancel(ZERO_ID)
    assert info.value.status_code == 404
    assert info.value.detail["field"] == "job_id"
    assert info.value.detail["value"] == ZERO_ID
    assert "not found" in info.value.detail["message"]


def test_cancel_malformed_job_id_names_field(client: Client) -> None:
    with pytest.raises(ClientError) as info:
        client.cancel("not-a-job-id")
    assert 400 <= info.value.status_code < 500
    assert info.value.detail["field"] == "job_id"
    assert info.value.detail["value"] == "not-a-job-id"


def test_canceled_extraction_allows_new_post_and_delete(
    client: Client, redis: Redis, tiny_model: Path
) -> None:
    first = _slow_extraction(client, tiny_model, "test", limit=450, seed=9103)
    assert _cancel(client, first["job_id"]).json()["status"] == "canceled"
    _wait_rq_idle(redis, first["job_id"])

    again = _slow_extraction(client, tiny_model, "test", limit=450, seed=9103)

    assert again["featureset_id"] == first["featureset_id"]
    assert again["job_id"] != first["job_id"]
    assert again["created"] is False
    assert again["status"] == "queued"
    assert _cancel(client, again["job_id"]).json()["status"] == "canceled"
    _wait_rq_idle(redis, again["job_id"])
    before = client.job(again["job_id"])["progress"]
    response = client.request("DELETE", f"/v1/featuresets/{first['featureset_id']}")
    assert response.status_code == 204
    with pytest.raises(ClientError) as gone:
        client.featureset(first["featureset_id"])
    assert gone.value.status_code == 404
    # The canceled job now points to a new POST, since a resume has no feature set to fill.
    orphan = client.job(again["job_id"])
    assert orphan["status"] == "canceled"
    assert "send the same POST /v1/extractions again" in orphan["error"]["message"]
    assert orphan["error"]["field"] == "featureset_id"
    # The progress is the set's at the delete, not an empty 0 of 0.
    assert orphan["progress"] == before
    assert orphan["progress"]["total"] > 0
    with pytest.raises(ClientError) as refused:
        client.request("POST", f"/v1/jobs/{again['job_id']}/resume")
    assert refused.value.status_code == 409
    assert refused.value.detail["field"] == "featureset_id"
    assert refused.value.detail["value"] == first["featureset_id"]
    assert "send the same POST /v1/extractions again" in refused.value.detail["message"]


def test_resume_after_newer_completed_set(client: Client, redis: Redis, tiny_model: Path) -> None:
    """The same POST sent after a cancel started a job that completed the feature set. The
    canceled job stays canceled and its resume is rejected instead of reading finished."""
    first = _slow_extraction(client, tiny_model, "test", limit=200, seed=9106)  # 10 blocks
    featureset_id = first["featureset_id"]
    assert _cancel(client, first["job_id"]).json()["status"] == "canceled"
    _wait_rq_idle(redis, first["job_id"])
    rq_ids = load_job(redis, first["job_id"])["rq_ids"]
    again = _slow_extraction(client, tiny_model, "test", limit=200, seed=9106)
    assert again["job_id"] != first["job_id"]
    done = wait_job(client, again["job_id"], timeout=120)
    assert done is not None and done["status"] == "finished", done
    assert client.featureset(featureset_id)["status"] == "complete"

    # The old job reads canceled, pointing to the job that did the work.
    state = client.job(first["job_id"])
    assert state["status"] == "canceled"
    assert f"follow GET /v1/jobs/{again['job_id']}" in state["error"]["message"]
    with pytest.raises(ClientError) as refused:
        client.request("POST", f"/v1/jobs/{first['job_id']}/resume")

    assert refused.value.status_code == 409
    detail = refused.value.detail
    assert detail["field"] == "job_id"
    assert detail["value"] == first["job_id"]
    assert f"superseded by job {again['job_id']}" in detail["message"]
    assert "(status finished)" in detail["message"]
    # The rejected resume queued nothing and kept the cancel.
    record = load_job(redis, first["job_id"])
    assert record["rq_ids"] == rq_ids
    assert "canceled" in record


def test_canceled_job_busy_while_block_runs(redis: Redis, tmp_path: Path) -> None:
    # A queue no worker listens to: the test decides which rq job counts as started.
    queue = Queue(f"cancel-{uuid.uuid4().hex[:8]}", connection=redis)
    store = Store(tmp_path / "store")
    featureset = _pending_featureset(tmp_path / "store")  # four blocks
    job_id = enqueue_extraction(queue, featureset, timeout=60)
    rq_jobs = Job.fetch_many(load_job(redis, job_id)["rq_ids"], connection=redis)
    running = rq_jobs[0]
    assert running is not None
    queue.remove(running.id)
    running.set_status(JobStatus.STARTED)

    assert request_cancel(redis, job_id) == 4  # three blocks and the finalize job

    state = job_state(redis, store, job_id)
    assert state["status"] == "canceled"
    assert "1 rq jobs that had started still run" in state["error"]["message"]
    assert _rq_statuses(redis, job_id) == [JobStatus.STARTED] + [JobStatus.CANCELED] * 4
    assert queue.count == 0
    assert busy_job(redis, store, featureset.id) == (job_id, "canceled but still running")
    # fsck with repair could clear the flags of the block that is still being written.
    with pytest.raises(NotReadyError, match="canceled but still running"):
        repair_featureset(featureset.id, store, redis)
    running.set_status(JobStatus.FINISHED)
    assert busy_job(redis, store, featureset.id) is None
    repaired = repair_featureset(featureset.id, store, redis)
    assert repaired.featureset_id == featureset.id

    clear_cancel(redis, job_id)
    assert job_state(redis, store, job_id)["status"] != "canceled"
    queue.delete(delete_jobs=True)


runner = CliRunner()


def _run_cli(api_url: str, *args: str) -> Any:
    return runner.invoke(app, [*args, "--url", api_url], catch_exceptions=False)


def test_cli_cancel_prints_status(
    api_url: str, client: Client, redis: Redis, tiny_model: Path
) -> None:
    answer = _slow_extraction(client, tiny_model, "test", limit=460, seed=9104)
    job_id = answer["job_id"]

    result = _run_cli(api_url, "cancel", job_id, "--json")

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "canceled"
    _wait_rq_idle(redis, job_id)
    again = _run_cli(api_url, "cancel", job_id)
    assert again.exit_code == 0, again.stderr
    assert "canceled" in again.stdout
    jobs_result = _run_cli(api_url, "jobs", job_id)
    assert jobs_result.exit_code == 1
    assert f"error: job {job_id} canceled by request at " in jobs_result.stderr
    missing = _run_cli(api_url, "cancel", ZERO_ID)
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: HTTP 404: ")
    assert missing.stderr.count("\n") == 1


def test_client_wait_raises_on_canceled_job(client: Client, redis: Redis, tiny_model: Path) -> None:
    from service.client import JobCanceledError

    answer = _slow_extraction(client, tiny_model, "train", limit=900, seed=9105)
    client.cancel(answer["job_id"])
    _wait_rq_idle(redis, answer["job_id"])

    with pytest.raises(JobCanceledError) as info:
        client.wait(answer["job_id"], timeout=10)
    assert f"job {answer['job_id']} was canceled: canceled by request at " in str(info.value)
    assert client.job(answer["job_id"])["status"] in ENDED


def test_resume_of_superseded_canceled_probe_is_200(
    client: Client, redis: Redis, stack_dirs: dict[str, Path]
) -> None:
    """A canceled probe job whose result a later job completed has nothing left to resume."""
    queue, probe_id, job_id = _idle_probe_job(redis)
    assert _cancel(client, job_id).json()["status"] == "canceled"
    Store(stack_dirs["store"]).write_result("probes", probe_id, {"status": "complete"})

    response = client.request("POST", f"/v1/jobs/{job_id}/resume")

    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert queue.count == 0
    queue.delete(delete_jobs=True)


def test_resume_of_job_superseded_by_newer_is_409(client: Client, redis: Redis) -> None:
    """A later request for the same probe started a newer job: resuming the canceled one
    would compute the result twice at once, so the resume names the newer job instead."""
    queue, probe_id, job_id = _idle_probe_job(redis)
    assert _cancel(client, job_id).json()["status"] == "canceled"
    newer = enqueue_single(
        queue, "workers.jobs.run_probe", (probe_id,), kind="probe", target=probe_id, timeout=60
    )

    with pytest.raises(ClientError) as refused:
        client.request("POST", f"/v1/jobs/{job_id}/resume")

    assert refused.value.status_code == 409
    assert refused.value.detail["field"] == "job_id"
    assert f"superseded by job {newer}" in refused.value.detail["message"]
    assert "status queued" in refused.value.detail["message"]
    superseded = client.job(job_id)
    assert superseded["status"] == "canceled"
    assert f"follow GET /v1/jobs/{newer} instead" in superseded["error"]["message"]
    assert "/resume" not in superseded["error"]["message"]
    assert queue.count == 1
    queue.delete(delete_jobs=True)


def test_list_jobs_newest_first_and_filtered(client: Client, redis: Redis) -> None:
    # Jobs on a queue no worker serves stay queued until the test cancels them.
    queue = Queue(f"list-{uuid.uuid4().hex[:8]}", connection=redis)
    probe_target, projection_target = uuid.uuid4().hex[:24], uuid.uuid4().hex[:24]
    older = enqueue_single(
        queue,
        "workers.jobs.run_probe",
        (probe_target,),
        kind="probe",
        target=probe_target,
        timeout=60,
    )
    newer = enqueue_single(
        queue,
        "workers.jobs.run_projection",
        (projection_target,),
        kind="projection",
        target=projection_target,
        timeout=60,
    )
    _cancel(client, older)

    def listed(**params: Any) -> list[dict[str, Any]]:
        answer = client.request("GET", "/v1/jobs", params={"limit": 1000, **params}).json()
        assert answer["count"] == len(answer["data"])
        return answer["data"]

    every = [job["job_id"] for job in listed()]
    assert every.index(newer) < every.index(older)
    canceled = listed(status="canceled")
    assert older in [job["job_id"] for job in canceled]
    assert {job["status"] for job in canceled} == {"canceled"}
    projections = listed(kind="projection")
    assert newer in [job["job_id"] for job in projections]
    assert {job["kind"] for job in projections} == {"projection"}
    assert len(client.request("GET", "/v1/jobs", params={"limit": 1}).json()["data"]) == 1
    with pytest.raises(ClientError) as bad:
        client.request("GET", "/v1/jobs", params={"status": "done"})
    assert bad.value.status_code == 422
    assert bad.value.detail["field"] == "status"
    _cancel(client, newer)
    queue.delete(delete_jobs=True)


def test_last_block_completes_set_without_finalize(
    client: Client, redis: Redis, tiny_model: Path
) -> None:
    """rq may hold back a finalize job whose dependencies finished; the block job that writes
    the last block marks the set complete itself."""
    answer = _slow_extraction(client, tiny_model, "test", limit=40, seed=9231)
    finalize = Job.fetch(load_job(redis, answer["job_id"])["rq_ids"][-1], connection=redis)
    assert finalize.description.startswith("finalize")
    finalize.cancel()

    deadline = time.monotonic() + 120
    while client.featureset(answer["featureset_id"])["status"] != "complete":
        assert time.monotonic() < deadline, client.featureset(answer["featureset_id"])
        time.sleep(0.2)

    assert finalize.get_status(refresh=True) == JobStatus.CANCELED
    assert client.job(answer["job_id"])["status"] == "finished"


@pytest.mark.parametrize("deleted", ["result", "featureset"])
def test_resume_with_deleted_input_is_409(
    client: Client, redis: Redis, stack_dirs: dict[str, Path], deleted: str
) -> None:
    """A canceled probe whose result or feature set was deleted cannot run again, so the
    resume returns 409 at once instead of queueing a run that fails. The job in the URL
    exists, so it is no 404."""
    queue, probe_id, job_id = _idle_probe_job(redis)
    featureset_id = uuid.uuid4().hex[:24]
    if deleted == "featureset":
        spec = {"train_featureset": featureset_id, "test_featureset": featureset_id}
        Store(stack_dirs["store"]).write_result("probes", probe_id, {"spec": spec})
    assert _cancel(client, job_id).json()["status"] == "canceled"

    with pytest.raises(ClientError) as caught:
        client.request("POST", f"/v1/jobs/{job_id}/resume")

    assert caught.value.status_code == 409
    expected = {"result": ("probe_id", probe_id), "featureset": ("featureset_id", featureset_id)}
    field, value = expected[deleted]
    assert caught.value.detail["field"] == field
    assert caught.value.detail["value"] == value
    assert "POST /v1/probes again" in caught.value.detail["message"]
    assert queue.count == 0
    queue.delete(delete_jobs=True)


def test_canceled_probe_without_result_says_not_resumable(client: Client, redis: Redis) -> None:
    """A canceled probe job whose result was deleted does not advise a resume that would fail."""
    queue, probe_id, job_id = _idle_probe_job(redis)

    error = _cancel(client, job_id).json()["error"]

    assert "cannot be resumed" in error["message"]
    assert "/resume" not in error["message"]
    assert error["field"] == "probe_id"
    assert error["value"] == probe_id
    queue.delete(delete_jobs=True)


def test_probe_job_finished_after_rq_forgets_it(
    client: Client, redis: Redis, stack_dirs: dict[str, Path]
) -> None:
    """rq deletes a finished job after its result TTL; the job still reads finished while its
    result is complete, not failed as if it had been lost."""
    queue, probe_id, job_id = _idle_probe_job(redis)
    Job.fetch(load_job(redis, job_id)["rq_ids"][0], connection=redis).delete()
    lost = client.job(job_id)
    Store(stack_dirs["store"]).write_result("probes", probe_id, {"status": "complete"})

    finished = client.job(job_id)

    assert lost["status"] == "failed"
    assert finished["status"] == "finished"
    assert finished["error"] is None
    queue.delete(delete_jobs=True)


def test_resume_resets_progress_and_retries(
    client: Client, redis: Redis, stack_dirs: dict[str, Path]
) -> None:
    """The resumed run starts over: its progress reads 0 of the same total until it reports."""
    # The resumed job stays queued while the test reads it.
    queue, probe_id, job_id = _idle_probe_job(redis)
    rq_job = Job.fetch(load_job(redis, job_id)["rq_ids"][0], connection=redis)
    rq_job.meta["progress"] = {"done": 3, "total": 5}
    rq_job.save_meta()
    canceled = _cancel(client, job_id).json()["progress"]
    assert (canceled["done"], canceled["total"]) == (3, 5)
    # A result record as the probe POST writes it, so the resume finds its input.
    Store(stack_dirs["store"]).write_result("probes", probe_id, {"spec": {}})

    resumed = client.request("POST", f"/v1/jobs/{job_id}/resume")

    assert resumed.status_code == 202, resumed.text
    progress = resumed.json()["progress"]
    assert (progress["done"], progress["total"]) == (0, 5)
    assert Job.fetch(rq_job.id, connection=redis).retries_left == BLOCK_RETRIES
    queue.delete(delete_jobs=True)


def test_cancel_of_rq_job_starting_meanwhile(redis: Redis) -> None:
    """A worker takes the rq job after the cancel fetched its rq jobs, and rq has not written
    the execution yet: the cancel leaves that rq job to the worker instead of failing."""
    queue = Queue(f"idle-{uuid.uuid4().hex[:8]}", connection=redis)
    rq_job = queue.enqueue("workers.jobs.run_probe", "0" * 24)
    read_by_cancel = Job.fetch(rq_job.id, connection=redis)
    # What a worker has written when it starts the job: the status and the job's execution
    # registry entry, whose execution hash comes next.
    rq_job.set_status(JobStatus.STARTED)
    executions = ExecutionRegistry(rq_job.id, connection=redis)
    redis.zadd(executions.key, {uuid.uuid4().hex: time.time() + 60})

    assert _cancel_waiting(read_by_cancel) is False

    assert rq_job.get_status(refresh=True) == JobStatus.STARTED
    queue.delete(delete_jobs=True)
    redis.delete(executions.key)


def test_finalize_of_deleted_set_finishes(redis: Redis, settings: Any) -> None:
    """rq can run a held-back finalize job after its feature set was deleted: it ends without
    an error, as there is nothing left to finalize."""
    queue = Queue(settings.queue, connection=redis)
    rq_job = queue.enqueue("workers.jobs.finalize_featureset", uuid.uuid4().hex[:24])

    deadline = time.monotonic() + 60
    while rq_job.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED):
        assert time.monotonic() < deadline, rq_job.get_status()
        time.sleep(0.1)

    assert rq_job.get_status() == JobStatus.FINISHED, rq_job.meta.get("error")
    assert rq_job.return_value()["status"] == "deleted"


def test_new_post_while_canceled_job_stops_is_409(client: Client, redis: Redis) -> None:
    """A canceled pretraining whose rq job still runs would train beside a new job for the same
    name, so the same POST is a 409 until the canceled run has stopped."""
    name = f"stopping-{uuid.uuid4().hex[:8]}"
    queue = Queue(f"idle-{uuid.uuid4().hex[:8]}", connection=redis)
    job_id = enqueue_single(
        queue,
        "workers.jobs.pretrain",
        (name, {}),
        kind="pretrain",
        target=f"model-{name}",
        timeout=60,
    )
    # A worker has taken the rq job and runs it until its next cancel check.
    Job.fetch(load_job(redis, job_id)["rq_ids"][0], connection=redis).set_status(JobStatus.STARTED)
    assert _cancel(client, job_id).json()["status"] == "canceled"

    with pytest.raises(ClientError) as refused:
        client.pretrain(name, n_layer=1, n_embd=16, n_head=1, steps=2)

    assert refused.value.status_code == 409
    assert refused.value.detail["field"] == "name"
    assert f"job {job_id} for the same work was canceled" in refused.value.detail["message"]
    queue.delete(delete_jobs=True)


def test_resume_unfinished_creation_names_cause(
    client: Client, redis: Redis, tiny_model: Path, settings: Any
) -> None:
    """A set whose creation did not finish reads as absent, and the job's messages give both
    causes rather than claim it was deleted."""
    first = _slow_extraction(client, tiny_model, "test", limit=120, seed=9107)
    assert _cancel(client, first["job_id"]).json()["status"] == "canceled"
    _wait_rq_idle(redis, first["job_id"])
    metadata = Path(settings.store) / "featuresets" / first["featureset_id"] / "zarr.json"
    document = json.loads(metadata.read_text())
    del document["attributes"]["block_rows"]
    metadata.write_text(json.dumps(document))

    state = client.job(first["job_id"])
    with pytest.raises(ClientError) as refused:
        client.request("POST", f"/v1/jobs/{first['job_id']}/resume")

    assert state["status"] == "canceled"
    assert "was deleted or its creation did not finish" in state["error"]["message"]
    assert refused.value.status_code == 409
    assert "was deleted or its creation did not finish" in refused.value.detail["message"]
    assert "send the same POST /v1/extractions again" in refused.value.detail["message"]
