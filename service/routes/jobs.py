"""Job status, cancel and resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from redis import Redis

from service.auth import JobQuotaDep, requires_scope
from service.deps import QueueDep, RedisDep, SettingsDep, StoreDep
from service.jobs import (
    JobNotResumableError,
    active_job_id,
    clear_cancel,
    deleted_result_message,
    enqueue_extraction,
    job_state,
    list_jobs,
    load_job,
    request_cancel,
    requeue_failed,
    rerun_would_repeat,
    target_lock,
)
from service.schemas import JobPublic, JobsPublic
from store import Store, check_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

StatusQuery = Annotated[
    Literal["queued", "running", "finished", "failed", "canceled"] | None,
    Query(description="only jobs with this status"),
]
KindQuery = Annotated[
    Literal["extraction", "probe", "projection", "pretrain"] | None,
    Query(description="only jobs of this kind"),
]
LimitQuery = Annotated[
    int, Query(ge=1, le=1000, description="maximum number of jobs returned (1-1000)")
]
BeforeQuery = Annotated[
    str | None,
    Query(
        description="a job id: only jobs created before that job; pass the next_before value "
        "of the previous page"
    ),
]

# Store group of the result each kind of single job writes.
RESULT_GROUPS = {"probe": "probes", "projection": "projections"}


@router.get("", response_model=JobsPublic)
def list_recent_jobs(
    store: StoreDep,
    redis: RedisDep,
    status: StatusQuery = None,
    kind: KindQuery = None,
    limit: LimitQuery = 100,
    before: BeforeQuery = None,
) -> JobsPublic:
    """List jobs, newest first, optionally of one status or kind, a page at a time.

    Jobs created at the same time are ordered by id, descending, so following next_before
    from page to page lists every job once.
    """
    if before is not None:
        check_id(before, field="before")
    page = list_jobs(redis, store, status=status, kind=kind, limit=limit, before=before)
    return JobsPublic(
        data=[JobPublic.model_validate(job) for job in page.jobs],
        count=len(page.jobs),
        next_before=page.next_before,
    )


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: str, store: StoreDep, redis: RedisDep) -> JobPublic:
    """Status, progress and error of a job."""
    check_id(job_id, field="job_id")
    return JobPublic.model_validate(job_state(redis, store, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    status_code=202,
    responses={
        200: {"model": JobPublic, "description": "The job had already ended: the job unchanged."}
    },
)
# Canceling needs the scope that starting a job needs, so a read-only key cannot stop others' work.
@requires_scope("write")
def cancel_job(job_id: str, response: Response, store: StoreDep, redis: RedisDep) -> JobPublic:
    """Cancel a queued or running job; 200 with the job unchanged if it had already ended.

    Queued rq jobs are canceled in rq. Running ones stop at their next check (an extraction
    block that runs finishes first); resume the job to run what is left.
    """
    return _change_job(
        job_id,
        response,
        store,
        redis,
        when=("queued", "running"),
        change=lambda _record: request_cancel(redis, job_id),
    )


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
    """Queue a failed or canceled job again (only the missing blocks of an extraction).

    Returns 200 with the job unchanged when it is queued, running or finished, or when a later
    job of the same probe or projection request has completed its result. Returns 409 when a
    later job of the same extraction has completed its feature set.
    """

    def result_complete(record: dict[str, Any]) -> bool:
        # A later POST of the same probe or projection request may have computed the result.
        group = RESULT_GROUPS.get(record["kind"])
        stored = store.read_result(group, record["target"]) if group else None
        return stored is not None and stored.get("status") == "complete"

    def resume(record: dict[str, Any]) -> None:
        newer = active_job_id(redis, record["target"])
        if newer is not None and newer != job_id:
            # Resuming this job would run the work a second time, beside the newer job.
            raise JobNotResumableError(
                f"job {job_id} was superseded by job {newer}, which a later request started "
                f"for the same {record['kind']} (status {job_state(redis, store, newer)['status']}"
                f"); follow GET /v1/jobs/{newer}, or resume that job if it stopped",
                field="job_id",
                value=job_id,
            )
        error = job_state(redis, store, job_id)["error"] or {}
        if rerun_would_repeat(error):
            raise JobNotResumableError(
                f"job {job_id} failed on something a rerun would fail on again: "
                f"{error.get('message')}; a resume would repeat it, so do what the error says "
                "instead",
                field=error.get("field") or "job_id",
                value=error.get("value") if error.get("field") else job_id,
            )
        group = RESULT_GROUPS.get(record["kind"])
        if group is not None:
            _require_result_inputs(store, record["kind"], group, record["target"])
        featureset = None
        if record["kind"] == "extraction":
            featureset = store.find_featureset(record["target"])
            if featureset is None:
                raise JobNotResumableError(
                    f"feature set {record['target']!r} of job {job_id} no longer exists (it "
                    "was deleted or its creation did not finish), so the job cannot be resumed; "
                    "send the same POST /v1/extractions again",
                    field="featureset_id",
                    value=record["target"],
                )
        quota.check()
        clear_cancel(redis, job_id)
        if featureset is not None:
            enqueue_extraction(queue, featureset, timeout=settings.block_timeout, job_id=job_id)
        else:
            requeue_failed(redis, job_id)
        quota.record(job_id)

    return _change_job(
        job_id,
        response,
        store,
        redis,
        when=("failed", "canceled"),
        change=resume,
        unchanged=result_complete,
    )


def _require_result_inputs(store: Store, kind: str, group: str, result_id: str) -> None:
    """Raise JobNotResumableError when the result of a probe or projection job, or a feature
    set it reads, was deleted: running the job again could only fail."""
    stored = store.read_result(group, result_id)
    if stored is None or "spec" not in stored:
        raise JobNotResumableError(
            deleted_result_message(kind, result_id),
            field=f"{kind}_id",
            value=result_id,
        )
    spec = stored["spec"]
    inputs = [spec.get("train_featureset"), spec.get("test_featureset"), spec.get("featureset")]
    for featureset_id in filter(None, inputs):
        if store.find_featureset(featureset_id) is None:
            raise JobNotResumableError(
                f"feature set {featureset_id!r} that {kind} {result_id!r} reads no longer "
                f"exists; extract it again, then send the same POST /v1/{group} again",
                field="featureset_id",
                value=featureset_id,
            )


def _change_job(
    job_id: str,
    response: Response,
    store: Store,
    redis: Redis,
    *,
    when: tuple[str, ...],
    change: Callable[[dict[str, Any]], object],
    unchanged: Callable[[dict[str, Any]], bool] | None = None,
) -> JobPublic:
    """Apply ``change`` to the job's record if the job's status is in ``when``; return its state.

    Otherwise, or when ``unchanged(record)`` is true, the response becomes a 200 with the job
    unchanged. The state is read and changed under the lock of the job's target, so a cancel,
    a resume or a new POST for the same target that arrives at the same time finds what this
    one queued or canceled.
    """
    check_id(job_id, field="job_id")
    record = load_job(redis, job_id)
    with target_lock(redis, record["target"]):
        state = job_state(redis, store, job_id)
        if state["status"] not in when or (unchanged is not None and unchanged(record)):
            response.status_code = status.HTTP_200_OK
            return JobPublic.model_validate(state)
        change(record)
        state = job_state(redis, store, job_id)
    return JobPublic.model_validate(state)
