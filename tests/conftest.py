"""Session fixtures: a private redis-server, real rq worker processes, the API over HTTP."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Tests never reach the Hugging Face Hub: model ids that are not local fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A redis-server of our own on a free 127.0.0.1 port, stopped at the end of the session."""
    from service.launcher import RedisServer, free_port

    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"), prefer="path").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stack")
    dirs = {
        "store": root / "store",
        "models": root / "models",
        "data": root / "data",
        "logs": root / "logs",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return dirs


@pytest.fixture(scope="session")
def stack_env(redis_server: Any, stack_dirs: dict[str, Path]) -> dict[str, str]:
    """Environment shared by the API and the worker processes."""
    return {
        "LAYERBANK_STORE": str(stack_dirs["store"]),
        "REDIS_URL": redis_server.url,
        "LAYERBANK_DEVICE": "cpu",
        "LAYERBANK_MODEL_ROOTS": str(stack_dirs["models"]),
        "LAYERBANK_DATA_ROOTS": str(stack_dirs["data"]),
        "LAYERBANK_QUEUE": "layerbank-test",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="session")
def settings(stack_env: dict[str, str]) -> Any:
    from store.settings import Settings

    return Settings(
        store=stack_env["LAYERBANK_STORE"],
        redis_url=stack_env["REDIS_URL"],
        device="cpu",
        model_roots=[Path(stack_env["LAYERBANK_MODEL_ROOTS"])],
        data_roots=[Path(stack_env["LAYERBANK_DATA_ROOTS"])],
        queue=stack_env["LAYERBANK_QUEUE"],
    )


@pytest.fixture(scope="session")
def workers(stack_env: dict[str, str], stack_dirs: dict[str, Path]) -> Iterator[list[Any]]:
    """Two real rq worker processes (SimpleWorker) on the session's queue."""
    from service.launcher import start_worker, stop_process

    processes = [
        start_worker(
            stack_env["REDIS_URL"],
            env=stack_env,
            log_file=stack_dirs["logs"] / f"worker-{i}.log",
            name=f"test-worker-{i}",
        )
        for i in range(2)
    ]
    yield processes
    for process in processes:
        stop_process(process)


@pytest.fixture(scope="session")
def api_url(settings: Any) -> Iterator[str]:
    """The API served by uvicorn in a thread on a free 127.0.0.1 port."""
    import uvicorn

    from service.app import create_app
    from service.launcher import free_port, wait_for_http

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def client(api_url: str, workers: list[Any]) -> Iterator[Any]:
    from service.client import Client

    with Client(api_url, timeout=60) as api:
        yield api


@pytest.fixture(scope="session")
def tiny_model(stack_dirs: dict[str, Path]) -> Path:
    """A tiny random ImageGPT checkpoint under the allowed model root."""
    from tests.factories import tiny_imagegpt

    return tiny_imagegpt(stack_dirs["models"] / "tiny-igpt")


def wait_job(client: Any, job_id: str | None, timeout: float = 300.0) -> dict[str, Any] | None:
    """Poll a job to its end and return its final state (failed jobs included)."""
    if job_id is None:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: dict[str, Any] = client.job(job_id)
        if state["status"] in ("finished", "failed"):
            return state
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish within {timeout}s")


def rq_starts(logs: Path, rq_id: str) -> int:
    """Count the starts of rq job ``rq_id`` in the session workers' logs."""
    return sum(
        line.rstrip().endswith(" started")
        for path in logs.glob("worker-*.log")
        for line in path.read_text().splitlines()
        if f"(rq {rq_id}): " in line
    )


@pytest.fixture(scope="session")
def digits_featuresets(client: Any, tiny_model: Path) -> dict[str, str]:
    """Train and test feature sets of the tiny model on digits, several blocks each."""
    ids = {}
    for split in ("train", "test"):
        answer = client.extract(
            str(tiny_model),
            "digits",
            split,
            layers="all",
            pooling="mean",
            block_rows=256,
            batch_size=64,
        )
        state = wait_job(client, answer["job_id"])
        assert state is not None and state["status"] == "finished", state
        ids[split] = answer["featureset_id"]
    return ids
