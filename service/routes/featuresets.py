"""Feature sets: list, describe, and fetch layers and labels as .npy or JSON."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from redis import Redis
from rq.job import Job, JobStatus
from starlette.concurrency import run_in_threadpool

from service.auth import requires_scope
from service.deps import RedisDep, SettingsDep, StoreDep
from service.head import is_head
from service.jobs import (
    active_job_id,
    busy_job,
    featureset_job_status,
    load_job,
    record_progress_at_delete,
    require_complete,
    target_lock,
)
from service.schemas import FeatureSetPublic, FeatureSetsPublic
from store import FeatureSet, LayoutError, NotReadyError, Store, check_id
from store.settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/featuresets", tags=["featuresets"])

FormatQuery = Annotated[Literal["npy", "json"], Query(description="npy (default) or json")]
RowQuery = Annotated[int | None, Query(ge=0, description="first row (default 0)")]


# Ids of unfinished creations this process has logged, so each is logged once, not per list.
_logged_incomplete: set[str] = set()
_logged_incomplete_lock = threading.Lock()


def _public(redis: Redis, store: Store, featureset: FeatureSet) -> FeatureSetPublic:
    """Describe ``featureset`` with the status, job, error and hint its job reports."""
    summary = featureset.summary()
    job = featureset_job_status(redis, store, featureset)
    summary.update(status=job.status, job_id=job.job_id, error=job.error, hint=job.hint)
    return FeatureSetPublic.model_validate(summary)


@router.get("", response_model=FeatureSetsPublic)
def list_featuresets(store: StoreDep, redis: RedisDep) -> FeatureSetsPublic:
    """List all feature sets in the store with their status.

    A folder whose creation did not finish, or whose metadata is damaged, is left out, with one
    warning in the log.
    """
    data = []
    for featureset_id in store.featureset_ids():
        try:
            public = _listed(redis, store, featureset_id)
        except LayoutError as exc:
            _log_skipped(featureset_id, exc.message)
            continue
        if public is not None:
            data.append(public)
        else:  # deleted since the ids were listed, or not completely created
            _log_incomplete(store, featureset_id)
    return FeatureSetsPublic(data=data, count=len(data))


def _listed(redis: Redis, store: Store, featureset_id: str) -> FeatureSetPublic | None:
    """Describe one feature set of the list, or return None when it does not exist (any more)."""
    try:
        featureset = store.find_featureset(featureset_id)
        return _public(redis, store, featureset) if featureset is not None else None
    except LayoutError:
        raise
    except Exception:
        # A delete that runs while the list reads the set removes files under it.
        store.forget(featureset_id)
        if store.find_featureset(featureset_id) is not None:
            raise
        return None


def _log_incomplete(store: Store, featureset_id: str) -> None:
    """Log a warning the first time the list skips a feature set whose creation did not finish."""
    try:
        missing = store.missing_creation_attrs(featureset_id)
    except LayoutError as exc:  # its metadata was damaged after find_featureset read it
        _log_skipped(featureset_id, exc.message)
        return
    if not missing:
        return
    if not _first_skip(featureset_id):
        return
    logger.warning(
        "feature set %s: left out of the list because its creation did not finish (missing "
        "attributes: %s); the same POST /v1/extractions recreates it, and DELETE "
        "/v1/featuresets/%s or fsck with repair removes it",
        featureset_id,
        ", ".join(missing),
        featureset_id,
    )


def _log_skipped(featureset_id: str, reason: str) -> None:
    """Log a warning the first time the list skips a feature set whose metadata is damaged."""
    if _first_skip(featureset_id):
        logger.warning("feature set %s: left out of the list: %s", featureset_id, reason)


def _first_skip(featureset_id: str) -> bool:
    """Record that the list skipped ``featureset_id``; return whether it is the first time."""
    with _logged_incomplete_lock:
        if featureset_id in _logged_incomplete:
            return False
        _logged_incomplete.add(featureset_id)
    return True


@router.get("/{featureset_id}", response_model=FeatureSetPublic)
def read_featureset(featureset_id: str, store: StoreDep, redis: RedisDep) -> FeatureSetPublic:
    """Spec, layer map, shape, dtype, status and progress of a feature set, and its job."""
    check_id(featureset_id, field="featureset_id")
    return _public(redis, store, store.featureset(featureset_id))


@router.get(
    "/{featureset_id}/layers/{layer}",
    responses={
        200: {
            "content": {"application/octet-stream": {}, "application/json": {}},
            "description": "array of shape (rows, dim) as .npy, or JSON rows",
        }
    },
)
async def read_layer(
    request: Request,
    featureset_id: str,
    layer: int,
    store: StoreDep,
    settings: SettingsDep,
    redis: RedisDep,
    start: RowQuery = None,
    stop: RowQuery = None,
    format: FormatQuery = "npy",
) -> Response:
    """Return one layer's (rows, dim) array as .npy, or as JSON for small slices."""
    check_id(featureset_id, field="featureset_id")
    # Rows of an already decoded block are returned on the event loop: no store I/O, and no
    # hand-off to a thread that would wait for the GIL behind every other request.
    featureset = store.open_featureset(featureset_id)
    if featureset is not None and featureset.known_complete:
        position = featureset.layer_position(layer)
        first, last = featureset.check_rows(start, stop)
        _check_row_limit(first, last, format, settings)
        rows = featureset.cached_rows(position, first, last)
        if rows is not None:
            meta = {"featureset_id": featureset_id, "layer": layer, "start": first, "stop": last}
            return _array_response(rows, format, meta)
    return await run_in_threadpool(
        _read_layer,
        featureset_id,
        layer,
        store,
        settings,
        redis,
        start,
        stop,
        format,
        head=is_head(request),
    )


def _read_layer(
    featureset_id: str,
    layer: int,
    store: Store,
    settings: Settings,
    redis: Redis,
    start: int | None,
    stop: int | None,
    format: str,
    *,
    head: bool = False,
) -> Response:
    featureset = store.featureset(featureset_id)
    require_complete(redis, store, featureset)
    featureset.layer_position(layer)
    first, last = featureset.check_rows(start, stop)
    _check_row_limit(first, last, format, settings)
    if format == "npy" and last - first > featureset.block_rows:
        return _layer_stream(featureset, layer, first, last, head=head)
    array = featureset.read_layer(layer, first, last)
    return _array_response(
        array,
        format,
        {"featureset_id": featureset_id, "layer": layer, "start": first, "stop": last},
    )


@router.get(
    "/{featureset_id}/labels",
    responses={
        200: {
            "content": {"application/octet-stream": {}, "application/json": {}},
            "description": "array of shape (rows,) as .npy, or JSON rows",
        }
    },
)
def read_labels(
    featureset_id: str,
    store: StoreDep,
    settings: SettingsDep,
    redis: RedisDep,
    start: RowQuery = None,
    stop: RowQuery = None,
    format: FormatQuery = "npy",
) -> Response:
    """Integer labels of the items, as .npy or JSON."""
    check_id(featureset_id, field="featureset_id")
    featureset = store.featureset(featureset_id)
    # Labels are written when the set is created, but only complete sets are served, so a
    # client sees one state for the whole set.
    require_complete(redis, store, featureset)
    first, last = featureset.check_rows(start, stop)
    _check_row_limit(first, last, format, settings)
    array = featureset.read_labels(first, last)
    return _array_response(
        array, format, {"featureset_id": featureset_id, "start": first, "stop": last}
    )


@router.delete("/{featureset_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
@requires_scope("admin")
def delete_featureset(featureset_id: str, store: StoreDep, redis: RedisDep) -> Response:
    """Delete a feature set with the probe results and projections computed from it (admin)."""
    check_id(featureset_id, field="featureset_id")
    with target_lock(redis, featureset_id):
        featureset = _deletable(store, featureset_id)
        # featureset None: a folder whose creation did not finish or whose metadata is damaged,
        # deleted like any set.
        busy = writing_job(redis, store, featureset_id)
        if busy is not None:
            raise NotReadyError(
                f"feature set {featureset_id!r} is still being written by job {busy[0]!r} "
                f"({busy[1]}); wait until the job has stopped, then delete it",
                field="featureset_id",
                value=featureset_id,
            )
        dependents = _dependent_results(store, featureset_id)
        for kind, result_id in dependents:
            _check_not_computing(store, redis, featureset_id, kind, result_id)
        for kind, result_id in dependents:
            _delete_group(store, f"{kind}/{result_id}")
        if featureset is not None:
            record_progress_at_delete(redis, featureset_id, featureset.progress().as_dict())
        _delete_group(store, f"featuresets/{featureset_id}")
        store.forget(featureset_id)
    logger.info("feature set %s deleted with %d dependent results", featureset_id, len(dependents))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# rq statuses of a job that may still write its target.
_UNFINISHED_RQ = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)


def writing_job(redis: Redis, store: Store, featureset_id: str) -> tuple[str, str] | None:
    """Return (job id, status) of the job that may still write the feature set, as `busy_job`.

    `busy_job` reads the feature set to compute its job's status, which fails while the set's
    metadata is damaged. The job then counts as busy while any of its rq jobs has not ended.
    """
    try:
        return busy_job(redis, store, featureset_id)
    except LayoutError:
        job_id = active_job_id(redis, featureset_id)
        if job_id is None:
            return None
        rq_jobs = Job.fetch_many(load_job(redis, job_id)["rq_ids"], connection=redis)
        if any(job is not None and job.get_status() in _UNFINISHED_RQ for job in rq_jobs):
            return job_id, "queued or running"
        return None


def _deletable(store: Store, featureset_id: str) -> FeatureSet | None:
    """Return the feature set to delete, or None for a folder without a readable set, or raise
    NotFoundError when nothing is stored under its id."""
    try:
        featureset = store.find_featureset(featureset_id)
    except LayoutError as exc:
        logger.info(
            "feature set %s: deleting it despite its damage: %s", featureset_id, exc.message
        )
        return None
    if featureset is None and not store.missing_creation_attrs(featureset_id):
        store.featureset(featureset_id)  # raises NotFoundError
    return featureset


def _check_not_computing(
    store: Store, redis: Redis, featureset_id: str, kind: str, result_id: str
) -> None:
    """Raise NotReadyError while a job still computes ``<kind>/<result_id>`` from the feature
    set, because deleting the set under it would fail the job halfway."""
    busy = busy_job(redis, store, result_id)
    if busy is not None:
        job_id, state = busy
        raise NotReadyError(
            f"feature set {featureset_id!r} is read by {kind.removesuffix('s')} {result_id!r}, "
            f"whose job {job_id!r} is {state}; wait for the job to finish or fail, then delete "
            "the feature set",
            field="featureset_id",
            value=featureset_id,
        )


def _dependent_results(store: Store, featureset_id: str) -> list[tuple[str, str]]:
    """Return (kind, id) of every probe result and projection whose spec names the feature set."""
    found = []
    for kind in ("probes", "projections"):
        for result_id in store.result_ids(kind):
            spec = (store.read_result(kind, result_id) or {}).get("spec") or {}
            if featureset_id in _string_values(spec):
                found.append((kind, result_id))
    return found


def _string_values(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_string_values(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_string_values(item) for item in value))
    return set()


def _delete_group(store: Store, path: str) -> None:
    from zarr.core.sync import sync

    sync(store.zarr_store.delete_dir(path))


def _check_row_limit(first: int, last: int, format: str, settings: Settings) -> None:
    """Raise a 413 naming ``stop`` when rows [first, last) are more than one fetch may return."""
    limit = settings.max_json_rows if format == "json" else settings.max_rows_per_fetch
    rows = last - first
    if rows > limit:
        hint = "or use format=npy" if format == "json" else "and fetch the rest in more ranges"
        raise HTTPException(
            status_code=413,
            detail={
                "message": f"{rows} rows requested (start {first}, stop {last}) but at most "
                f"{limit} rows may be fetched as {format} at once; send stop <= {first + limit} "
                f"{hint}",
                "field": "stop",
                "value": last,
            },
        )


def _layer_stream(
    featureset: FeatureSet, layer: int, first: int, last: int, *, head: bool = False
) -> Response:
    """Stream rows [first, last) of a layer as .npy, one block at a time.

    The .npy header is built from the shape and dtype, so the body is never held whole in
    memory and Content-Length is known before the first byte. For a HEAD request (``head``)
    no row is read, and the response has the same headers and no body.
    """
    dtype = np.dtype(featureset.features.dtype)
    dim = int(featureset.features.shape[2])
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": (last - first, dim),
        },
    )
    length = header.tell() + (last - first) * dim * dtype.itemsize

    # A missing or truncated shard gets an error response before the status line is sent.
    featureset.check_layer(layer, first, last)
    headers = {"Content-Length": str(length)}
    if head:
        return Response(media_type="application/octet-stream", headers=headers)

    async def body() -> AsyncIterator[bytes | memoryview]:
        yield header.getvalue()
        # NOTE: a chunk that fails its checksum here ends the response early. The status line
        # has been sent, so the client sees a body shorter than Content-Length (service.client
        # raises a ClientError for it).
        pieces = featureset.iter_layer(layer, first, last)  # (rows, dim) per block
        # The next block is read in a thread while the current one is sent, so the transfer
        # overlaps the decoding. One read at a time: a generator is not thread-safe.
        pending = asyncio.ensure_future(run_in_threadpool(next, pieces, None))
        try:
            while (piece := await pending) is not None:
                pending = asyncio.ensure_future(run_in_threadpool(next, pieces, None))
                yield np.ascontiguousarray(piece).reshape(-1).view(np.uint8).data
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending

    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


def _array_response(array: np.ndarray, format: str, meta: dict[str, object]) -> Response:
    if format == "json":
        import json

        data = array.tolist()
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            # JSON has no NaN or Infinity. Blocks are checked when written, so only a set
            # written before that check or damaged on disk can contain them.
            cleaned = array.astype(object)
            cleaned[~np.isfinite(array)] = None
            data = cleaned.tolist()
        body = json.dumps(
            {**meta, "shape": list(array.shape), "dtype": str(array.dtype), "data": data},
            allow_nan=False,
        )
        return Response(body, media_type="application/json")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    payload = buffer.getvalue()
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={"Content-Length": str(len(payload))},
    )
