"""GET /v1/featuresets/{id}/fsck: check a feature set on disk, optionally repair it."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from service.auth import require_key_scope
from service.deps import RedisDep, StoreDep
from service.jobs import busy_job, job_state, target_lock
from store import NotReadyError, check_id
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
    repaired: list[str] = Field(description="actions taken when repair=true")


RepairQuery = Annotated[
    bool,
    Query(
        description="clear the done flags of damaged blocks and delete damaged objects and "
        "temporary files, so that resuming the job rewrites them; rejected with 409 while a "
        "job writes the feature set"
    ),
]


@router.get("/{featureset_id}/fsck", response_model=FsckPublic)
def fsck_featureset(
    featureset_id: str,
    request: Request,
    store: StoreDep,
    redis: RedisDep,
    repair: RepairQuery = False,
) -> FsckPublic:
    """Decode every chunk of a feature set and check its done blocks; repair=true fixes flags
    (with an admin key where keys are required, as it can delete data)."""
    check_id(featureset_id, field="featureset_id")
    if not repair:
        return FsckPublic.model_validate(check_featureset(store, featureset_id))
    # The check reads, but a repair deletes damaged objects and unfinished feature sets, so it
    # needs the scope of DELETE /v1/featuresets/{id}.
    require_key_scope(request, "admin", "repair=true deletes data")
    with target_lock(redis, featureset_id):
        busy = busy_job(redis, store, featureset_id)
        if busy is not None:
            job_id, status = busy
            raise NotReadyError(
                f"feature set {featureset_id!r} is being written by job {job_id!r} ({status}); "
                "run fsck with repair after the job has finished, failed or been canceled",
                field="repair",
                value=True,
                progress=job_state(redis, store, job_id)["progress"],
            )
        report = check_featureset(store, featureset_id, repair=True)
    if report["repaired"]:
        logger.warning("feature set %s: fsck repair: %s", featureset_id, report["repaired"])
    return FsckPublic.model_validate(report)
