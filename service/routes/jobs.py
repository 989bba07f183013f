"""Job status and resume."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from service.auth import JobQuotaDep
from service.deps import QueueDep, RedisDep, SettingsDep, StoreDep
from service.jobs import enqueue_extraction, job_state, load_job, requeue_failed, target_lock
from service.schemas import JobPublic
from store import check_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: str, store: StoreDep, redis: RedisDep) -> JobPublic:
    """Status, progress and error of a job."""
    check_id(job_id, field="job_id")
    return JobPublic.model_validate(job_state(redis, store, job_id))


@router.post(
    "/{job_id}/resume",
    response_model=JobPublic,
    status_code=202,
    responses={200: {"model": JobPublic, "description": "Nothing to resume: the job unchanged."}},
)
def resume_job(
    job_id: str,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    redis: RedisDep,
    queue: QueueDep,
    quota: JobQuotaDep,
) -> JobPublic:
    """Queue a failed job again (only the missing blocks of an extraction); 200 if nothing to do."""
    check_id(job_id, field="job_id")
    record = load_job(redis, job_id)
    # Under the target's lock, a second resume arriving at the same time finds what the first
    # one queued and queues nothing.
    with target_lock(redis, record["target"]):
        state = job_state(redis, store, job_id)
        if state["status"] != "failed":
            response.status_code = status.HTTP_200_OK
            return JobPublic.model_validate(state)
        quota.check()
        if record["kind"] == "extraction":
            featureset = store.featureset(record["target"])
            enqueue_extraction(queue, featureset, timeout=settings.block_timeout, job_id=job_id)
        else:
            requeue_failed(redis, job_id)
        quota.record(job_id)
        state = job_state(redis, store, job_id)
    return JobPublic.model_validate(state)
