"""Failures the service must survive without losing work: killed workers, restarts of Redis and
of the API, duplicate requests and jobs, and malformed input.

The module runs its own stack (redis-server, API and two rq workers on a private queue and store)
because its tests kill workers and restart Redis, which the session's shared stack must not see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from service.client import Client, ClientError
from service.jobs import BLOCK_RETRIES, load_job
from service.launcher import RedisServer, free_port, start_worker, stop_process, wait_for_http
from store import Store
from store.settings import Settings
from tests.conftest import wait_job
from tests.factories import reference_pooled

QUEUE = "layerbank-reliability"
# Seconds between heartbeats of a running job; a killed worker's block is retried after three
# missed beats. Shorter intervals let a live but descheduled worker on a busy 2-core machine
# miss three beats, so a healthy block would be retried too.
HEARTBEAT_INTERVAL = 2.0


@dataclass
class Stack:
    """The module's private redis-server, API and worker processes."""

    redis: RedisServer
    env: dict[str, str]
    settings: Settings
    api_url: str
    logs: Path
    client: Client
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        self.workers[name] = start_worker(
            self.redis.url, env=self.env, name=name, log_file=self.logs / f"{name}.log"
        )

    def signal_workers(self, signum: int) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                os.kill(process.pid, signum)

    def connection(self) -> Redis:
        return Redis.from_url(self.redis.url)


def _serve(settings: Settings) -> tuple[str, Any, threading.Thread]:
    import uvicorn

    from service.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz")
    return url, server, thread


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, stack_dirs: dict[str, Path], tiny_model: Path
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("reliability")
    redis = RedisServer(free_port(), root / "redis", prefer="path").start()
    env = {
        "LAYERBANK_STORE": str(root / "store"),
        "REDIS_URL": redis.url,
        "LAYERBANK_DEVICE": "cpu",
        "LAYERBANK_MODEL_ROOTS": str(stack_dirs["models"]),
        "LAYERBANK_DATA_ROOTS": str(stack_dirs["data"]),
        "LAYERBANK_QUEUE": QUEUE,
        "LAYERBANK_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    settings = Settings(
        store=env["LAYERBANK_STORE"],
        redis_url=redis.url,
        device="cpu",
        model_roots=[stack_dirs["models"]],
        data_roots=[stack_dirs["data"]],
        queue=QUEUE,
    )
    url, server, thread = _serve(settings)
    logs = root / "logs"
    logs.mkdir()
    with Client(url, timeout=60) as client:
        current = Stack(redis, env, settings, url, logs, client)
        for index in range(2):
            current.start_worker(f"reliability-{index}")
        try:
            yield current
        finally:
            # A test that failed half-way may leave workers stopped with SIGSTOP.
            current.signal_workers(signal.SIGCONT)
            # rq takes a second SIGTERM as a cold shutdown, so idle workers exit at once.
            current.signal_workers(signal.SIGTERM)
            for process in current.workers.values():
                stop_process(process)
            server.should_exit = True
            thread.join(timeout=10)
            redis.stop()


def _rq_jobs(stack: Stack, job_id: str) -> list[Job]:
    connection = stack.connection()
    jobs = Job.fetch_many(load_job(connection, job_id)["rq_ids"], connection=connection)
    assert all(job is not None for job in jobs)
    return [job for job in jobs if job is not None]


def _freeze_worker_mid_block(
    stack: Stack, job_id: str, featureset_id: str, timeout: float = 60.0
) -> tuple[str, Job, list[int]]:
    """Stop (SIGSTOP) a worker while it is running a block, after at least one block is written.

    Returns the worker's name, its started rq job and the blocks written before the stop.
    """
    store = Store(stack.settings.store)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        featureset = store.featureset(featureset_id)
        started = [
            job
            for job in _rq_jobs(stack, job_id)
            if job.get_status(refresh=False) == JobStatus.STARTED and job.worker_name
        ]
        if featureset.progress().blocks_done >= 1 and started:
            name = started[0].worker_name
            os.kill(stack.workers[name].pid, signal.SIGSTOP)
            # Re-read after the stop: the block may have finished just before the signal landed.
            job = Job.fetch(started[0].id, connection=stack.connection())
            if job.get_status() == JobStatus.STARTED:
                done = [
                    int(b) for b in np.flatnonzero(store.featureset(featureset_id).done_blocks())
                ]
                return name, job, done
            os.kill(stack.workers[name].pid, signal.SIGCONT)
        time.sleep(0.02)
    raise TimeoutError(f"no worker was caught in the middle of a block of job {job_id}")


def test_killed_worker_block_retried_elsewhere(stack: Stack, tiny_model: Path) -> None:
    from workers.datasets import load_split

    # Eleven blocks of 128 rows, computed one row at a time, so a worker is often inside a block.
    answer = stack.client.extract(
        str(tiny_model), "digits", "train", layers="all", block_rows=128, batch_size=1
    )
    job_id, featureset_id = answer["job_id"], answer["featureset_id"]
    killed, interrupted, written_before = _freeze_worker_mid_block(stack, job_id, featureset_id)
    os.kill(stack.workers[killed].pid, signal.SIGKILL)
    stack.workers.pop(killed).wait(timeout=10)

    state = wait_job(stack.client, job_id, timeout=120)
    stack.start_worker(f"{killed}-replacement")

    assert state is not None
    assert state["status"] == "finished", state
    assert state["progress"]["done"] == state["progress"]["total"] == 11
    retried = Job.fetch(interrupted.id, connection=stack.connection())
    # When the kill landed after the block's done flag was written, the other blocks complete
    # the set before rq finds the block's worker dead and runs it again (it then skips). rq
    # finds it when the job is read through the API, or at a worker's maintenance about every
    # ten minutes, so the loop reads the job as a client would.
    deadline = time.monotonic() + 120
    while retried.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED):
        assert time.monotonic() < deadline, retried.get_status()
        stack.client.job(job_id)
        time.sleep(0.2)
    # get_status(refresh=True) reloads the status alone; the worker's name and the retries
    # left may have changed since the fetch, when the block ran again after it.
    retried.refresh()
    assert retried.get_status() == JobStatus.FINISHED
    assert retried.worker_name != killed
    assert retried.retries_left == BLOCK_RETRIES - 1
    by_block = {job.args[1]: job for job in _rq_jobs(stack, job_id) if len(job.args) == 2}
    # Blocks written before the kill were not run again. The interrupted block can be among
    # them: the stop can land after its done flag is written but before rq marks it finished.
    for block in written_before:
        if block != interrupted.args[1]:
            assert by_block[block].retries_left == BLOCK_RETRIES
    block = interrupted.args[1]
    start, stop = block * 128, min(block * 128 + 128, 1297)
    images = load_split("digits", "train").images[start:stop]
    expected = reference_pooled(tiny_model, images)
    for layer in range(3):
        array = stack.client.layer_array(featureset_id, layer, start=start, stop=stop)
        np.testing.assert_allclose(array, expected[layer], rtol=1e-4, atol=1e-5)
    for layer in range(3):
        assert np.isfinite(stack.client.layer_array(featureset_id, layer)).all()


def test_duplicate_block_job_skips_written_block(stack: Stack) -> None:
    answer = stack.client.extract("pixels", "digits", "test", limit=60, block_rows=20)
    state = wait_job(stack.client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    featureset_id = answer["featureset_id"]
    before = stack.client.layer_array(featureset_id, 0)

    # rq delivers a job at least once: a second run of a written block must change nothing.
    queue = Queue(QUEUE, connection=stack.connection())
    duplicate = queue.enqueue_call("workers.jobs.extract_block", args=(featureset_id, 1))
    deadline = time.monotonic() + 60
    while duplicate.get_status() not in (JobStatus.FINISHED, JobStatus.FAILED):
        assert time.monotonic() < deadline, "duplicate block job did not run"
        time.sleep(0.1)

    assert duplicate.get_status() == JobStatus.FINISHED
    assert duplicate.return_value()["skipped"] is True
    np.testing.assert_array_equal(stack.client.layer_array(featureset_id, 0), before)


def test_concurrent_identical_requests_one_job(stack: Stack) -> None:
    def submit(_: int) -> dict[str, Any]:
        with Client(stack.api_url, timeout=60) as client:
            return client.extract("pixels", "digits", "train", limit=100, block_rows=25)

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(submit, range(6)))

    assert len({answer["featureset_id"] for answer in answers}) == 1, answers
    assert sum(answer["created"] for answer in answers) == 1, answers
    assert len({answer["job_id"] for answer in answers}) == 1, answers
    state = wait_job(stack.client, answers[0]["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    # One rq job per block plus the finalize job: no block was queued twice.
    rq_jobs = _rq_jobs(stack, answers[0]["job_id"])
    assert len(rq_jobs) == 4 + 1, [(job.description, job.get_status()) for job in rq_jobs]


def test_api_restart_reports_same_job(stack: Stack) -> None:
    answer = stack.client.extract("pixels", "digits", "test", limit=40, block_rows=20)
    before = wait_job(stack.client, answer["job_id"], timeout=60)
    assert before is not None and before["status"] == "finished", before

    # A new app process state: job status comes from Redis and the store, not from memory.
    url, server, thread = _serve(stack.settings)
    try:
        with Client(url, timeout=60) as fresh:
            after = fresh.job(answer["job_id"])
            summary = fresh.featureset(answer["featureset_id"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert after == before
    assert summary["status"] == "complete"


def test_redis_restart_then_resubmit_completes(stack: Stack) -> None:
    # Workers are paused so the queued blocks exist only in Redis when it restarts empty.
    stack.signal_workers(signal.SIGSTOP)
    try:
        first = stack.client.extract("pixels", "digits", "train", limit=120, block_rows=30)
        stack.redis.stop()
        stack.redis.start()
    finally:
        stack.signal_workers(signal.SIGCONT)

    with pytest.raises(ClientError) as lost:
        stack.client.job(first["job_id"])
    assert lost.value.status_code == 404
    again = stack.client.extract("pixels", "digits", "train", limit=120, block_rows=30)
    assert again["featureset_id"] == first["featureset_id"]
    assert again["created"] is False
    assert again["job_id"] != first["job_id"]
    state = wait_job(stack.client, again["job_id"], timeout=90)
    assert state is not None
    assert state["status"] == "finished", state
    assert stack.client.labels(again["featureset_id"]).shape == (120,)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("tiny\x00model", "contains control characters"),
        ("org/model name", "is invalid"),
        ("org/too/deep", "could not be resolved"),
    ],
)
def test_extraction_malformed_model_is_422(stack: Stack, model: str, message: str) -> None:
    with pytest.raises(ClientError) as info:
        stack.client.extract(model, "digits", "train")
    assert info.value.status_code == 422
    assert info.value.detail["field"] == "model"
    assert message in info.value.detail["message"]
