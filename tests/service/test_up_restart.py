"""A worker that `layerbank up` kills on shutdown gives its job back to rq at once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from redis import Redis
from rq import Queue, Retry, Worker
from rq.job import JobStatus
from rq.registry import StartedJobRegistry

from service.launcher import WorkerSupervisor


def test_killed_worker_job_requeued(stack_env: dict[str, str], tmp_path: Path) -> None:
    queue_name = f"up-restart-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(stack_env["REDIS_URL"])
    queue = Queue(queue_name, connection=redis)
    supervisor = WorkerSupervisor(
        1,
        stack_env["REDIS_URL"],
        env={**stack_env, "LAYERBANK_QUEUE": queue_name},
        log_dir=tmp_path,
    )
    pid = supervisor.processes[0].pid
    try:
        # A job longer than the stop timeout, so the worker is killed while it runs.
        job = queue.enqueue(time.sleep, 120, retry=Retry(max=1), job_timeout=300)
        deadline = time.monotonic() + 120
        while job.get_status() != JobStatus.STARTED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.get_status() == JobStatus.STARTED
    finally:
        supervisor.stop(timeout=1.0)
    try:
        # The heartbeat (30 s by default) has not expired, yet rq already retried the job.
        job.refresh()
        assert job.get_status() == JobStatus.QUEUED
        assert job.retries_left == 0
        assert job.id in queue.get_job_ids()
        assert job.id not in StartedJobRegistry(queue_name, connection=redis).get_job_ids(
            cleanup=False
        )
        assert all(worker.pid != pid for worker in Worker.all(connection=redis))
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
