"""Job status and resume."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth import JobQuotaDep
from service.deps import QueueDep, RedisDep, SettingsDep, StoreDep
from service.jobs import enqueue_extraction, job_state, load_job, target_lock
from service.schemas import JobPublic
from store import check_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: str, store: StoreDep, redis: RedisDep) -> JobPublic:
    """Status, progress and error of a job."""
    check_id(job_id, field="job_id")
    return JobPublic.model_validate(job_state(redis, store, job_id))


@router.post("/{job_id}/resume", response_model=JobPublic, status_code=202)
def resume_job(
    job_id: str,
    settings: SettingsDep,
    store: StoreDep,
    redis: RedisDep,
    queue: QueueDep,
    quota: JobQuotaDep,
) -> JobPublic:
    """Queue the missing blocks of an extraction again; finished jobs are returned unchanged."""
    check_id(job_id, field="job_id")
    record = load_job(redis, job_id)
    if record["kind"] != "extraction":
        return JobPublic.model_validate(job_state(redis, store, job_id))
    # Under the feature set's lock, a second resume arriving at the same time sees the blocks
    # the first one queued and queues nothing.
    with target_lock(redis, record["target"]):
        state = job_state(redis, store, job_id)
        if state["status"] == "failed":
            featureset = store.featureset(record["target"])
            quota.check()
            enqueue_extraction(queue, featureset, timeout=settings.block_timeout, job_id=job_id)
            quota.record(job_id)
            state = job_state(redis, store, job_id)
    return JobPublic.model_validate(state)
