"""Benchmark the store: write and read speed, compression, and API fetch latency.

Four parts, each printed as a table:

- throughput: one feature set of shape (layers, items, dim) written block by block and read
  back layer by layer, through layerbank (`FeatureSet.write_block`, `FeatureSet.read_layer`),
  through plain zarr with the same chunks, shards and codecs, and as a plain file
  (``ndarray.tofile`` then ``np.fromfile``) on the same disk. MB/s counts uncompressed bytes.
  Reads come from the page cache, because the data was just written.
- compression: the same plain-zarr run with the codec chain ``crc32c`` (layerbank's default)
  and ``zstd`` + ``crc32c``, in float16 and float32, with the bytes on disk.
- rows: the store calls of a single-row request (handle, checks, ``read_layer``), in this
  process, without HTTP.
- api: the API in its own process on 127.0.0.1 (with a private redis-server), one client
  sending sequential requests: a single row as JSON and a whole layer as .npy; p50 and p99.
  Each whole-layer request runs four ways: ``httpx.get`` (the body joined in memory), an
  httpx stream read in 1 MiB pieces, layerbank's ``Client.layer_array`` (an httpx stream read
  into one preallocated array), and a plain socket reading into one preallocated buffer,
  which shows the server's speed without an HTTP client library.
  With ``--api-key``, requests carry a key, and the Redis commands per request are counted
  from ``INFO commandstats``.

The features are standard-normal random numbers, which compress worse than real activations
may; compression ratios on real feature sets can differ.

Example::

    python -m bench.store --items 8192 --layers 25 --dim 512

It runs as a module, as above, or as a script: ``python bench/store.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

# A direct run (python bench/store.py) puts bench/ first on sys.path, where this file would
# shadow the store package, so the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import Crc32cCodec, ZstdCodec  # noqa: E402

from store import Store  # noqa: E402
from store.featureset import create_featureset, default_block_rows  # noqa: E402
from store.spec import FeatureSetSpec  # noqa: E402

MB = 1e6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=8192, help="rows of the feature set")
    parser.add_argument("--layers", type=int, default=25, help="stored layers")
    parser.add_argument("--dim", type=int, default=512, help="feature width")
    parser.add_argument("--dtype", default="float16", help="stored dtype of the throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="repeats; the median is reported")
    parser.add_argument("--row-requests", type=int, default=300, help="single-row requests")
    parser.add_argument("--layer-requests", type=int, default=20, help="whole-layer requests")
    parser.add_argument("--api-key", action="store_true", help="require and send an API key")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["throughput", "compression", "rows", "api"]
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _spec(layers: int, dtype: str, tag: str) -> FeatureSetSpec:
    return FeatureSetSpec(
        model="bench",
        model_revision="rev-1",
        model_family="imagegpt",
        dataset=f"bench-{tag}",
        dataset_fingerprint="0" * 16,
        split="test",
        layers=list(range(layers)),
        pooling="mean",
        dtype=dtype,
    )


def _median_seconds(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_layerbank(root: Path, features: np.ndarray, tag: str) -> Store:
    """Create a feature set and write every block; return its store."""
    shutil.rmtree(root, ignore_errors=True)
    store = Store(root)
    n_layers, n_items, dim = features.shape
    featureset = create_featureset(
        store,
        _spec(n_layers, str(features.dtype), tag),
        layer_map=[{"layer": i, "description": "bench"} for i in range(n_layers)],
        dim=dim,
        labels=np.zeros(n_items, np.int64),
        item_ids=np.arange(n_items),
        class_names=["0"],
    )
    for block in range(featureset.n_blocks):
        start, stop = featureset.block_range(block)
        featureset.write_block(block, features[:, start:stop])
    featureset.mark_complete()
    return store


def read_layerbank(store: Store) -> None:
    featureset = store.featureset(store.featureset_ids()[0])
    for layer in featureset.layers:
        featureset.read_layer(layer)


def write_zarr(path: Path, features: np.ndarray, compressors: list[object]) -> zarr.Array:
    """Write ``features`` with layerbank's chunks and shards but plain zarr calls."""
    shutil.rmtree(path, ignore_errors=True)
    n_layers, n_items, dim = features.shape
    rows = default_block_rows(n_items, dim, str(features.dtype))
    array = zarr.create_array(
        zarr.storage.LocalStore(path),
        shape=features.shape,
        chunks=(1, rows, dim),
        shards=(n_layers, rows, dim),
        dtype=features.dtype,
        fill_value=np.nan,
        compressors=compressors,  # type: ignore[arg-type]
    )
    for start in range(0, n_items, rows):
        array[:, start : start + rows] = features[:, start : start + rows]
    return array


def read_zarr(array: zarr.Array) -> None:
    for layer in range(array.shape[0]):
        np.asarray(array[layer])


def throughput(args: argparse.Namespace, scratch: Path, features: np.ndarray) -> None:
    nbytes = features.nbytes
    rounds = args.rounds
    results = {}
    store_holder: dict[str, Store] = {}

    def lb_write() -> None:
        store_holder["store"] = write_layerbank(scratch / "lb", features, "throughput")

    write = _median_seconds(lb_write, rounds)
    read = _median_seconds(lambda: read_layerbank(store_holder["store"]), rounds)
    results["layerbank"] = (write, read)

    array_holder: dict[str, zarr.Array] = {}

    def zarr_write() -> None:
        array_holder["array"] = write_zarr(scratch / "raw.zarr", features, [Crc32cCodec()])

    write = _median_seconds(zarr_write, rounds)
    read = _median_seconds(lambda: read_zarr(array_holder["array"]), rounds)
    results["raw zarr"] = (write, read)

    path = scratch / "plain.bin"

    def file_write() -> None:
        with path.open("wb") as handle:
            features.tofile(handle)

    write = _median_seconds(file_write, rounds)
    read = _median_seconds(lambda: np.fromfile(path, dtype=features.dtype), rounds)
    results["plain file"] = (write, read)

    print(
        f"\nthroughput, {features.dtype} {features.shape}, {nbytes / MB:.0f} MB, median of {rounds}"
    )
    print(f"  {'path':12s} {'write MB/s':>10s} {'read MB/s':>10s}")
    for name, (write, read) in results.items():
        print(f"  {name:12s} {nbytes / write / MB:10.0f} {nbytes / read / MB:10.0f}")


def compression(args: argparse.Namespace, scratch: Path, rng: np.random.Generator) -> None:
    shape = (args.layers, args.items, args.dim)
    chains = {"crc32c": [Crc32cCodec()], "zstd+crc32c": [ZstdCodec(level=3), Crc32cCodec()]}
    print(f"\ncompression, shape {shape}, median of {args.rounds}")
    print(f"  {'dtype':8s} {'codecs':12s} {'write MB/s':>10s} {'read MB/s':>10s} {'ratio':>6s}")
    for dtype in ("float16", "float32"):
        features = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        for name, codecs in chains.items():
            path = scratch / f"{dtype}-{name}.zarr"
            write_seconds, read_seconds = _time_zarr(path, features, codecs, args.rounds)
            ratio = features.nbytes / _disk_bytes(path)
            print(
                f"  {dtype:8s} {name:12s} {features.nbytes / write_seconds / MB:10.0f} "
                f"{features.nbytes / read_seconds / MB:10.0f} {ratio:6.3f}"
            )


def _time_zarr(
    path: Path, features: np.ndarray, codecs: list[object], rounds: int
) -> tuple[float, float]:
    """Return the median write and read seconds of ``features`` as plain zarr with ``codecs``."""
    holder: dict[str, zarr.Array] = {}

    def write() -> None:
        holder["array"] = write_zarr(path, features, codecs)

    write_seconds = _median_seconds(write, rounds)
    return write_seconds, _median_seconds(lambda: read_zarr(holder["array"]), rounds)


def rows(args: argparse.Namespace, scratch: Path, features: np.ndarray) -> None:
    """Time the store part of a single-row request, in this process, without HTTP."""
    store = write_layerbank(scratch / "rows-store", features, "rows")
    featureset_id = store.featureset_ids()[0]
    layer = args.layers // 2
    store.featureset(featureset_id).read_layer(layer, 0, 1)  # warm-up
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for _ in range(args.row_requests):
        row = int(rng.integers(0, args.items))
        featureset = store.featureset(featureset_id)
        featureset.require_complete()
        featureset.layer_position(layer)
        featureset.check_rows(row, row + 1)
        featureset.read_layer(layer, row, row + 1).tolist()
    seconds = (time.perf_counter() - started) / args.row_requests
    print(f"\nrows, store part of a single-row request: {seconds * 1e3:.3f} ms per request")


def _redis_commands(url: str) -> int:
    from redis import Redis

    stats = Redis.from_url(url).info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def api(args: argparse.Namespace, scratch: Path, features: np.ndarray) -> None:
    import httpx

    from service.client import Client
    from service.launcher import RedisServer, free_port, stop_process, wait_for_http

    root = scratch / "api-store"
    store = write_layerbank(root, features, "api")
    featureset_id = store.featureset_ids()[0]
    redis = RedisServer(free_port(), scratch / "redis", prefer="path").start()
    port = free_port()
    env = {
        **os.environ,
        "LAYERBANK_STORE": str(root),
        "REDIS_URL": redis.url,
        "LAYERBANK_HOST": "127.0.0.1",
        "LAYERBANK_PORT": str(port),
        "LAYERBANK_QUEUE": "layerbank-bench-store",
    }
    headers = {}
    if args.api_key:
        from redis import Redis

        from service.auth import KeyStore

        headers["Authorization"] = (
            f"Bearer {KeyStore(Redis.from_url(redis.url)).create('bench', 'read')}"
        )
    log = (scratch / "api.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.serve", "--log-level", "WARNING"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", timeout=60)
        rng = np.random.default_rng(args.seed)
        latencies: dict[str, list[float]] = {
            "row": [],
            "layer": [],
            "layer, httpx stream": [],
            "layer, Client": [],
            "layer, plain socket": [],
        }
        # CPU seconds of the API process per request, by kind (Linux only).
        server_cpu: dict[str, float] = {}
        layer_url = f"/v1/featuresets/{featureset_id}/layers/{args.layers // 2}"
        with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
            http.get(layer_url, params={"start": 0, "stop": 1, "format": "json"})  # warm-up
            commands_before = _redis_commands(redis.url)
            cpu_before = _cpu_seconds(process.pid)
            for _ in range(args.row_requests):
                row = int(rng.integers(0, args.items))
                started = time.perf_counter()
                response = http.get(
                    layer_url, params={"start": row, "stop": row + 1, "format": "json"}
                )
                latencies["row"].append(time.perf_counter() - started)
                response.raise_for_status()
            commands = (_redis_commands(redis.url) - commands_before) / args.row_requests
            cpu_before = _count_cpu(server_cpu, "row", process.pid, cpu_before, args.row_requests)
            layer_bytes = 0
            for _ in range(args.layer_requests):
                started = time.perf_counter()
                response = http.get(layer_url)
                latencies["layer"].append(time.perf_counter() - started)
                response.raise_for_status()
                layer_bytes = len(response.content)
            kind = "layer"
            cpu_before = _count_cpu(server_cpu, kind, process.pid, cpu_before, args.layer_requests)
            for _ in range(args.layer_requests):
                started = time.perf_counter()
                with http.stream("GET", layer_url) as response:
                    response.raise_for_status()
                    for _piece in response.iter_raw(2**20):
                        pass
                latencies["layer, httpx stream"].append(time.perf_counter() - started)
            kind = "layer, httpx stream"
            cpu_before = _count_cpu(server_cpu, kind, process.pid, cpu_before, args.layer_requests)
        key = headers.get("Authorization", "").removeprefix("Bearer ") or None
        with Client(url, api_key=key) as client:
            for _ in range(args.layer_requests):
                started = time.perf_counter()
                client.layer_array(featureset_id, args.layers // 2)
                latencies["layer, Client"].append(time.perf_counter() - started)
        kind = "layer, Client"
        cpu_before = _count_cpu(server_cpu, kind, process.pid, cpu_before, args.layer_requests)
        buffer = bytearray(2 * layer_bytes + 4096)
        client_cpu = time.process_time()
        for _ in range(args.layer_requests):
            started = time.perf_counter()
            _raw_get(url, layer_url, headers, buffer)
            latencies["layer, plain socket"].append(time.perf_counter() - started)
        client_cpu = (time.process_time() - client_cpu) / args.layer_requests
        kind = "layer, plain socket"
        _count_cpu(server_cpu, kind, process.pid, cpu_before, args.layer_requests)
    finally:
        stop_process(process)
        redis.stop()
        log.close()

    auth = "API key" if args.api_key else "off (loopback, no keys)"
    print(f"\napi, sequential requests from one client, auth {auth}")
    for kind, values in latencies.items():
        p50, p99 = np.percentile(values, [50, 99]) * 1000
        cpu = f", server CPU {server_cpu[kind] * 1000:6.1f} ms" if kind in server_cpu else ""
        print(f"  {kind:20s} {len(values):4d} requests, p50 {p50:7.1f} ms, p99 {p99:7.1f} ms{cpu}")
    print(f"  plain socket client CPU per layer request: {client_cpu * 1000:.1f} ms")
    layer_mb = layer_bytes / MB
    print(f"  whole layer {layer_mb:.1f} MB, MB/s at the median:")
    for kind in ("layer", "layer, httpx stream", "layer, Client", "layer, plain socket"):
        print(f"    {kind:20s} {layer_mb / statistics.median(latencies[kind]):5.0f}")
    print(f"  {commands:.2f} Redis commands per single-row request")


def _cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of process ``pid`` from /proc, or None without it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count_cpu(
    totals: dict[str, float], kind: str, pid: int, before: float | None, requests: int
) -> float | None:
    """Store the CPU seconds per request of ``kind`` since ``before`` and return the new reading."""
    now = _cpu_seconds(pid)
    if now is not None and before is not None:
        totals[kind] = (now - before) / requests
    return now


def _raw_get(url: str, path: str, headers: dict[str, str], buffer: bytearray) -> int:
    """GET ``path`` over a plain socket into ``buffer``; return the bytes received.

    Measures the server without an HTTP client library's parsing and copies.
    """
    parts = urlsplit(url)
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
    request += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    view = memoryview(buffer)
    received = 0
    with socket.create_connection((parts.hostname, parts.port)) as connection:
        connection.sendall(request.encode())
        while chunk := connection.recv_into(view[received:]):
            received += chunk
    if not buffer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path} failed: {bytes(buffer[:80])!r}")
    return received


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    args = parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="layerbank-bench-store-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    shape = (args.layers, args.items, args.dim)
    features = rng.standard_normal(shape, dtype=np.float32).astype(args.dtype)
    print(f"date        {datetime.date.today().isoformat()}")
    print(f"machine     {platform.machine()}, {os.cpu_count()} CPUs, load {_load_average()}")
    print(f"zarr        {zarr.__version__}, numpy {np.__version__}, scratch {scratch}")
    try:
        if "throughput" not in args.skip:
            throughput(args, scratch, features)
        if "compression" not in args.skip:
            compression(args, scratch, rng)
        if "rows" not in args.skip:
            rows(args, scratch, features)
        if "api" not in args.skip:
            api(args, scratch, features)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nload at the end {_load_average()}")


if __name__ == "__main__":
    main()
