"""A worker that `layerbank up` kills on shutdown gives its job back to rq at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from service.launcher import WorkerSupervisor


def _start_busy_worker(
    stack_env: dict[str, str], tmp_path: Path, queue: Queue, job: Job | None
) -> tuple[WorkerSupervisor, Job]:
    """Start one supervised worker and wait until it runs ``job`` (a new long job if None)."""
    supervisor = WorkerSupervisor(
        1,
        stack_env["REDIS_URL"],
        env={**stack_env, "LAYERBANK_QUEUE": queue.name},
        log_dir=tmp_path,
    )
    if job is None:
        # A job longer than the stop timeout, so the worker is killed while it runs.
        job = queue.enqueue(time.sleep, 120, retry=Retry(max=1), job_timeout=300)
    deadline = time.monotonic() + 120
    while job.get_status() != JobStatus.STARTED and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.get_status() == JobStatus.STARTED
    return supervisor, job


def test_killed_worker_job_requeued(stack_env: dict[str, str], tmp_path: Path) -> None:
    """Three stops in a row give the job back each time, without using its one retry."""
    redis = Redis.from_url(stack_env["REDIS_URL"])
    queue = Queue(f"up-restart-{uuid.uuid4().hex[:8]}", connection=redis)
    job = None
    try:
        for _ in range(3):
            supervisor, job = _start_busy_worker(stack_env, tmp_path, queue, job)
            pid = supervisor.processes[0].pid
            supervisor.stop(timeout=1.0)
            # The heartbeat (30 s by default) has not expired, yet the job is queued again.
            job.refresh()
            assert job.get_status() == JobStatus.QUEUED
            assert job.retries_left == 1
            assert job.id in queue.get_job_ids()
            started = StartedJobRegistry(queue.name, connection=redis)
            assert job.id not in started.get_job_ids(cleanup=False)
            assert all(worker.pid != pid for worker in Worker.all(connection=redis))
    finally:
        queue.empty()
        redis.close()


def test_second_signal_stops_at_once(
    stack_env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGINT while the supervisor waits for a busy worker kills it at once."""
    redis = Redis.from_url(stack_env["REDIS_URL"])
    queue = Queue(f"up-interrupt-{uuid.uuid4().hex[:8]}", connection=redis)
    caplog.set_level(logging.INFO, logger="service.launcher")

    def interrupt_when_waiting() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any("waiting up to" in record.getMessage() for record in caplog.records):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    try:
        supervisor, job = _start_busy_worker(stack_env, tmp_path, queue, None)
        interrupter = threading.Thread(target=interrupt_when_waiting)
        interrupter.start()
        started = time.monotonic()
        supervisor.stop(timeout=60.0)
        elapsed = time.monotonic() - started
        interrupter.join()
        waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
        assert waiting == [
            "waiting up to 60 s for 1 busy worker to finish its job; press Ctrl-C again to stop now"
        ]
        assert elapsed < 30
        assert supervisor.processes[0].returncode is not None
        job.refresh()
        assert job.get_status() == JobStatus.QUEUED
        assert job.retries_left == 1
        (killed,) = [r.getMessage() for r in caplog.records if "was killed" in r.getMessage()]
        assert f"rq job {job.id}; the job is queued (1 retries left)" in killed
    finally:
        queue.empty()
        redis.close()


def test_idle_worker_stops_cleanly(stack_env: dict[str, str], tmp_path: Path) -> None:
    """An idle worker exits on SIGTERM and deregisters itself, so nothing is killed."""
    queue_name = f"up-idle-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(stack_env["REDIS_URL"])
    supervisor = WorkerSupervisor(
        1,
        stack_env["REDIS_URL"],
        env={**stack_env, "LAYERBANK_QUEUE": queue_name},
        log_dir=tmp_path,
    )
    pid = supervisor.processes[0].pid
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and all(
        worker.pid != pid for worker in Worker.all(connection=redis)
    ):
        time.sleep(0.2)
    supervisor.stop()
    assert supervisor.processes[0].returncode == 0
    assert all(worker.pid != pid for worker in Worker.all(connection=redis))
    redis.close()
