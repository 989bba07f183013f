"""`layerbank up` watches its embedded redis-server: a killed server is started again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from service.launcher import MAX_RESTARTS, free_port, wait_for_http

STARTED = re.compile(r"redis-server process (\d+) up on 127\.0\.0\.1:(\d+)")


class Stack:
    """A `layerbank up` process on free ports, with its output in a log file."""

    def __init__(self, root: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "up.log"
        env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
        env |= {"OMP_NUM_THREADS": "1", "LAYERBANK_QUEUE": "layerbank-redis-restart-test"}
        command = [sys.executable, "-m", "service.cli", "up", "--port", str(self.port)]
        command += ["--store", str(root / "store"), "--workers", str(workers)]
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def redis_starts(self) -> list[tuple[int, int]]:
        """Return the (pid, port) of each redis-server start the stack logged, oldest first."""
        return [(int(pid), int(port)) for pid, port in STARTED.findall(self.output())]

    def wait_for_redis_start(self, count: int, timeout: float = 30.0) -> tuple[int, int]:
        """Wait until the stack has logged ``count`` redis-server starts; return the last."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            starts = self.redis_starts()
            if len(starts) >= count:
                return starts[count - 1]
            time.sleep(0.1)
        raise TimeoutError(f"redis-server start {count} not logged:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path, workers=1)
    try:
        wait_for_http(f"{running.url}/healthz", timeout=90)
        yield running
    finally:
        running.stop()


def test_up_restarts_killed_redis(stack: Stack) -> None:
    pid, port = stack.wait_for_redis_start(1)
    redis = Redis(host="127.0.0.1", port=port)
    redis.set("layerbank-test:before-kill", b"kept")
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        created = client.post(
            "/v1/extractions",
            json={"model": "pixels", "dataset": "digits", "split": "train", "limit": 20},
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200

        os.kill(pid, signal.SIGKILL)
        new_pid, new_port = stack.wait_for_redis_start(2)
        deadline = time.monotonic() + 30
        response = client.get(f"/v1/jobs/{job_id}")
        while response.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            response = client.get(f"/v1/jobs/{job_id}")

    assert response.status_code == 200, response.text
    assert response.json()["job_id"] == job_id
    assert new_port == port
    assert new_pid != pid
    assert redis.get("layerbank-test:before-kill") == b"kept"
    redis.close()
    exits = [line for line in stack.output().splitlines() if f"process {pid} on" in line]
    assert len(exits) == 1, stack.output()
    assert "ERROR" in exits[0]
    assert "exited (killed by SIGKILL)" in exits[0]
    assert stack.process.poll() is None
    # The launcher reaped the killed process: it is gone, not a zombie.
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def test_up_stops_when_redis_keeps_dying(tmp_path: Path) -> None:
    """After MAX_RESTARTS restarts within the window, the next exit stops the stack."""
    stack = Stack(tmp_path, workers=0)
    try:
        wait_for_http(f"{stack.url}/healthz", timeout=90)
        for count in range(1, MAX_RESTARTS + 2):
            pid, _ = stack.wait_for_redis_start(count)
            os.kill(pid, signal.SIGKILL)
        code = stack.process.wait(timeout=60)
    finally:
        stack.stop()

    output = stack.output()
    assert code == 1, output
    assert len(stack.redis_starts()) == MAX_RESTARTS + 1, output
    assert f"after {MAX_RESTARTS} restarts within 60 s" in output
    assert "error: redis-server on 127.0.0.1:" in output
    assert "Traceback" not in output
