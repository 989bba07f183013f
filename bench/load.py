"""Load test of the read path: concurrent clients fetch rows and layers while an extraction runs.

Starts a private stack on 127.0.0.1 (redis-server, one rq worker, the API in ``--api-workers``
processes, a temporary store) and extracts a complete feature set to read. During the load a
background thread keeps one extraction of a tiny ImageGPT at batch size 1 in flight, starting
the next (a smaller ``limit``, so a new feature set) when one finishes, so the worker writes
blocks for the whole run. ``--clients`` asyncio tasks loop for ``--seconds``: each request is a
single row as JSON (``?start=i&stop=i+1&format=json``) or, one time in ``--layer-every``, the
whole layer as .npy. Reports requests/s, p50 and p99 latency per kind, the number of errors (any
non-200), the blocks written meanwhile and the CPU share the load generator used. By default
each client is one keep-alive asyncio connection (``--client raw``); ``--client httpx`` shares
one ``httpx.AsyncClient``, which on a 2-core machine saturates a core before the API does.

Example::

    PYTHONPATH=. python bench/load.py --clients 50 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

# A direct run (python bench/load.py) puts bench/ first on sys.path, where bench/store.py
# would shadow the store package, so the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from service.client import Client  # noqa: E402
from service.launcher import (  # noqa: E402
    RedisServer,
    free_port,
    start_worker,
    stop_process,
    wait_for_http,
)
from tests.factories import tiny_imagegpt  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


Fetch = Callable[[str], Awaitable[int]]


class _RawConnection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads Content-Length bodies.

    A load generator in Python must cost the machine less than the server it measures: with
    httpx's async client, the generator needs several times the server's CPU per request.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, target: str) -> int:
        """Send ``GET target``; return the status after reading the whole body."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port, limit=2**20)
        reader, writer = self.streams
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise ConnectionError("response without Content-Length")
            await reader.readexactly(length)
            return int(head[9:12])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            self.streams = None
            raise

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def _client(
    fetch: Fetch,
    featureset_id: str,
    n_items: int,
    layer_every: int,
    seed: int,
    deadline: float,
    latencies: dict[str, list[float]],
    errors: list[str],
) -> None:
    rng = np.random.default_rng(seed)
    path = f"/v1/featuresets/{featureset_id}/layers/0"
    count = 0
    while time.perf_counter() < deadline:
        count += 1
        if count % layer_every == 0:
            kind, target = "layer", path
        else:
            row = int(rng.integers(0, n_items))
            kind, target = "row", f"{path}?start={row}&stop={row + 1}&format=json"
        started = time.perf_counter()
        try:
            status = await fetch(target)
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
            errors.append(f"{kind}: {type(exc).__name__}")
            continue
        if status != 200:
            errors.append(f"{kind}: HTTP {status}")
            continue
        latencies[kind].append(time.perf_counter() - started)


async def _load(
    url: str, featureset_id: str, n_items: int, args: argparse.Namespace
) -> tuple[dict[str, list[float]], list[str], float]:
    latencies: dict[str, list[float]] = {"row": [], "layer": []}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    connections = [_RawConnection(url) for _ in range(args.clients)]
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def httpx_get(target: str) -> int:
            return (await http.get(target)).status_code

        fetchers: list[Fetch] = (
            [connection.get for connection in connections]
            if args.client == "raw"
            else [httpx_get] * args.clients
        )
        started = time.perf_counter()
        deadline = started + args.seconds
        await asyncio.gather(
            *(
                _client(
                    fetch,
                    featureset_id,
                    n_items,
                    args.layer_every,
                    seed,
                    deadline,
                    latencies,
                    errors,
                )
                for seed, fetch in enumerate(fetchers)
            )
        )
        elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return latencies, errors, elapsed


class _BackgroundWriter(threading.Thread):
    """Keep one extraction in flight until stopped; count the blocks it writes."""

    def __init__(self, url: str, model: str, n_items: int) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.n_items = url, model, n_items
        self.stopping = threading.Event()
        self.blocks = 0
        self.extractions = 0
        self.error: str | None = None

    def run(self) -> None:
        from service.client import Client

        limit = self.n_items - 1
        with Client(self.url, timeout=120) as client:
            while not self.stopping.is_set() and limit > 100:
                job = client.extract(
                    self.model, "digits", "train", batch_size=1, block_rows=64, limit=limit
                )
                self.extractions += 1
                done = 0
                while not self.stopping.is_set():
                    state = client.job(job["job_id"])
                    done = state["progress"]["done"]
                    if state["status"] == "failed":
                        self.error = str(state.get("error"))
                        return
                    if state["status"] == "finished":
                        break
                    time.sleep(0.5)
                self.blocks += done
                limit -= 50


def _serve(
    env: dict[str, str], log_file: Path, workers: int
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``python -m service.serve`` in its own process, so clients and API share no GIL."""

    port = free_port()
    command = [sys.executable, "-m", "service.serve", "--log-level", "WARNING"]
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command + (["--workers", str(workers)] if workers > 1 else []),
            env={**os.environ, **env, "LAYERBANK_HOST": "127.0.0.1", "LAYERBANK_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", timeout=60)
    return url, process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the load")
    parser.add_argument(
        "--layer-every",
        type=int,
        default=20,
        help="one request in this many fetches the whole layer",
    )
    parser.add_argument(
        "--api-workers", type=int, default=1, help="API processes (uvicorn workers)"
    )
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator: keep-alive asyncio connections (raw) or one httpx.AsyncClient",
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="layerbank-load-"))
    (root / "models").mkdir()
    model = tiny_imagegpt(root / "models" / "tiny-igpt")
    redis = RedisServer(free_port(), root / "redis", prefer="path").start()
    env = {
        "LAYERBANK_STORE": str(root / "store"),
        "REDIS_URL": redis.url,
        "LAYERBANK_DEVICE": "cpu",
        "LAYERBANK_MODEL_ROOTS": str(root / "models"),
        "LAYERBANK_QUEUE": "layerbank-load",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    worker = start_worker(redis.url, env={**os.environ, **env}, log_file=root / "worker.log")
    url, api = _serve(env, root / "api.log", args.api_workers)
    try:
        with Client(url, timeout=120) as client:
            target = client.extract("pixels", "digits", "train")
            client.wait(target["job_id"], timeout=300)
            summary = client.featureset(target["featureset_id"])
        writer = _BackgroundWriter(url, str(model), summary["n_items"])
        writer.start()
        cpu_started = time.process_time()
        latencies, errors, elapsed = asyncio.run(
            _load(url, target["featureset_id"], summary["n_items"], args)
        )
        client_cpu = (time.process_time() - cpu_started) / elapsed
        writer.stopping.set()
        writer.join(timeout=30)
    finally:
        stop_process(api)
        stop_process(worker)
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)

    total = sum(len(v) for v in latencies.values()) + len(errors)
    print(
        f"{args.clients} clients, {args.api_workers} API process(es), {elapsed:.1f} s, feature "
        f"set of {summary['n_items']} rows x {summary['dim']} dim; meanwhile "
        f"{writer.extractions} background extraction(s) wrote {writer.blocks} blocks"
        + (f" and one failed: {writer.error}" if writer.error else "")
    )
    print(f"requests: {total} ({total / elapsed:.1f}/s), errors: {len(errors)}")
    print(
        f"load generator ({args.client}): {client_cpu:.0%} of one core, including the "
        "background extraction's polling thread"
    )
    for kind, values in latencies.items():
        print(
            f"{kind:>5}: {len(values)} ok, p50 {_percentile(values, 50):.1f} ms, "
            f"p99 {_percentile(values, 99):.1f} ms"
        )
    if errors:
        print("first errors:", sorted(set(errors))[:5])


if __name__ == "__main__":
    main()
