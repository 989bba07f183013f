"""Worker entry point: ``python -m workers.main`` (or ``layerbank worker``).

Runs a `workers.heartbeat.HeartbeatWorker`, an rq ``SimpleWorker``: jobs execute in this
process, never in a fork, so a model loaded once (and a CUDA context) is reused by every job.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import socket
import time

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from store.logs import add_log_level_argument, configure_logging
from store.settings import SettingsError, get_settings
from workers.heartbeat import DEFAULT_HEARTBEAT_INTERVAL, HeartbeatWorker

logger = logging.getLogger(__name__)

# The job functions are imported at start-up rather than by the first job, so a worker whose
# imports are broken fails at once instead of failing every job.
importlib.import_module("workers.jobs")

# Seconds between two PINGs to Redis after rq's loop stopped on an error.
RECONNECT_INTERVAL = 2.0


def run_worker(
    redis_url: str,
    queue: str,
    *,
    burst: bool = False,
    name: str | None = None,
    log_level: str = "INFO",
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
) -> None:
    """Process jobs from ``queue`` until stopped (or until it is empty, with ``burst``).

    rq's loop stops on any error it does not expect, such as Redis going away while a job ends.
    The worker then waits until Redis responds to a PING and starts the loop again, so an
    outage of Redis does not end the process. A requested stop (SIGINT, SIGTERM) ends it.
    """
    connection = Redis.from_url(redis_url)
    worker_name = name or f"layerbank-{socket.gethostname()}-{os.getpid()}"
    while True:
        worker = HeartbeatWorker(
            [Queue(queue, connection=connection)],
            connection=connection,
            name=worker_name,
            heartbeat_interval=heartbeat_interval,
        )
        logger.info("worker %s up on queue %s", worker_name, queue)
        try:
            worker.work(burst=burst, logging_level=log_level, with_scheduler=False)
        except RedisError as exc:  # rq's clean-up after its loop needs Redis too
            logger.error("worker %s: Redis failed while the worker stopped: %s", worker_name, exc)
        finally:
            logger.info("worker %s down", worker_name)
        if burst or worker.stop_requested:
            return
        logger.error(
            "worker %s stopped on an error; it starts again once Redis responds", worker_name
        )
        if not _wait_for_redis(connection, worker):
            return
        # Its registration may have survived the outage. A failure here leaves it to expire.
        with contextlib.suppress(RedisError):
            worker.register_death()


def _wait_for_redis(connection: Redis, worker: HeartbeatWorker) -> bool:
    """Wait until Redis responds to a PING; return False if a stop is requested meanwhile.

    The first PING comes after one interval, so an error that is not Redis's restarts the loop
    at most once per interval.
    """
    while not worker.stop_requested:
        time.sleep(RECONNECT_INTERVAL)
        try:
            connection.ping()
            return True
        except RedisError:
            continue
    return False


def check_device(device: str) -> None:
    """Raise SettingsError when ``device`` names a CUDA device that this machine lacks.

    Without the check the worker would register, count in /healthz and fail every job with a
    torch error such as "Torch not compiled with CUDA enabled".
    """
    if not device.startswith("cuda"):
        return
    import torch

    fix = "set LAYERBANK_DEVICE=auto (CUDA when a GPU is visible, else CPU) or cpu"
    if not torch.cuda.is_available():
        raise SettingsError(
            f"invalid LAYERBANK_DEVICE={device!r}: CUDA is not available on this machine "
            f"(torch {torch.__version__}); {fix}",
            field="device",
        )
    _, _, index = device.partition(":")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise SettingsError(
            f"invalid LAYERBANK_DEVICE={device!r}: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}; name one of them, or {fix}",
            field="device",
        )


def main(argv: list[str] | None = None) -> None:
    try:
        settings = get_settings()
        check_device(settings.device)
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None
    parser = argparse.ArgumentParser(prog="layerbank-worker", description=__doc__)
    parser.add_argument("--redis-url", default=settings.redis_url, help="Redis URL (REDIS_URL)")
    parser.add_argument("--queue", default=settings.queue, help="queue name (LAYERBANK_QUEUE)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", default=None, help="worker name shown in rq")
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    device = settings.resolved_device()
    # CUDA always computes ImageGPT features under bfloat16 autocast; a CPU only with the setting.
    bf16 = device.startswith("cuda") or settings.cpu_bf16
    logger.info(
        "worker device %s, ImageGPT forward pass in %s", device, "bfloat16" if bf16 else "float32"
    )
    run_worker(
        args.redis_url,
        args.queue,
        burst=args.burst,
        name=args.name,
        log_level=args.log_level,
        heartbeat_interval=settings.heartbeat_interval,
    )


if __name__ == "__main__":
    main()
