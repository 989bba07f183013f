"""The job index behind GET /v1/jobs, its paging with `before`, and `layerbank jobs` listing.

Jobs here are real records written by `save_job` for rq jobs on a queue that no worker serves,
so they stay queued. Their creation times are set in the year 2999, so they are the newest jobs
of the session's Redis and the first ones listed, whatever other test modules have recorded.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from typer.testing import CliRunner

from service.cli import app
from service.client import Client, ClientError
from service.jobs import (
    FINISHED_FIELD,
    INDEX_BACKFILLED_KEY,
    INDEX_KEY,
    PRUNE_INTERVAL,
    PRUNE_MARKER_KEY,
    _key,
    list_jobs,
    new_job_id,
    prune_jobs,
    prune_jobs_if_due,
    request_cancel,
    save_job,
)
from store import Store

runner = CliRunner()

INDEX = _key(INDEX_KEY)
BACKFILLED = _key(INDEX_BACKFILLED_KEY)
# Each test takes its own hour of the year 2999, later than the previous test's, so the jobs
# of the running test are always the newest.
_HOURS = itertools.count()


@pytest.fixture(scope="module")
def redis(redis_server: Any) -> Iterator[Redis]:
    connection = Redis.from_url(redis_server.url)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def api(api_url: str) -> Iterator[Client]:
    with Client(api_url, timeout=60) as client:
        yield client


@pytest.fixture
def base_time() -> dt.datetime:
    return dt.datetime(2999, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=next(_HOURS))


@pytest.fixture
def recorder(redis: Redis) -> Iterator[Recorder]:
    recorder = Recorder(redis)
    yield recorder
    recorder.delete_all()


class Recorder:
    """Writes job records through `save_job` and deletes them, with their index entries, after."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # No worker serves this queue, so its rq jobs stay queued.
        self.queue = Queue(f"index-{uuid.uuid4().hex[:8]}", connection=redis)
        self.job_ids: list[str] = []
        self.targets: dict[str, str] = {}

    def record(self, created: dt.datetime, kind: str = "probe", *, index: bool = True) -> str:
        """Record a queued job of ``kind`` first created at ``created``; return its id.

        The record gets its ``created`` field before `save_job` runs, as a resumed job has it,
        and `save_job` keeps it. With ``index=False`` the record is written as the code before
        the index wrote it: the same fields, and no index entry.
        """
        job_id = new_job_id()
        target = uuid.uuid4().hex[:24]
        rq_job = self.queue.enqueue_call(
            f"workers.jobs.run_{kind}", args=(target,), meta={"layerbank_job": job_id}
        )
        self.redis.hset(_key("job", job_id), "created", created.isoformat())
        if index:
            save_job(self.redis, job_id, kind=kind, target=target, rq_ids=[rq_job.id])
        else:
            self.redis.hset(
                _key("job", job_id),
                mapping={"kind": kind, "target": target, "rq_ids": json.dumps([rq_job.id])},
            )
        self.job_ids.append(job_id)
        self.targets[job_id] = target
        return job_id

    def delete_all(self) -> None:
        for job_id in self.job_ids:
            self.redis.delete(_key("job", job_id))
            self.redis.zrem(INDEX, job_id)
        self.queue.delete(delete_jobs=True)


def _page(api: Client, **params: Any) -> dict[str, Any]:
    answer = api.request("GET", "/v1/jobs", params=params).json()
    assert answer["count"] == len(answer["data"])
    return answer


def _ids(page: dict[str, Any]) -> list[str]:
    return [job["job_id"] for job in page["data"]]


def _newest_first(job_ids: list[str], created: list[dt.datetime]) -> list[str]:
    """Return ``job_ids`` in list order: creation time descending, then id descending."""
    return [job_id for _, job_id in sorted(zip(created, job_ids, strict=True), reverse=True)]


# -- the index -----------------------------------------------------------------------------


def test_save_job_indexes_first_creation_time(
    redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    job_id = recorder.record(base_time)
    record = redis.hgetall(_key("job", job_id))

    save_job(
        redis,
        job_id,
        kind="probe",
        target=record[b"target"].decode(),
        rq_ids=json.loads(record[b"rq_ids"]),
    )

    assert redis.zscore(INDEX, job_id) == base_time.timestamp()
    assert redis.hget(_key("job", job_id), "created") == base_time.isoformat().encode()


def test_new_job_scored_by_its_created_field(redis: Redis, recorder: Recorder) -> None:
    job_id = new_job_id()
    recorder.job_ids.append(job_id)
    save_job(redis, job_id, kind="probe", target=uuid.uuid4().hex[:24], rq_ids=[])

    created = redis.hget(_key("job", job_id), "created")

    assert created is not None
    assert redis.zscore(INDEX, job_id) == dt.datetime.fromisoformat(created.decode()).timestamp()


# -- listing -------------------------------------------------------------------------------


def test_list_newest_first(api: Client, recorder: Recorder, base_time: dt.datetime) -> None:
    created = [base_time + dt.timedelta(seconds=s) for s in (3, 1, 2, 5, 4)]
    job_ids = [recorder.record(moment) for moment in created]

    page = _page(api, limit=5)

    assert _ids(page) == _newest_first(job_ids, created)
    assert [job["created"] for job in page["data"]] == [
        moment.isoformat() for moment in sorted(created, reverse=True)
    ]


def test_list_limit_and_next_before(
    api: Client, recorder: Recorder, base_time: dt.datetime
) -> None:
    job_ids = [recorder.record(base_time + dt.timedelta(seconds=s)) for s in range(4)]

    page = _page(api, limit=2)

    assert _ids(page) == [job_ids[3], job_ids[2]]
    assert page["count"] == 2
    assert page["next_before"] == job_ids[2]


def test_list_filters_kind_and_status(
    api: Client, redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    probe = recorder.record(base_time + dt.timedelta(seconds=3), "probe")
    projection = recorder.record(base_time + dt.timedelta(seconds=2), "projection")
    canceled = recorder.record(base_time + dt.timedelta(seconds=1), "probe")
    request_cancel(redis, canceled)

    probes = _page(api, kind="probe", limit=2)
    projections = _page(api, kind="projection", limit=1)
    canceled_jobs = _page(api, status="canceled", limit=1)
    queued_probes = _page(api, kind="probe", status="queued", limit=1)

    assert _ids(probes) == [probe, canceled]
    assert _ids(projections) == [projection]
    assert {job["kind"] for job in projections["data"]} == {"projection"}
    assert _ids(canceled_jobs) == [canceled]
    assert canceled_jobs["data"][0]["status"] == "canceled"
    assert _ids(queued_probes) == [probe]


def test_next_before_null_after_last_match(
    api: Client, redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    """The last canceled job of the whole list ends the pages of status=canceled."""
    first = recorder.record(base_time + dt.timedelta(seconds=1))
    second = recorder.record(base_time + dt.timedelta(seconds=2))
    for job_id in (first, second):
        request_cancel(redis, job_id)
    # Jobs of other test modules may be canceled too: page from the older of these two on.
    older = _page(api, status="canceled", limit=1, before=second)
    assert _ids(older) == [first]

    pages = [older]
    while pages[-1]["next_before"] is not None:
        pages.append(_page(api, status="canceled", limit=50, before=pages[-1]["next_before"]))

    listed = [job_id for page in pages for job_id in _ids(page)]
    assert len(listed) == len(set(listed))
    assert pages[-1]["next_before"] is None


def test_paging_equal_creation_times(
    api: Client, recorder: Recorder, base_time: dt.datetime
) -> None:
    """Seven jobs, five created at the same instant, read two per page."""
    one_second = dt.timedelta(seconds=1)
    created = [base_time + one_second, *[base_time] * 5, base_time - one_second]
    job_ids = [recorder.record(moment) for moment in created]
    expected = _newest_first(job_ids, created)

    page = _page(api, limit=2)
    listed = _ids(page)
    while page["next_before"] is not None and len(listed) < len(expected):
        assert page["next_before"] == _ids(page)[-1]
        page = _page(api, limit=2, before=page["next_before"])
        listed += _ids(page)

    assert listed[: len(expected)] == expected
    assert len(set(listed)) == len(listed)


def test_paging_ties_wider_than_index_page(
    redis: Redis,
    recorder: Recorder,
    base_time: dt.datetime,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run of equal creation times longer than one index read is listed once, in id order."""
    monkeypatch.setattr("service.jobs.INDEX_PAGE_SIZE", 2)
    job_ids = [recorder.record(base_time) for _ in range(5)]
    newer = recorder.record(base_time + dt.timedelta(seconds=1))
    store = Store(settings.store)

    listed: list[str] = []
    page = list_jobs(redis, store, limit=3)
    listed += [job["job_id"] for job in page.jobs]
    page = list_jobs(redis, store, limit=3, before=page.next_before)
    listed += [job["job_id"] for job in page.jobs]

    assert listed == [newer, *sorted(job_ids, reverse=True)]


def test_stale_index_entry_removed(
    api: Client, redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    live_job = recorder.record(base_time)
    deleted_job = recorder.record(base_time + dt.timedelta(seconds=1))
    assert redis.zscore(INDEX, deleted_job) is not None
    redis.delete(_key("job", deleted_job))

    page = _page(api, limit=1)

    assert _ids(page) == [live_job]
    assert redis.zscore(INDEX, deleted_job) is None


def test_backfill_of_records_without_index(
    api: Client, redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    """Records written before the index existed are indexed by the first list call."""
    old = [recorder.record(base_time + dt.timedelta(seconds=s), index=False) for s in (2, 1)]
    indexed = recorder.record(base_time)
    redis.delete(BACKFILLED)
    assert redis.zscore(INDEX, old[0]) is None

    page = _page(api, limit=3)

    assert _ids(page) == [*old, indexed]
    assert redis.zscore(INDEX, old[0]) == (base_time + dt.timedelta(seconds=2)).timestamp()
    assert redis.exists(BACKFILLED)


def test_backfill_after_index_deleted(
    api: Client, redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    job_ids = [recorder.record(base_time + dt.timedelta(seconds=s)) for s in (2, 1)]
    redis.delete(INDEX, BACKFILLED)

    page = _page(api, limit=2)

    assert _ids(page) == job_ids


def test_concurrent_backfill_lists_each_job_once(
    redis: Redis, recorder: Recorder, base_time: dt.datetime, settings: Any
) -> None:
    job_ids = [recorder.record(base_time + dt.timedelta(seconds=s), index=False) for s in (3, 2, 1)]
    redis.delete(BACKFILLED)
    store = Store(settings.store)
    barrier = threading.Barrier(4)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        with Redis.from_url(settings.redis_url) as connection:
            barrier.wait()
            try:
                page = list_jobs(connection, store, limit=3)
            except BaseException as exc:  # reported by the assert below
                errors.append(exc)
                return
            results.append([job["job_id"] for job in page.jobs])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert results == [job_ids] * 4
    assert redis.exists(BACKFILLED)


# -- the before parameter ------------------------------------------------------------------


def test_before_unknown_job_is_404(api: Client) -> None:
    missing = uuid.uuid4().hex[:24]

    with pytest.raises(ClientError) as info:
        api.request("GET", "/v1/jobs", params={"before": missing})

    assert info.value.status_code == 404
    assert info.value.detail["field"] == "before"
    assert info.value.detail["value"] == missing
    assert missing in info.value.detail["message"]


@pytest.mark.parametrize("before", ["../x", "ABCDEF", "0" * 25])
def test_before_invalid_id_is_422(api: Client, before: str) -> None:
    with pytest.raises(ClientError) as info:
        api.request("GET", "/v1/jobs", params={"before": before})

    assert info.value.status_code == 422
    assert info.value.detail["field"] == "before"
    assert info.value.detail["value"] == before


def test_before_deleted_job_is_404(
    api: Client, redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    deleted_job = recorder.record(base_time)
    redis.delete(_key("job", deleted_job))

    with pytest.raises(ClientError) as info:
        api.jobs(before=deleted_job)

    assert info.value.status_code == 404
    assert info.value.detail["field"] == "before"
    assert redis.zscore(INDEX, deleted_job) is None


# -- client --------------------------------------------------------------------------------


def test_client_iter_jobs_follows_pages(
    api: Client, recorder: Recorder, base_time: dt.datetime
) -> None:
    created = [base_time] * 3 + [base_time + dt.timedelta(seconds=1)] * 2
    job_ids = [recorder.record(moment) for moment in created]

    listed = [job["job_id"] for job in itertools.islice(api.iter_jobs(page_size=2), 5)]

    assert listed == _newest_first(job_ids, created)


def test_client_rejects_invalid_before(api: Client) -> None:
    with pytest.raises(ClientError) as info:
        api.jobs(before="../x")

    assert info.value.status_code == 422
    assert info.value.detail["field"] == "before"


# -- CLI -----------------------------------------------------------------------------------


def run_cli(api_url: str, *args: str) -> Any:
    """Run ``layerbank ARGS --url API_URL`` in-process and return click's Result."""
    return runner.invoke(app, [*args, "--url", api_url], catch_exceptions=False)


def test_cli_jobs_table(api_url: str, recorder: Recorder, base_time: dt.datetime) -> None:
    probe_created = base_time + dt.timedelta(seconds=1)
    probe = recorder.record(probe_created, "probe")
    projection = recorder.record(base_time, "projection")
    recorder.record(base_time - dt.timedelta(seconds=1), "probe")  # on the next page

    result = run_cli(api_url, "jobs", "--limit", "2")

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    # Each job takes two lines: id, kind, progress and date, then target, status and time.
    probe_at = next(i for i, line in enumerate(lines) if probe in line)
    projection_at = next(i for i, line in enumerate(lines) if projection in line)
    assert probe_at < projection_at
    for text in ("probe", "0/1 steps", "2999-01-01"):
        assert text in lines[probe_at]
    for text in (recorder.targets[probe], "queued", probe_created.strftime("%H:%M:%S")):
        assert text in lines[probe_at + 1]
    assert "projection" in lines[projection_at]
    assert recorder.targets[projection] in lines[projection_at + 1]
    assert f"layerbank jobs --before {projection}" in result.stdout


def test_cli_jobs_json_pages(api_url: str, recorder: Recorder, base_time: dt.datetime) -> None:
    job_ids = [recorder.record(base_time + dt.timedelta(seconds=s)) for s in (3, 2, 1)]

    first = run_cli(api_url, "jobs", "--limit", "2", "--kind", "probe", "--json")
    assert first.exit_code == 0, first.stderr
    first_page = json.loads(first.stdout)
    second = run_cli(
        api_url, "jobs", "--limit", "1", "--before", first_page["next_before"], "--json"
    )
    assert second.exit_code == 0, second.stderr
    second_page = json.loads(second.stdout)

    assert _ids(first_page) == job_ids[:2]
    assert first_page["next_before"] == job_ids[1]
    assert _ids(second_page) == job_ids[2:]


def test_cli_jobs_status_filter(
    api_url: str, redis: Redis, recorder: Recorder, base_time: dt.datetime
) -> None:
    canceled = recorder.record(base_time)
    recorder.record(base_time + dt.timedelta(seconds=1))
    request_cancel(redis, canceled)

    result = run_cli(api_url, "jobs", "--status", "canceled", "--limit", "1", "--json")

    assert result.exit_code == 0, result.stderr
    assert _ids(json.loads(result.stdout)) == [canceled]


def test_cli_jobs_one_job_unchanged(
    api_url: str, recorder: Recorder, base_time: dt.datetime
) -> None:
    job_id = recorder.record(base_time)

    result = run_cli(api_url, "jobs", job_id, "--json")

    assert result.exit_code == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["job_id"] == job_id
    assert state["status"] == "queued"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--status", "done"), "--status"),
        (("--kind", "train"), "--kind"),
        (("--limit", "0"), "--limit"),
        (("--watch",), "--watch"),
        (("0" * 24, "--status", "queued"), "--status"),
        (("0" * 24, "--limit", "5"), "--limit"),
    ],
)
def test_cli_jobs_usage_errors(api_url: str, args: tuple[str, ...], option: str) -> None:
    result = run_cli(api_url, "jobs", *args)

    assert result.exit_code == 2
    assert option in result.stderr


def test_cli_jobs_unknown_before(api_url: str) -> None:
    missing = uuid.uuid4().hex[:24]

    result = run_cli(api_url, "jobs", "--before", missing)

    assert result.exit_code == 1
    assert result.stderr.startswith("error: HTTP 404: before ")
    assert missing in result.stderr


# -- pruning old records ---------------------------------------------------------------------


def _days_since(when: dt.datetime) -> float:
    return (dt.datetime.now(dt.timezone.utc) - when).total_seconds() / 86400.0


def test_prune_deletes_old_ended_jobs_only(
    api: Client, redis: Redis, recorder: Recorder, stack_dirs: dict[str, Any]
) -> None:
    old = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    queued = recorder.record(old)
    canceled = recorder.record(old + dt.timedelta(hours=1))
    request_cancel(redis, canceled)
    finished = recorder.record(old + dt.timedelta(hours=2))
    # What a worker writes when the job's work ends complete.
    redis.hset(_key("job", finished), FINISHED_FIELD, "2000-01-01T03:00:00+00:00")
    recent = recorder.record(old + dt.timedelta(days=3))
    request_cancel(redis, recent)
    store = Store(str(stack_dirs["store"]))

    deleted = prune_jobs(redis, store, older_than_days=_days_since(old + dt.timedelta(days=2)))

    assert deleted == 2
    for job_id in (canceled, finished):
        assert not redis.exists(_key("job", job_id))
        assert redis.zscore(INDEX, job_id) is None
        assert redis.get(_key("target", recorder.targets[job_id])) is None
        with pytest.raises(ClientError) as gone:
            api.job(job_id)
        assert gone.value.status_code == 404
    for job_id in (queued, recent):
        assert api.job(job_id)["status"] in ("queued", "canceled")
        assert redis.zscore(INDEX, job_id) is not None


def test_prune_if_due_once_per_interval(
    redis: Redis, recorder: Recorder, stack_dirs: dict[str, Any]
) -> None:
    old = dt.datetime(2000, 2, 1, tzinfo=dt.timezone.utc)
    first, second = recorder.record(old), recorder.record(old)
    request_cancel(redis, first)
    request_cancel(redis, second)
    store = Store(str(stack_dirs["store"]))
    days = _days_since(old + dt.timedelta(days=1))
    redis.delete(_key(PRUNE_MARKER_KEY))

    assert prune_jobs_if_due(redis, store, older_than_days=0) is None
    assert prune_jobs_if_due(redis, store, older_than_days=days) == 2
    request_cancel(redis, recorder.record(old))
    assert prune_jobs_if_due(redis, store, older_than_days=days) is None
    assert redis.ttl(_key(PRUNE_MARKER_KEY)) > PRUNE_INTERVAL - 60
    redis.delete(_key(PRUNE_MARKER_KEY))
