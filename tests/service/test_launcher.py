"""The embedded launcher: worker supervision and the demo's check of the API it talks to."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.launcher import WorkerSupervisor, free_port


def test_supervisor_restarts_killed_worker(stack_env: dict[str, str], tmp_path: Path) -> None:
    env = {**stack_env, "LAYERBANK_QUEUE": "layerbank-supervisor-test"}
    supervisor = WorkerSupervisor(
        1, stack_env["REDIS_URL"], env=env, log_dir=tmp_path, interval=0.2
    )
    try:
        first = supervisor.processes[0]
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while supervisor.processes[0] is first and time.monotonic() < deadline:
            time.sleep(0.1)
        replacement = supervisor.processes[0]
        assert replacement is not first
        assert replacement.poll() is None
    finally:
        supervisor.stop()
    assert all(process.poll() is not None for process in supervisor.processes)


def _skip_with_cuda() -> None:
    """Skip a test that needs LAYERBANK_DEVICE=cuda to fail at worker start."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so a cuda worker starts")


def test_supervisor_gives_up_on_worker_exiting_at_start(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """A worker that cannot start (here a CUDA device on a machine without one) is not started
    again forever: after the restart budget the supervisor reports why, with its log line."""
    _skip_with_cuda()
    reasons: list[str] = []
    env = {**stack_env, "LAYERBANK_DEVICE": "cuda", "LAYERBANK_QUEUE": "layerbank-give-up"}
    supervisor = WorkerSupervisor(
        1,
        stack_env["REDIS_URL"],
        env=env,
        log_dir=tmp_path,
        interval=0.2,
        on_give_up=reasons.append,
    )
    try:
        deadline = time.monotonic() + 120
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        supervisor.stop()
    assert len(reasons) == 1
    assert "restarts within 60 s" in reasons[0]
    assert "invalid LAYERBANK_DEVICE='cuda'" in reasons[0]
    assert str(tmp_path / "worker-0.log") in reasons[0]
    assert all(process.poll() is not None for process in supervisor.processes)


@pytest.fixture()
def foreign_server() -> Iterator[str]:
    """A plain HTTP file server: something that responds but is not layerbank."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), http.server.SimpleHTTPRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def test_demo_rejects_foreign_server(foreign_server: str, tmp_path: Path) -> None:
    result: Any = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "demo",
            "--url",
            foreign_server,
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "not as a layerbank API" in result.stderr


def test_up_group_sigterm_stops_workers_first(tmp_path: Path) -> None:
    """SIGTERM to the whole process group (as Ctrl-C or kill -- -PGID) leaves Redis to the end."""
    from service.launcher import wait_for_http

    port = free_port()
    store = tmp_path / "store"
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    output = tmp_path / "up.log"
    with output.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(port), "--store", str(store)],
            env={**env, "OMP_NUM_THREADS": "1", "LAYERBANK_QUEUE": "layerbank-up-test"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=90)
        # Let the worker register and block on the queue.
        time.sleep(3)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    worker_log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert "Traceback" not in worker_log, worker_log
    assert "ConnectionError" not in worker_log, worker_log
    assert "retrying" not in worker_log, worker_log


def test_worker_starts_beside_store_folder(
    redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.launcher import start_worker

    # A data folder named like a package, in the directory the stack starts from.
    (tmp_path / "store" / "featuresets").mkdir(parents=True)
    (tmp_path / "workers").mkdir()
    monkeypatch.chdir(tmp_path)
    url = redis_server.url.rsplit("/", 1)[0] + "/11"
    log = tmp_path / "worker.log"
    process = start_worker(url, burst=True, log_file=log, name="beside-store")
    assert process.wait(timeout=120) == 0, log.read_text()


def test_up_busy_port_one_error_line(tmp_path: Path) -> None:
    """A port another process listens on ends `up` with one line, before Redis or a worker."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "up", "--port", str(port)]
            + ["--store", str(tmp_path / "store")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "--port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "redis").exists()
    assert not (tmp_path / "logs").exists()


def test_redis_folder_locked_while_running(tmp_path: Path) -> None:
    """Two stacks whose stores share a parent folder would share one Redis data folder and
    append to one file. So a second server is rejected while the first runs."""
    from service.launcher import RedisServer

    folder = tmp_path / "redis"
    first = RedisServer(free_port(), folder, persistent=True).start()
    try:
        with pytest.raises(RuntimeError) as caught:
            RedisServer(free_port(), folder, persistent=True).start()
        assert "in use" in str(caught.value)
        assert str(folder) in str(caught.value)
    finally:
        first.stop()
    again = RedisServer(free_port(), folder, persistent=True).start()
    again.stop()


def _run_up(
    store: Path,
    *options: str,
    env: dict[str, str] | None = None,
    timeout: float,
    store_option: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `layerbank up` on a free port until it exits, without the session's REDIS_URL.

    ``store_option`` replaces the ``--store`` value given by ``store``."""
    base = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    store_value = str(store) if store_option is None else store_option
    command = ["up", "--port", str(free_port()), "--store", store_value, *options]
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *command],
        env={**base, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_up_beside_running_stack_is_one_error_line(tmp_path: Path) -> None:
    from service.launcher import RedisServer

    running = RedisServer(free_port(), tmp_path / "redis", persistent=True).start()
    try:
        result = _run_up(tmp_path / "second", "--workers", "0", timeout=60)
    finally:
        running.stop()
    assert result.returncode == 1
    assert result.stderr.startswith("error: the Redis data folder")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("store", ["afile/store", "box/afile"])
def test_up_store_on_file_one_error_line(tmp_path: Path, store: str) -> None:
    """A store path on or under a regular file ends `up` with one line, before Redis starts."""
    (tmp_path / "box").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "box" / "afile").write_text("not a folder")
    result = _run_up(tmp_path / store, "--workers", "0", timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: cannot create the folder ")
    assert "afile" in result.stderr
    assert "--store" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "box" / "redis").exists()


@pytest.mark.parametrize("store", ["", "  "])
def test_up_blank_store_is_usage_error(tmp_path: Path, store: str) -> None:
    result = _run_up(Path(), "--workers", "0", timeout=60, store_option=store, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "invalid --store" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created in the current folder


def test_up_stops_when_worker_keeps_exiting(tmp_path: Path) -> None:
    """`up` with a worker that exits at start stops with one error line and exit code 1,
    instead of starting the worker again every few seconds."""
    _skip_with_cuda()
    result = _run_up(
        tmp_path / "store", env={"OMP_NUM_THREADS": "1", "LAYERBANK_DEVICE": "cuda"}, timeout=180
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "restarts within 60 s" in errors[0]
    assert "invalid LAYERBANK_DEVICE='cuda'" in errors[0]
