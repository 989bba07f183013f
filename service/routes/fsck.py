"""GET /v1/featuresets/{id}/fsck checks a feature set on disk, and POST .../fsck/repair repairs it.

The check only reads, so GET and HEAD are safe to send. The repair deletes damaged objects,
temporary files and unfinished feature sets, so it is a POST that needs the admin scope.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from redis import Redis

from service.auth import requires_scope
from service.deps import RedisDep, StoreDep
from service.jobs import job_state, target_lock
from service.routes.featuresets import writing_job
from store import LayoutError, NotReadyError, Store, StoreError, check_id
from store.fsck import check_featureset

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/featuresets", tags=["featuresets"])


class FsckPublic(BaseModel):
    """Report of a consistency check of one feature set."""

    featureset_id: str
    ok: bool = Field(description="true when no object is damaged and no temporary file is left")
    status: str | None = Field(description="status of the feature set: pending or complete")
    n_blocks: int | None
    missing_blocks: list[int] = Field(description="blocks not flagged done (not written yet)")
    corrupt_blocks: list[int] = Field(description="blocks with an object that is damaged")
    corrupt_chunks: list[str] = Field(description="keys of damaged objects, e.g. features/c/0/3/0")
    partial_files: list[str] = Field(description="temporary files left by interrupted writes")
    problems: list[str] = Field(description="one sentence per problem, with what to do")
    repaired: list[str] = Field(
        description="actions taken by POST /v1/featuresets/{id}/fsck/repair; empty for the check"
    )


# Kept out of the schema: the parameter is accepted only to reject it with the route to use,
# so that a caller of the former GET ...?repair=true does not silently get a check alone.
RemovedRepairQuery = Annotated[str | None, Query(alias="repair", include_in_schema=False)]


@router.get("/{featureset_id}/fsck", response_model=FsckPublic)
def fsck_featureset(
    featureset_id: str,
    store: StoreDep,
    repair: RemovedRepairQuery = None,
) -> FsckPublic:
    """Decode every chunk of a feature set and check its done blocks, without changing them.

    POST /v1/featuresets/{id}/fsck/repair repairs what the check finds.
    """
    check_id(featureset_id, field="featureset_id")
    if repair is not None:
        raise StoreError(
            f"query parameter 'repair' is not accepted: GET and HEAD of fsck only check the "
            f"feature set, so send POST /v1/featuresets/{featureset_id}/fsck/repair (admin "
            "scope where keys are required) to repair it, or leave out 'repair' to check it",
            field="repair",
            value=repair,
        )
    return FsckPublic.model_validate(check_featureset(store, featureset_id))


@router.post("/{featureset_id}/fsck/repair", response_model=FsckPublic)
@requires_scope("admin")
def repair_featureset(featureset_id: str, store: StoreDep, redis: RedisDep) -> FsckPublic:
    """Check a feature set, then clear the done flags of damaged blocks and delete damaged
    objects, temporary files and a set whose creation did not finish (admin, like DELETE).

    Rejected with 409 while a job writes the feature set. The report lists what was found and,
    under ``repaired``, what was done; resume the set's job to rewrite the cleared blocks.
    """
    check_id(featureset_id, field="featureset_id")
    with target_lock(redis, featureset_id):
        busy = writing_job(redis, store, featureset_id)
        if busy is not None:
            job_id, status = busy
            raise NotReadyError(
                f"feature set {featureset_id!r} is being written by job {job_id!r} ({status}); "
                "repair it after the job has finished, failed or been canceled",
                field="featureset_id",
                value=featureset_id,
                progress=_progress(redis, store, job_id),
            )
        report = check_featureset(store, featureset_id, repair=True)
    if report["repaired"]:
        logger.warning("feature set %s: fsck repair: %s", featureset_id, report["repaired"])
    return FsckPublic.model_validate(report)


def _progress(redis: Redis, store: Store, job_id: str) -> dict[str, int] | None:
    """Return the progress of ``job_id``, or None when the feature set's metadata is damaged."""
    try:
        return dict(job_state(redis, store, job_id)["progress"])
    except LayoutError:
        return None
