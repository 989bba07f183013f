"""How the worker logs the exception that ends a job: a cancel without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job

from workers.errors import JobCanceledError
from workers.heartbeat import HeartbeatWorker


@pytest.fixture
def worker(redis_server: Any) -> Iterator[tuple[HeartbeatWorker, Job]]:
    connection = Redis.from_url(redis_server.url)
    queue = Queue("worker-errors", connection=connection)
    job = queue.enqueue("workers.jobs.run_probe", "0" * 24)
    yield HeartbeatWorker([queue], connection=connection), job
    queue.delete(delete_jobs=True)
    connection.close()


def _raised(exc: BaseException) -> Any:
    try:
        raise exc
    except BaseException:
        return sys.exc_info()


@pytest.mark.parametrize(
    ("exc", "level", "traceback_logged"),
    [
        (JobCanceledError("canceled by request", field="job_id", value="x"), logging.INFO, False),
        (ValueError("a bug"), logging.ERROR, True),
    ],
)
def test_job_exception_log_level(
    worker: tuple[HeartbeatWorker, Job],
    caplog: pytest.LogCaptureFixture,
    exc: BaseException,
    level: int,
    traceback_logged: bool,
) -> None:
    heartbeat_worker, job = worker
    handled: list[BaseException] = []
    heartbeat_worker.push_exc_handler(lambda _job, _type, value, _tb: handled.append(value))
    caplog.set_level(logging.DEBUG)

    heartbeat_worker.handle_exception(job, *_raised(exc))

    about_job = [r for r in caplog.records if job.id in r.getMessage()]
    assert max(r.levelno for r in about_job) == level
    assert any("Traceback" in r.getMessage() for r in about_job) is traceback_logged
    assert handled == [exc]
