"""Job records in Redis, each grouping the rq jobs of one extraction, probe or pretraining.

A record is the hash ``layerbank:job:<job_id>`` with its kind, its target (feature set, probe or
model) and the ids of its rq jobs. Status is derived on every read from rq and the store, so an
API restart rebuilds it from Redis and the store alone. The field ``canceled`` of a canceled job
contains the time of the cancel. Running rq jobs of the job read it to stop (see
``workers.jobs``), and a resume deletes it.

The sorted set ``layerbank:job-index`` contains every job id, scored by the POSIX time of the
job's first creation, so ``list_jobs`` reads the newest jobs without scanning every record.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, cast

from redis import Redis
from redis.client import Pipeline
from redis.typing import EncodableT, FieldT
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Dependency, Job, JobStatus
from rq.registry import CanceledJobRegistry, StartedJobRegistry

from store import FeatureSet, LayoutError, NotFoundError, NotReadyError, Store
from store.errors import StoreError

logger = logging.getLogger(__name__)

PREFIX = "layerbank"
RESULT_TTL = 7 * 24 * 3600
FAILURE_TTL = 30 * 24 * 3600
# Attempts after the first for a block whose worker died or whose job raised. Rewriting a block
# is safe: its features are stored before its done flag, and a rerun writes the same values.
BLOCK_RETRIES = 2
# Field of a job record that contains the time of a cancel. workers.jobs reads it under the same
# name, because workers cannot import service.
CANCELED_FIELD = "canceled"
# Fields a worker writes into a job record when the job's work ends complete: the time and, for
# an extraction, the feature set's progress then. The names must match workers.jobs. They keep a
# finished job reading finished after its target is deleted or its rq jobs expire.
FINISHED_FIELD = "finished"
FINISHED_PROGRESS_FIELD = "finished_progress"
# Field of an extraction's job record that contains its feature set's progress when the set was
# deleted, so a job that ended unfinished still shows how far it got.
DELETED_PROGRESS_FIELD = "progress_at_delete"
# Sorted set of job ids scored by creation time, and the key set once the records written
# before the index existed have been added to it.
INDEX_KEY = "job-index"
INDEX_BACKFILLED_KEY = "job-index-backfilled"
# Index entries read per Redis round trip by list_jobs.
INDEX_PAGE_SIZE = 200
# Statuses of a job whose work has ended, whose record prune_jobs may delete.
ENDED_STATUSES = ("finished", "failed", "canceled")
# Key an API process sets, for PRUNE_INTERVAL seconds, when it starts a pruning pass, so that
# one process in the deployment prunes per interval.
PRUNE_MARKER_KEY = "job-prune"
PRUNE_INTERVAL = 3600


class _RqJobOptions(TypedDict):
    """Keyword arguments shared by the block and finalize rq jobs of an extraction."""

    result_ttl: int
    failure_ttl: int
    meta: dict[str, Any]


class JobNotFoundError(StoreError):
    """Raised when a job id has no record in Redis."""


class JobNotResumableError(StoreError):
    """Raised when a resume is requested for a job whose failure a rerun would repeat."""


def rerun_would_repeat(error: dict[str, Any] | None) -> bool:
    """Return whether a job failed on a permanent error, one that a rerun would fail on again.

    The resume route rejects such a job with 409, and the hint of its feature set requests a fix
    and a new request instead of a resume.
    """
    return bool(error and error.get("permanent"))


def _key(*parts: str) -> str:
    return ":".join((PREFIX, *parts))


def new_job_id() -> str:
    return uuid.uuid4().hex[:24]


@contextmanager
def target_lock(redis: Redis, target: str, timeout: float = 60.0) -> Iterator[None]:
    """Hold a Redis lock on ``target`` so concurrent API replicas create one job per target."""
    lock = redis.lock(_key("lock", target), timeout=timeout, blocking_timeout=timeout)
    if not lock.acquire():
        raise StoreError(
            f"timed out waiting for the lock on {target!r}; retry the request",
            field="target",
            value=target,
        )
    try:
        yield
    finally:
        try:
            lock.release()
        except Exception:  # the lock expired: another request may proceed, which is safe
            logger.exception("lock on %s expired before release", target)


@contextmanager
def inputs_locked(redis: Redis, featureset_ids: list[str]) -> Iterator[None]:
    """Hold the locks of the feature sets a new job reads, in id order, while it is queued.

    A delete of a feature set takes the same lock, so it either runs before the request (which
    then finds no feature set) or after the job is recorded (and then waits for the job).
    """
    with ExitStack() as stack:
        for featureset_id in sorted(set(featureset_ids)):
            stack.enter_context(target_lock(redis, featureset_id))
        yield


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def active_job_id(redis: Redis, target: str) -> str | None:
    value = redis.get(_key("target", target))
    return _text(value) if value else None


def save_job(redis: Redis, job_id: str, *, kind: str, target: str, rq_ids: list[str]) -> None:
    """Write the record of ``job_id`` and add the job to the index, in one transaction.

    A resume saves the record again. It keeps the time the job was first created, and the
    job's index score stays that time, so a resumed job keeps its place in the list.
    """
    record: dict[FieldT, EncodableT] = {
        "kind": kind,
        "target": target,
        "rq_ids": json.dumps(rq_ids),
    }
    key = _key("job", job_id)

    def write(pipe: Pipeline) -> None:
        # WATCH on the record makes the transaction retry if "created" changes after this read.
        stored = pipe.hget(key, "created")
        created = _text(stored) if stored else dt.datetime.now(dt.timezone.utc).isoformat()
        pipe.multi()
        pipe.hset(key, mapping=record)
        # A resume runs the work again.
        pipe.hdel(key, FINISHED_FIELD, FINISHED_PROGRESS_FIELD, DELETED_PROGRESS_FIELD)
        pipe.hsetnx(key, "created", created)
        pipe.zadd(_key(INDEX_KEY), {job_id: _created_score(created)})
        pipe.set(_key("target", target), job_id)

    redis.transaction(write, key)


def _created_score(created: str) -> float:
    """Return the index score of a record's ``created`` time: POSIX seconds."""
    return dt.datetime.fromisoformat(created).timestamp()


def load_job(redis: Redis, job_id: str) -> dict[str, Any]:
    raw = redis.hgetall(_key("job", job_id))
    if not raw:
        raise JobNotFoundError(
            f"job {job_id!r} not found; job ids are returned by the POST that started the work",
            field="job_id",
            value=job_id,
        )
    record: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
    record["rq_ids"] = json.loads(record["rq_ids"])
    record["job_id"] = job_id
    return record


def enqueue_extraction(
    queue: Queue, featureset: FeatureSet, *, timeout: int, job_id: str | None = None
) -> str:
    """Enqueue one rq job per missing block plus a finalize job; return the layerbank job id.

    A block whose rq job from the feature set's current layerbank job is still queued or running
    keeps that rq job, and the new finalize job waits for it. This happens when a job failed on
    one block while its other blocks were still queued.
    """
    job_id = job_id or new_job_id()
    in_flight = _blocks_in_flight(queue.connection, featureset.id)
    missing = [block for block in featureset.missing_blocks() if block not in in_flight]
    common: _RqJobOptions = {
        "result_ttl": RESULT_TTL,
        "failure_ttl": FAILURE_TTL,
        "meta": {"layerbank_job": job_id},
    }
    blocks = queue.enqueue_many(
        [
            Queue.prepare_data(
                "workers.jobs.extract_block",
                (featureset.id, block),
                timeout=timeout,
                description=f"extract {featureset.id} block {block}",
                retry=Retry(max=BLOCK_RETRIES),
                **common,
            )
            for block in missing
        ]
    )
    dependencies: list[Dependency | Job | str] = [*blocks, *in_flight.values()]
    finalize = queue.enqueue_call(
        "workers.jobs.finalize_featureset",
        args=(featureset.id,),
        timeout=300,
        depends_on=dependencies or None,
        description=f"finalize {featureset.id}",
        **common,
    )
    save_job(
        queue.connection,
        job_id,
        kind="extraction",
        target=featureset.id,
        rq_ids=[job.id for job in blocks] + [job.id for job in in_flight.values()] + [finalize.id],
    )
    logger.info(
        "job %s: feature set %s, %d blocks enqueued, %d still queued or running kept",
        job_id,
        featureset.id,
        len(missing),
        len(in_flight),
    )
    return job_id


def _blocks_in_flight(redis: Redis, featureset_id: str) -> dict[int, Job]:
    """Return block -> rq job for the blocks of the target's current job not yet done or failed."""
    current = active_job_id(redis, featureset_id)
    if current is None:
        return {}
    try:
        rq_ids = load_job(redis, current)["rq_ids"]
    except JobNotFoundError:
        return {}
    waiting = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
    found = {}
    for job in _fetch(redis, rq_ids):
        if (
            job is not None
            and job.func_name == "workers.jobs.extract_block"
            and job.args[0] == featureset_id
            and job.get_status(refresh=False) in waiting
        ):
            found[int(job.args[1])] = job
    return found


def enqueue_single(
    queue: Queue,
    func: str,
    args: tuple[Any, ...],
    *,
    kind: str,
    target: str,
    timeout: int,
    total: int | None = None,
) -> str:
    """Queue one rq job for ``target`` and record it as a layerbank job; return the job id.

    ``total`` is the job's unit count when known before it starts (layers to probe, steps to
    train), so its progress reads 0 of that from the start.
    """
    job_id = new_job_id()
    meta: dict[str, Any] = {"layerbank_job": job_id}
    if total is not None:
        meta["progress"] = {"done": 0, "total": total}
    job = queue.enqueue_call(
        func,
        args=args,
        timeout=timeout,
        result_ttl=RESULT_TTL,
        failure_ttl=FAILURE_TTL,
        meta=meta,
        description=f"{kind} {target}",
        # A probe, projection or pretraining run is rerun from the start when its worker dies:
        # each writes its result only at the end.
        retry=Retry(max=BLOCK_RETRIES),
    )
    save_job(queue.connection, job_id, kind=kind, target=target, rq_ids=[job.id])
    logger.info("job %s: %s %s enqueued", job_id, kind, target)
    return job_id


def job_state(redis: Redis, store: Store, job_id: str) -> dict[str, Any]:
    """Return the public state of a job: status, progress, error, result."""
    record = load_job(redis, job_id)
    rq_jobs = _fetch(redis, record["rq_ids"])
    if _release_abandoned(redis, rq_jobs):
        rq_jobs = _fetch(redis, record["rq_ids"])
    statuses = [job.get_status(refresh=False) if job else None for job in rq_jobs]
    error = None
    for job in rq_jobs:
        if job is not None and job.get_status(refresh=False) == JobStatus.FAILED:
            error = job.meta.get("error") or {
                "message": _last_line(job, job_id),
                "field": None,
                "value": None,
            }
            break

    kind = record["kind"]
    result = None
    damage: LayoutError | None = None
    if kind == "extraction":
        try:
            featureset = store.find_featureset(record["target"])
        except LayoutError as exc:
            # Damaged metadata of the set: the job's own record still gives its state.
            featureset, damage = None, exc
        # Status before progress: a block finishing between the two reads must not show a
        # complete feature set with a block missing.
        done = bool(featureset and featureset.is_complete)
        if featureset is not None:
            progress = featureset.progress().as_dict()
        elif record.get(FINISHED_FIELD) or (
            statuses and all(s == JobStatus.FINISHED for s in statuses)
        ):
            # The set was deleted after the job completed it: the job still finished. Records
            # written before workers recorded the end have only rq's statuses to show it.
            done = True
            progress = json.loads(record.get(FINISHED_PROGRESS_FIELD) or "{}")
        else:
            progress = json.loads(record.get(DELETED_PROGRESS_FIELD) or "{}")
        progress_public = {
            "done": progress.get("blocks_done", 0),
            "total": progress.get("blocks_total", 0),
            "items_done": progress.get("items_done", 0),
            "items_total": progress.get("items_total", 0),
        }
    else:
        last = rq_jobs[-1] if rq_jobs else None
        meta_progress = (last.meta.get("progress") if last else None) or {}
        done = bool(record.get(FINISHED_FIELD)) or (
            statuses[-1] == JobStatus.FINISHED if statuses else False
        )
        if statuses and statuses[-1] is None and _target_complete(store, kind, record["target"]):
            # rq deletes a finished job after RESULT_TTL; the stored result still shows the end
            # for records written before workers recorded the end in them.
            done = True
        progress_public = {
            "done": int(meta_progress.get("done", 1 if done else 0)),
            "total": int(meta_progress.get("total", 1)),
        }
        if done and last is not None:
            result = last.return_value(refresh=False)

    # A later request for the same target may have started a newer job than this one. That job
    # may have completed the target, which does not make this canceled job finished.
    newer = active_job_id(redis, record["target"]) if record.get(CANCELED_FIELD) else None
    if newer not in (None, job_id):
        status = "canceled"
        error = {
            "message": f"canceled by request at {record[CANCELED_FIELD]}; a later request "
            f"started job {newer} for the same work, so follow GET /v1/jobs/{newer} instead",
            "field": None,
            "value": None,
        }
    elif done:
        status = "finished"
    elif damage is not None:
        status = "failed"
    elif record.get(CANCELED_FIELD) and kind == "extraction" and featureset is None:
        status = "canceled"
        error = {
            "message": f"feature set {record['target']!r} of this canceled job no longer exists "
            "(it was deleted or its creation did not finish), so it cannot be resumed; send the "
            "same POST /v1/extractions again to extract it again",
            "field": "featureset_id",
            "value": record["target"],
        }
    elif (
        record.get(CANCELED_FIELD)
        and kind in ("probe", "projection")
        and store.read_result(f"{kind}s", record["target"]) is None
    ):
        status = "canceled"
        error = {
            "message": deleted_result_message(kind, record["target"]),
            "field": f"{kind}_id",
            "value": record["target"],
        }
    elif record.get(CANCELED_FIELD):
        status = "canceled"
        error = {
            "message": _canceled_message(job_id, record[CANCELED_FIELD], statuses),
            "field": None,
            "value": None,
        }
    elif error is not None:
        status = "failed"
    elif any(s is None for s in statuses):
        status = "failed"
        error = {
            "message": "some rq jobs of this job expired or were lost (Redis restarted?); "
            f"resume it with POST /v1/jobs/{job_id}/resume",
            "field": None,
            "value": None,
        }
    elif kind == "extraction" and featureset is None:
        status = "failed"
        error = {
            "message": f"feature set {record['target']!r} of this job no longer exists (it was "
            "deleted); send the same POST /v1/extractions again to extract it again",
            "field": "featureset_id",
            "value": record["target"],
        }
    elif kind == "extraction" and statuses and all(s == JobStatus.FINISHED for s in statuses):
        # Every rq job ended, yet blocks are missing: fsck with repair cleared damaged blocks.
        status = "failed"
        error = {
            "message": f"{progress_public['total'] - progress_public['done']} blocks of "
            f"feature set {record['target']!r} are missing after every rq job of this job "
            f"finished; resume it with POST /v1/jobs/{job_id}/resume",
            "field": None,
            "value": None,
        }
    elif any(s in (JobStatus.STARTED,) for s in statuses) or any(
        s == JobStatus.FINISHED for s in statuses
    ):
        status = "running"
    else:
        status = "queued"
    if damage is not None:
        error = {"message": damage.message, "field": "featureset_id", "value": record["target"]}
    if status == "failed" and error is not None:
        later = active_job_id(redis, record["target"])
        if later not in (None, job_id):
            # A later request took over the work, so resuming this job is not the fix.
            reason = error["message"].split("; resume it with")[0]
            error = {
                **error,
                "message": f"{reason}; a later request started job {later} for the same work, "
                f"so follow GET /v1/jobs/{later} instead",
            }
    return {
        "job_id": job_id,
        "kind": kind,
        "target_id": record["target"],
        "status": status,
        "progress": progress_public,
        "error": error,
        "created": record["created"],
        "result": result if isinstance(result, dict) else None,
    }


def deleted_result_message(kind: str, result_id: str) -> str:
    """Return the message for a probe or projection job whose result was deleted."""
    return (
        f"{kind} {result_id!r} of this job no longer exists (it was deleted with a feature set "
        f"it read), so the job cannot be resumed; extract that feature set again if it is "
        f"gone, then send the same POST /v1/{kind}s again"
    )


def _target_complete(store: Store, kind: str, target: str) -> bool:
    """Return whether the result a probe, projection or pretraining job writes is complete."""
    if kind in ("probe", "projection"):
        stored = store.read_result(f"{kind}s", target)
        return stored is not None and stored.get("status") == "complete"
    if kind == "pretrain" and target.startswith("model-"):
        try:
            models_dir = store.models_dir()
        except NotFoundError:  # a store without local model folders
            return False
        return (models_dir / target.removeprefix("model-") / "config.json").is_file()
    return False


@dataclass(frozen=True)
class FeatureSetJobStatus:
    """Status of a feature set as its job reports it, with the next step for a client.

    ``status`` is "complete", "pending" (a job is queued or running, or a request is queueing
    one), "failed" (the job failed, or no job record is left) or "canceled". ``hint`` is None
    for a complete set.
    """

    status: str
    job_id: str | None
    error: dict[str, Any] | None
    hint: str | None


def featureset_job_status(
    redis: Redis, store: Store, featureset: FeatureSet
) -> FeatureSetJobStatus:
    """Return the status of ``featureset``, taken from its job while the set is not complete."""
    job_id = active_job_id(redis, featureset.id)
    if featureset.is_complete:
        return FeatureSetJobStatus("complete", job_id, None, None)
    state: dict[str, Any] | None = None
    if job_id is not None:
        try:
            state = job_state(redis, store, job_id)
        except JobNotFoundError:
            state = None
    resend = "send the same POST /v1/extractions again"
    if state is None:
        if redis.exists(_key("lock", featureset.id)):
            # A request holds the set's lock while it creates the set and queues the job.
            return FeatureSetJobStatus(
                "pending", None, None, "a request is queueing its job; read it again shortly"
            )
        message = "no job writes this feature set (its job record was lost or never saved)"
        return FeatureSetJobStatus(
            "failed",
            None,
            {"message": message, "field": None, "value": None},
            f"no job is writing it; {resend}",
        )
    if state["status"] in ("queued", "running"):
        return FeatureSetJobStatus("pending", job_id, None, f"wait for its job {job_id} to finish")
    resume = f"resume it with POST /v1/jobs/{job_id}/resume"
    if state["status"] == "canceled":
        return FeatureSetJobStatus(
            "canceled",
            job_id,
            state["error"],
            f"its job {job_id} is canceled; {resume} or {resend}",
        )
    # A failed job, or one that ended without completing the set (a repair cleared blocks).
    error = state["error"] or {
        "message": f"job {job_id} ended with the feature set incomplete",
        "field": None,
        "value": None,
    }
    reason = error.get("message") or state["status"]
    if rerun_would_repeat(error):
        hint = (
            f"its job {job_id} failed on an error a rerun would repeat ({reason}); fix what "
            f"the error names, then {resend} (a fixed checkpoint has a new revision, so that "
            "request writes a new feature set)"
        )
    else:
        hint = (
            f"its job {job_id} is {state['status']} ({reason}); {resume} once the cause is "
            f"fixed, or {resend}"
        )
    return FeatureSetJobStatus("failed", job_id, error, hint)


def require_complete(
    redis: Redis, store: Store, featureset: FeatureSet, *, field: str = "featureset_id"
) -> None:
    """Raise NotReadyError unless ``featureset`` is complete, saying what its job is doing.

    The message ends with the hint of `featureset_job_status`: wait for a queued or running
    job, resume a failed or canceled one, or extract again when no job record is left.
    """
    if featureset.is_complete:
        return
    progress = featureset.progress()
    job = featureset_job_status(redis, store, featureset)
    raise NotReadyError(
        f"{field} {featureset.id!r} is not complete yet ({progress.blocks_done}/"
        f"{progress.blocks_total} blocks written); {job.hint}",
        field=field,
        value=featureset.id,
        progress=progress.as_dict(),
    )


@dataclass(frozen=True)
class JobsPage:
    """Job states of one page of the job list, and the ``before`` value of the next page."""

    jobs: list[dict[str, Any]]
    next_before: str | None


def list_jobs(
    redis: Redis,
    store: Store,
    *,
    status: str | None = None,
    kind: str | None = None,
    limit: int = 100,
    before: str | None = None,
) -> JobsPage:
    """Return the states of at most ``limit`` jobs, newest first, from the job index.

    ``status`` and ``kind`` keep only the jobs with that status or kind. ``before`` is a job id:
    only jobs created strictly before it are listed, where jobs with the same creation time are
    ordered by id, descending. ``next_before`` is the id of the last job returned when another
    job matches after it, else None. With a ``status`` filter, finding that out reads job states
    until one more match is found, so the last page of a rare status reads the rest of the index.
    """
    _backfill_index(redis)
    cursor = _before_cursor(redis, before) if before is not None else None
    states: list[dict[str, Any]] = []
    for job_id in _indexed_jobs(redis, cursor, kind):
        if len(states) == limit and status is None:
            return JobsPage(states, next_before=states[-1]["job_id"])
        try:
            state = job_state(redis, store, job_id)
        except JobNotFoundError:
            _forget_if_missing(redis, job_id)  # deleted while this ran
            continue
        if status is not None and state["status"] != status:
            continue
        if len(states) == limit:
            return JobsPage(states, next_before=states[-1]["job_id"])
        states.append(state)
    return JobsPage(states, next_before=None)


def _indexed_jobs(
    redis: Redis, cursor: tuple[float, str] | None, kind: str | None
) -> Iterator[str]:
    """Yield the ids of the recorded jobs of ``kind`` after ``cursor``, newest first.

    Index entries whose record is gone are removed from the index and skipped.
    """
    for entries in _index_pages(redis, cursor):
        pipe = redis.pipeline(transaction=False)
        for job_id, _ in entries:
            pipe.hmget(_key("job", job_id), ["created", "kind"])
        fields = pipe.execute()
        for (job_id, _), (created, job_kind) in zip(entries, fields, strict=True):
            if created is None:
                _forget_if_missing(redis, job_id)
                continue
            if kind is None or (job_kind is not None and _text(job_kind) == kind):
                yield job_id


def _index_pages(
    redis: Redis, cursor: tuple[float, str] | None
) -> Iterator[list[tuple[str, float]]]:
    """Yield the index entries (job id, score) after ``cursor`` in pages, newest first.

    The order is score descending, then id descending, as ZREVRANGEBYSCORE returns it. Each
    page starts from the (score, id) of the last entry read rather than from an offset, so
    entries that are added or removed while this runs never make it skip or repeat one.
    """
    index = _key(INDEX_KEY)
    if cursor is None:
        page = _entries(
            redis.zrevrangebyscore(
                index, "+inf", "-inf", start=0, num=INDEX_PAGE_SIZE, withscores=True
            )
        )
        if not page:
            return
        yield page
        cursor = (page[-1][1], page[-1][0])
    while True:
        score, last_id = cursor
        pipe = redis.pipeline(transaction=False)
        # The entries with the cursor's score, then the next page of lower scores.
        pipe.zrevrangebyscore(index, score, score, withscores=True)
        pipe.zrevrangebyscore(
            index, f"({score!r}", "-inf", start=0, num=INDEX_PAGE_SIZE, withscores=True
        )
        ties, lower = pipe.execute()
        page = [entry for entry in _entries(ties) if entry[0] < last_id] + _entries(lower)
        if not page:
            return
        yield page
        cursor = (page[-1][1], page[-1][0])


def _entries(rows: Any) -> list[tuple[str, float]]:
    """Return the (member, score) rows of a ZREVRANGEBYSCORE WITHSCORES as (job id, score)."""
    return [(_text(member), float(score)) for member, score in rows]


def _before_cursor(redis: Redis, before: str) -> tuple[float, str]:
    """Return the index position (score, id) of job ``before``.

    Raises JobNotFoundError when ``before`` has no job record.
    """
    created = redis.hget(_key("job", before), "created")
    if created is None:
        _forget_if_missing(redis, before)
        raise JobNotFoundError(
            f"before {before!r} is not a recorded job; pass the id of a job in the list, such "
            "as the next_before value of the previous page",
            field="before",
            value=before,
        )
    score = redis.zscore(_key(INDEX_KEY), before)
    if score is None:
        # A record that an API process without the index wrote after the backfill ran.
        score = _created_score(_text(created))
        redis.zadd(_key(INDEX_KEY), {before: score})
    return float(score), before


# Removes an index entry only while its job record is missing, so that an entry read as stale
# is never removed after the record was written again.
_FORGET_IF_MISSING = """
if redis.call('EXISTS', KEYS[2]) == 0 then
    return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


def _forget_if_missing(redis: Redis, job_id: str) -> None:
    removed = redis.eval(_FORGET_IF_MISSING, 2, _key(INDEX_KEY), _key("job", job_id), job_id)
    if removed:
        logger.info("job %s: record not found, removed from the job index", job_id)


def _backfill_index(redis: Redis) -> None:
    """Add the job records written before the index existed to it, once per Redis database.

    API processes that find the marker key missing at the same time all run this. That is
    safe because each adds the same entries with the same scores, and the marker is set only
    after a full pass.

    NOTE: during a rolling upgrade, a record that an API process of the previous version
    writes after the marker is set has no index entry, so the list leaves it out.
    """
    if redis.exists(_key(INDEX_BACKFILLED_KEY)):
        return
    added = 0
    batch: list[str] = []
    for key in redis.scan_iter(match=_key("job", "*"), count=1000):
        batch.append(_text(key).rsplit(":", 1)[1])
        if len(batch) == 1000:
            added += _index_records(redis, batch)
            batch = []
    added += _index_records(redis, batch)
    redis.set(_key(INDEX_BACKFILLED_KEY), dt.datetime.now(dt.timezone.utc).isoformat())
    logger.info("job index backfilled: %d job records added", added)


def _index_records(redis: Redis, job_ids: list[str]) -> int:
    """Add ``job_ids`` to the index scored by their records' creation time; return how many."""
    if not job_ids:
        return 0
    pipe = redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(_key("job", job_id), "created")
    scores = {
        job_id: _created_score(_text(created))
        for job_id, created in zip(job_ids, pipe.execute(), strict=True)
        if created is not None  # deleted since the scan, or a partial record
    }
    if scores:
        redis.zadd(_key(INDEX_KEY), scores)
    return len(scores)


# Deletes a job record, its index entry and its target's pointer to it (only if the pointer
# still names this job), in one step.
_DELETE_JOB = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
end
return 1
"""


def prune_jobs(redis: Redis, store: Store, *, older_than_days: float) -> int:
    """Delete the records of ended jobs created more than ``older_than_days`` days ago.

    A job that is queued or running keeps its record whatever its age. Each job is checked and
    deleted under the lock of its target, so a resume or cancel at the same time either runs
    first or finds no job. Returns the number of records deleted.
    """
    _backfill_index(redis)
    cutoff = time.time() - older_than_days * 86400.0
    index = _key(INDEX_KEY)
    deleted = kept = 0
    while True:
        # Entries kept by earlier pages stay at the head of the range, so the page skips them.
        page = redis.zrangebyscore(index, "-inf", cutoff, start=kept, num=INDEX_PAGE_SIZE)
        if not page:
            return deleted
        for raw in page:
            job_id = _text(cast(bytes, raw))
            try:
                target = load_job(redis, job_id)["target"]
            except JobNotFoundError:
                _forget_if_missing(redis, job_id)
                continue
            with target_lock(redis, target):
                try:
                    ended = job_state(redis, store, job_id)["status"] in ENDED_STATUSES
                except JobNotFoundError:
                    ended = True  # deleted by another pass meanwhile
                if not ended:
                    kept += 1
                    continue
                keys = (_key("job", job_id), index, _key("target", target))
                redis.eval(_DELETE_JOB, len(keys), *keys, job_id)
                deleted += 1


def prune_jobs_if_due(redis: Redis, store: Store, *, older_than_days: float) -> int | None:
    """Run `prune_jobs` unless retention is off (0 days) or a process of the deployment ran it
    in the last PRUNE_INTERVAL seconds.

    Returns the number of records deleted, or None when the pass did not run.
    """
    if older_than_days <= 0:
        return None
    if not redis.set(_key(PRUNE_MARKER_KEY), time.time(), nx=True, ex=PRUNE_INTERVAL):
        return None
    deleted = prune_jobs(redis, store, older_than_days=older_than_days)
    logger.info(
        "job records pruned: %d records of jobs that ended and were created over %g days ago",
        deleted,
        older_than_days,
    )
    return deleted


def record_progress_at_delete(redis: Redis, target: str, progress: dict[str, int]) -> None:
    """Write a feature set's ``progress`` into the record of the last job for it, before the
    set is deleted."""
    job_id = active_job_id(redis, target)
    if job_id is None:
        return
    key = _key("job", job_id)

    def write(pipe: Pipeline) -> None:
        # A record pruned meanwhile stays deleted: one field alone is no job record.
        if not pipe.exists(key):
            return
        pipe.multi()
        pipe.hset(key, DELETED_PROGRESS_FIELD, json.dumps(progress))

    redis.transaction(write, key)


def busy_job(redis: Redis, store: Store, target: str) -> tuple[str, str] | None:
    """Return (job id, status) of the job of ``target`` while it is queued or running, else None.

    A canceled job counts as busy while an rq job that started before the cancel still runs,
    because that rq job may still write the target.
    """
    job_id = active_job_id(redis, target)
    if job_id is None:
        return None
    state = job_state(redis, store, job_id)["status"]
    if state == "canceled" and _started_count(_statuses(redis, job_id)):
        return job_id, "canceled but still running"
    return (job_id, state) if state in ("queued", "running") else None


def require_stopped(redis: Redis, store: Store, target: str, *, field: str, value: object) -> None:
    """Raise NotReadyError while a canceled job of ``target`` still runs an rq job.

    A new job for the target would otherwise compute it beside the canceled one until that one
    reaches its next cancel check.
    """
    busy = busy_job(redis, store, target)
    if busy is not None and busy[1] == "canceled but still running":
        raise NotReadyError(
            f"job {busy[0]} for the same work was canceled and is still stopping (a probe, "
            "projection or pretraining stops at its next check); send the request again in a "
            f"few seconds, or follow GET /v1/jobs/{busy[0]}",
            field=field,
            value=value,
        )


# -- cancel ------------------------------------------------------------------------------------


def request_cancel(redis: Redis, job_id: str) -> int:
    """Record a cancel of ``job_id`` and cancel its waiting rq jobs in rq; return how many.

    The cancel is recorded in the job record first, so an rq job that a worker takes while
    this runs reads it when it starts. rq jobs that already run are left to the worker:
    extraction blocks finish, and probes, projections and pretraining raise at their next
    cancel check.
    """
    record = load_job(redis, job_id)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    redis.hset(_key("job", job_id), CANCELED_FIELD, now)
    canceled = sum(_cancel_waiting(job) for job in _fetch(redis, record["rq_ids"]) if job)
    logger.info("job %s: canceled, %d waiting rq jobs canceled in rq", job_id, canceled)
    return canceled


def _cancel_waiting(job: Job) -> bool:
    """Cancel ``job`` in rq if it is waiting; return whether it was canceled.

    The status is read again because workers take jobs while a cancel goes through the rq jobs
    of an extraction. A job a worker has taken runs, and stops at the cancel recorded in the
    layerbank job record.
    """
    if job.get_status(refresh=True) not in (
        JobStatus.QUEUED,
        JobStatus.DEFERRED,
        JobStatus.SCHEDULED,
    ):
        return False
    try:
        job.cancel()
    except InvalidJobOperation:
        return False  # a concurrent cancel got there first
    except ValueError as exc:
        # rq's cancel of a job that has just started looks up its execution, which the
        # worker may not have written yet.
        logger.info("rq job %s started while it was canceled (%s); it stops itself", job.id, exc)
        return False
    return True


def clear_cancel(redis: Redis, job_id: str) -> None:
    """Delete the cancel time of ``job_id``, so that its resumed rq jobs run."""
    redis.hdel(_key("job", job_id), CANCELED_FIELD)


def _canceled_message(job_id: str, canceled_at: str, statuses: list[JobStatus | None]) -> str:
    message = f"canceled by request at {canceled_at}"
    started = _started_count(statuses)
    if started:
        message += (
            f"; {started} rq jobs that had started still run (an extraction block finishes, "
            "other jobs stop at their next check)"
        )
    return f"{message}; resume it with POST /v1/jobs/{job_id}/resume"


def _statuses(redis: Redis, job_id: str) -> list[JobStatus | None]:
    return [
        job.get_status(refresh=False) if job else None
        for job in _fetch(redis, load_job(redis, job_id)["rq_ids"])
    ]


def _started_count(statuses: list[JobStatus | None]) -> int:
    return sum(status == JobStatus.STARTED for status in statuses)


def _release_abandoned(redis: Redis, rq_jobs: list[Job | None]) -> bool:
    """Let rq retry or fail the started jobs whose worker stopped sending heartbeats.

    rq notices a dead worker only when a started-job registry is cleaned. Each worker cleans it
    about every ten minutes, so cleaning on read makes the job's status correct when it is read.
    Returns whether an expired job was found, so the statuses of ``rq_jobs`` may have changed.
    """
    origins = {
        job.origin
        for job in rq_jobs
        if job is not None and job.get_status(refresh=False) == JobStatus.STARTED
    }
    released = False
    for origin in sorted(origins):
        registry = StartedJobRegistry(origin, connection=redis)
        if registry.get_expired_job_ids():
            registry.cleanup()
            released = True
    return released


def _fetch(redis: Redis, ids: list[str]) -> list[Job | None]:
    try:
        return Job.fetch_many(ids, connection=redis)
    except NoSuchJobError:
        return [None for _ in ids]


def _last_line(job: Job, job_id: str) -> str:
    """Return the error message of a failed rq job that belongs to layerbank job ``job_id``."""
    latest = job.latest_result()
    text = latest.exc_string if latest is not None and latest.exc_string else "job failed"
    if "AbandonedJobError" in text:
        return (
            "the worker running this job stopped (killed or lost) and its retries are used "
            f"up; resume it with POST /v1/jobs/{job_id}/resume or send the same POST again"
        )
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "job failed"


def requeue_failed(redis: Redis, job_id: str) -> int:
    """Put the failed and canceled rq jobs of a single-job record back on their queue.

    Returns how many were queued again.
    """
    record = load_job(redis, job_id)
    requeued = 0
    for job in _fetch(redis, record["rq_ids"]):
        if job is None:
            continue
        status = job.get_status(refresh=False)
        if status not in (JobStatus.FAILED, JobStatus.CANCELED):
            continue
        job.meta.pop("error", None)
        # The run starts from the beginning, so the progress of the last run is reset.
        old_progress = job.meta.get("progress") or {}
        if "total" in old_progress:
            job.meta["progress"] = {"done": 0, "total": old_progress["total"]}
        job.save_meta()
        # A run that failed or was canceled used up its retries (a cancel sets them to 0).
        # The requeue saves the job, so the resumed run gets the retries of a new job.
        job.retries_left = BLOCK_RETRIES
        if status == JobStatus.FAILED:
            job.requeue()
        else:
            CanceledJobRegistry(job.origin, connection=redis).requeue(job)
        requeued += 1
    logger.info("job %s: %d failed or canceled rq jobs queued again", job_id, requeued)
    return requeued


def result_status(
    redis: Redis, store: Store, target: str, stored_status: str | None
) -> tuple[str, str | None, dict[str, Any] | None]:
    """Return (status, job id, error) of a probe or projection result.

    The stored status is "complete" once the result is written. Until then the status of the
    job that computes it ("queued", "running" or "failed") is reported with its error, so a
    client never waits on a result whose job has failed.
    """
    job_id = active_job_id(redis, target)
    if stored_status == "complete":
        return "complete", job_id, None
    if job_id is None:
        return (
            "failed",
            None,
            {
                "message": "no job computes this result (its record was lost); "
                "send the same POST again",
                "field": None,
                "value": None,
            },
        )
    try:
        state = job_state(redis, store, job_id)
    except JobNotFoundError:
        return (
            "failed",
            job_id,
            {
                "message": "the job record of this result was lost; send the same POST again",
                "field": None,
                "value": None,
            },
        )
    return state["status"], job_id, state["error"]


def not_complete_message(
    kind: str, result_id: str, status: str, job_id: str | None, error: dict[str, Any] | None
) -> str:
    """Return the 409 message for a result that is not complete: failed, canceled or computing."""
    if status == "canceled":
        return (
            f"{kind} {result_id!r} is not complete: its job {job_id} was canceled; resume it "
            f"with POST /v1/jobs/{job_id}/resume or send the same POST again"
        )
    if status == "failed":
        reason = (error or {}).get("message") or "unknown error"
        return (
            f"{kind} {result_id!r} failed: {reason}; fix the request and send it again "
            "(the same POST queues it once more)"
        )
    return f"{kind} {result_id!r} is not complete yet ({status}); wait for job {job_id}"


def running_params(redis: Redis, job_id: str) -> Any:
    """Return the last argument of a single-job record's rq job (the parameters it runs with)."""
    record = load_job(redis, job_id)
    jobs = _fetch(redis, record["rq_ids"][-1:])
    if not jobs or jobs[0] is None or not jobs[0].args:
        return None
    return jobs[0].args[-1]


class Quota(Protocol):
    """A per-key job limit: ``check`` raises when the key is at its limit."""

    def check(self) -> None: ...

    def record(self, job_id: str) -> None: ...


@dataclass(frozen=True)
class Submission:
    """Outcome of a POST that computes a stored result: a new job, a running one, or none."""

    job_id: str | None
    status: str  # "complete", "queued" or "running"
    created: bool


def submit_result_job(
    store: Store,
    queue: Queue,
    quota: Quota,
    *,
    group: str,
    result_id: str,
    attrs: dict[str, Any],
    func: str,
    kind: str,
    timeout: int,
    total: int | None = None,
) -> Submission:
    """Queue the job computing ``<group>/<result_id>`` unless it is complete or being computed.

    Under a Redis lock on the result id, so concurrent identical requests on any API replica
    queue one job. A failed or lost earlier job is replaced by a new one.
    """
    redis = queue.connection
    with target_lock(redis, result_id):
        stored = store.read_result(group, result_id)
        existing_job = active_job_id(redis, result_id)
        if stored is not None and stored.get("status") == "complete":
            return Submission(existing_job, "complete", created=False)
        if existing_job is not None:
            state = job_state(redis, store, existing_job)
            if state["status"] in ("queued", "running"):
                return Submission(existing_job, state["status"], created=False)
            require_stopped(redis, store, result_id, field=f"{kind}_id", value=result_id)
        quota.check()
        store.write_result(group, result_id, attrs)
        job_id = enqueue_single(
            queue, func, (result_id,), kind=kind, target=result_id, timeout=timeout, total=total
        )
        quota.record(job_id)
    return Submission(job_id, "queued", created=stored is None)
