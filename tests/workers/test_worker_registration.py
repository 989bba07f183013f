"""A worker registers itself again when Redis loses its data while the worker runs.

rq writes a worker's registration (its hash and its entries in the worker sets) once at
start-up, and `rq.Worker.all`, which ``GET /healthz`` counts, reads only those sets. These
tests run a real worker process against a redis-server of their own, because they flush and
restart it, which the session's shared server (the ``redis_server`` fixture) must not see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from service.launcher import RedisServer, free_port, start_worker, stop_process
from workers.heartbeat import HeartbeatWorker

# Seconds between two heartbeats of a worker. Short, so that a worker notices within about a
# second that its registration is gone.
HEARTBEAT_INTERVAL = 1.0
# Seconds a worker gets to appear in `Worker.all` after it starts or after Redis lost its data.
LISTED_TIMEOUT = 30.0
# The line the worker logs when it writes its registration again.
REREGISTERED = "registered again"

StartWorker = Callable[[str], tuple[subprocess.Popen[bytes], Path]]


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server without persistence, so a restart comes back empty."""
    server = RedisServer(
        free_port(), tmp_path_factory.mktemp("registration-redis"), prefer="path"
    ).start()
    yield server
    server.stop()


@pytest.fixture
def connection(private_redis: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(private_redis.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def start(private_redis: RedisServer, tmp_path: Path) -> Iterator[StartWorker]:
    """Start worker processes, each on a queue of its own, and stop them after the test."""
    processes: list[subprocess.Popen[bytes]] = []

    def start_named(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log_file = tmp_path / f"{name}.log"
        env = {
            "LAYERBANK_STORE": str(tmp_path / "store"),
            "LAYERBANK_QUEUE": name,
            "LAYERBANK_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
            "LAYERBANK_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
        }
        process = start_worker(private_redis.url, env=env, name=name, log_file=log_file)
        processes.append(process)
        return process, log_file

    yield start_named
    for process in processes:
        stop_process(process)


def _find(connection: Redis, name: str, queue: Queue | None = None) -> Worker | None:
    workers = Worker.all(queue=queue) if queue is not None else Worker.all(connection=connection)
    return next((worker for worker in workers if worker.name == name), None)


def _wait_listed(connection: Redis, name: str, log_file: Path, after: str) -> Worker:
    deadline = time.monotonic() + LISTED_TIMEOUT
    while time.monotonic() < deadline:
        worker = _find(connection, name)
        if worker is not None:
            return worker
        time.sleep(0.1)
    pytest.fail(
        f"worker {name} not listed by Worker.all within {LISTED_TIMEOUT:.0f} s after {after}; "
        f"worker log:\n{log_file.read_text()[-3000:]}"
    )


def _check_runs_jobs(queue: Queue, process: subprocess.Popen[bytes], log_file: Path) -> None:
    """Check that the worker still takes and finishes jobs from ``queue``."""
    job = queue.enqueue("operator.add", 2, 3)
    _wait_finished(job, log_file)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == 5
    assert process.poll() is None


def _wait_busy(connection: Redis, name: str, log_file: Path) -> None:
    deadline = time.monotonic() + LISTED_TIMEOUT
    while time.monotonic() < deadline:
        worker = _find(connection, name)
        if worker is not None and worker.get_state() == "busy":
            return
        time.sleep(0.05)
    pytest.fail(f"worker {name} did not start its job; worker log:\n{log_file.read_text()}")


def _wait_finished(job: Job, log_file: Path) -> None:
    deadline = time.monotonic() + LISTED_TIMEOUT
    while job.get_status() not in (JobStatus.FINISHED, JobStatus.FAILED):
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.id} did not run; worker log:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.1)


def _reregistered_lines(log_file: Path) -> list[str]:
    return [line for line in log_file.read_text().splitlines() if REREGISTERED in line]


@pytest.mark.parametrize("data_loss", ["flushall", "restart"])
def test_idle_worker_reregisters_after_data_loss(
    private_redis: RedisServer, connection: Redis, start: StartWorker, data_loss: str
) -> None:
    name = f"registration-idle-{data_loss}"
    process, log_file = start(name)
    _wait_listed(connection, name, log_file, "its start")

    if data_loss == "flushall":
        connection.flushall()
    else:
        private_redis.stop()
        private_redis.start()
    assert _find(connection, name) is None

    worker = _wait_listed(connection, name, log_file, data_loss)
    assert worker.pid == process.pid
    assert worker.birth_date is not None
    assert worker.get_state() == "idle"
    queue = Queue(name, connection=connection)
    assert _find(connection, name, queue=queue) is not None
    assert len(_reregistered_lines(log_file)) == 1, log_file.read_text()
    _check_runs_jobs(queue, process, log_file)


def test_busy_worker_reregisters_during_job(connection: Redis, start: StartWorker) -> None:
    name = "registration-busy"
    process, log_file = start(name)
    _wait_listed(connection, name, log_file, "its start")
    queue = Queue(name, connection=connection)
    queue.enqueue("time.sleep", 10)
    _wait_busy(connection, name, log_file)

    connection.flushall()

    worker = _wait_listed(connection, name, log_file, "FLUSHALL")
    # Still busy: the job's heartbeat thread wrote the registration, not the main loop after
    # the job. No other job is queued yet, so "busy" can only come from the sleeping job.
    assert worker.get_state() == "busy"
    assert _find(connection, name, queue=queue) is not None
    assert len(_reregistered_lines(log_file)) == 1, log_file.read_text()
    _check_runs_jobs(queue, process, log_file)


def test_busy_worker_survives_redis_outage(
    private_redis: RedisServer, connection: Redis, start: StartWorker
) -> None:
    """Redis stops while a job runs and is still down when the job ends, so rq cannot record
    the end. The worker process stays up, registers again once Redis is back and takes jobs."""
    name = "registration-outage"
    process, log_file = start(name)
    _wait_listed(connection, name, log_file, "its start")
    queue = Queue(name, connection=connection)
    queue.enqueue("time.sleep", 3)
    _wait_busy(connection, name, log_file)

    private_redis.stop()
    time.sleep(5)  # the job ends while Redis is down
    assert process.poll() is None, log_file.read_text()
    private_redis.start()

    _wait_listed(connection, name, log_file, "Redis came back")
    _check_runs_jobs(queue, process, log_file)


def test_stopping_worker_not_reregistered(connection: Redis, start: StartWorker) -> None:
    name = "registration-stopping"
    process, log_file = start(name)
    worker = _wait_listed(connection, name, log_file, "its start")
    Queue(name, connection=connection).enqueue("time.sleep", 4)
    _wait_busy(connection, name, log_file)

    # A busy worker takes SIGTERM as a warm shutdown: it finishes its job, then exits.
    os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + LISTED_TIMEOUT
    while not connection.hexists(worker.key, "shutdown_requested_date"):
        assert time.monotonic() < deadline, log_file.read_text()
        time.sleep(0.05)
    connection.flushall()

    while process.poll() is None:
        assert _find(connection, name) is None, log_file.read_text()
        assert time.monotonic() < deadline, log_file.read_text()
        time.sleep(0.1)
    assert process.returncode == 0, log_file.read_text()
    assert _find(connection, name) is None
    assert _reregistered_lines(log_file) == []


@pytest.mark.parametrize("interval", [1.0, 30.0, 120.0])
def test_worker_lifetimes_follow_interval(connection: Redis, interval: float) -> None:
    """The worker's hash outlives the gap between two heartbeats, idle or busy."""
    worker = HeartbeatWorker(
        [Queue("lifetimes", connection=connection)],
        connection=connection,
        heartbeat_interval=interval,
    )
    # Idle: rq renews the hash after each blocking wait for a job.
    assert worker.dequeue_timeout >= interval
    assert worker.worker_ttl > worker.dequeue_timeout
    # Busy: the job heartbeat thread renews it for job_monitoring_interval + 60 s.
    assert worker.job_monitoring_interval + 60 > interval


def test_command_listener_polls_briefly(connection: Redis) -> None:
    """The command listener's reads are short, so a stopping worker does not wait a minute."""
    worker = HeartbeatWorker([Queue("listener", connection=connection)], connection=connection)
    worker.subscribe()
    try:
        assert worker.pubsub_thread is not None
        assert worker.pubsub_thread.sleep_time <= 1.0
    finally:
        worker.unsubscribe()
