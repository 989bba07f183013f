"""Schemathesis against openapi.yaml on a live API: no server errors, responses match the schema."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

SPEC = Path(__file__).resolve().parents[2] / "openapi.yaml"
# A Redis database of the session's private server that no other test uses: jobs queued here
# never reach the session workers, so fuzzed extractions cost nothing.
FUZZ_DB = 8


@pytest.fixture(scope="module")
def fuzz_api(
    settings: Any, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """An API with keys required, on its own store and Redis database; yields (url, admin key)."""
    import uvicorn

    from service.app import create_app
    from service.auth import KeyStore
    from service.launcher import free_port, wait_for_http

    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{FUZZ_DB}"
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    admin_key = KeyStore(redis).create("fuzz-admin", "admin")
    fuzz_settings = settings.model_copy(
        update={
            "store": str(tmp_path_factory.mktemp("fuzz-store")),
            "redis_url": redis_url,
            "auth": "required",
        }
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(fuzz_settings), host="127.0.0.1", port=port, log_level="critical")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz")
    yield url, admin_key
    server.should_exit = True
    thread.join(timeout=10)
    redis.flushdb()
    redis.close()


def test_fuzz_openapi_operations(fuzz_api: tuple[str, str], tmp_path: Path) -> None:
    url, admin_key = fuzz_api
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.fail("schemathesis is not installed in this virtualenv; pip install schemathesis")
    command = [
        st,
        "run",
        str(SPEC),
        "--url",
        url,
        "--header",
        f"Authorization: Bearer {admin_key}",
        "--checks",
        "not_a_server_error,response_schema_conformance,"
        "status_code_conformance,content_type_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "15",
        "--seed",
        "1",
        # One worker: CPython 3.11 can fail with "AST constructor recursion depth mismatch"
        # when hypothesis compiles strategies in two threads at once.
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--no-color",
        "--output-sanitize",
        "true",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
