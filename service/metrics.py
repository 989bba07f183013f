"""Prometheus metrics of the API: ``GET /metrics``, request latency, jobs and worker counters.

Workers run in other processes, often on other machines, so they cannot share an in-process
registry with the API. They add their numbers to the Redis hash ``layerbank:metrics`` instead
(see ``workers.jobs``), and every scrape of ``/metrics`` reads that hash, the rq registries of
the queue and the queue length. Request latency is measured in each API process, so with several
API replicas Prometheus must scrape each one. The Redis-backed series are the same on every
replica, so aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# Written by the workers with HINCRBY / HINCRBYFLOAT / HSET; the field names are the contract.
METRICS_KEY = "layerbank:metrics"
FIELD_BLOCKS_WRITTEN = "blocks_written"
FIELD_IMAGES_EXTRACTED = "images_extracted"
FIELD_EXTRACTION_SECONDS = "extraction_seconds"
FIELD_LAST_BLOCK_IMAGES_PER_SECOND = "last_block_images_per_second"
FIELD_PROBE_FITS = "probe_fits"
FIELD_PROBE_FIT_SECONDS = "probe_fit_seconds"
FIELD_LAST_PROBE_FIT_SECONDS = "last_probe_fit_seconds"

WORKER_FIELDS = (
    FIELD_BLOCKS_WRITTEN,
    FIELD_IMAGES_EXTRACTED,
    FIELD_EXTRACTION_SECONDS,
    FIELD_LAST_BLOCK_IMAGES_PER_SECOND,
    FIELD_PROBE_FITS,
    FIELD_PROBE_FIT_SECONDS,
    FIELD_LAST_PROBE_FIT_SECONDS,
)

# rq registry per job state; "queued" is the queue itself.
JOB_STATES = ("queued", "started", "deferred", "scheduled", "finished", "failed", "canceled")

# Seconds; layer fetches of large feature sets take seconds, health checks under a millisecond.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

router = APIRouter(tags=["health"])


class QueueCollector(Collector):
    """Collects job counts from rq and the worker counters from Redis at scrape time."""

    def __init__(self, redis: Redis, queue: Queue) -> None:
        self.redis = redis
        self.queue = queue

    def describe(self) -> Iterator[Any]:
        # Without describe, registering the collector runs collect(), a Redis round trip (and a
        # logged traceback when Redis is down) while the app is being built.
        return iter(())

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("layerbank_redis_up", "1 if Redis answered this scrape, else 0.")
        try:
            counts = self._job_counts()
            raw = self.redis.hmget(METRICS_KEY, list(WORKER_FIELDS))
        except RedisError:
            logger.exception("metrics: Redis at %s failed during a scrape", self._redis_name())
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily(
            "layerbank_jobs", "rq jobs of the queue by state.", labels=["queue", "state"]
        )
        for state, count in counts.items():
            jobs.add_metric([self.queue.name, state], count)
        yield jobs
        depth = GaugeMetricFamily(
            "layerbank_queue_depth", "rq jobs waiting in the queue.", labels=["queue"]
        )
        depth.add_metric([self.queue.name], counts["queued"])
        yield depth

        # A field no worker has written yet reads as None and is reported as 0.
        values = {field: float(v) for field, v in zip(WORKER_FIELDS, raw, strict=True) if v}
        yield from self._worker_metrics(values)

    def _job_counts(self) -> dict[str, int]:
        queue = self.queue
        # cleanup=False keeps a scrape read-only: rq's cleanup moves expired jobs between
        # registries, which is the workers' business.
        registries = {
            "started": queue.started_job_registry,
            "deferred": queue.deferred_job_registry,
            "scheduled": queue.scheduled_job_registry,
            "finished": queue.finished_job_registry,
            "failed": queue.failed_job_registry,
            "canceled": queue.canceled_job_registry,
        }
        counts = {"queued": queue.count}
        for state, registry in registries.items():
            counts[state] = registry.get_job_count(cleanup=False)
        return counts

    def _worker_metrics(self, values: dict[str, float]) -> Iterator[Any]:
        counters = (
            (
                "layerbank_blocks_written",
                FIELD_BLOCKS_WRITTEN,
                "Feature-set blocks written by the workers.",
            ),
            (
                "layerbank_extracted_images",
                FIELD_IMAGES_EXTRACTED,
                "Images whose hidden states the workers extracted and wrote.",
            ),
            (
                "layerbank_extraction_seconds",
                FIELD_EXTRACTION_SECONDS,
                "Seconds the workers spent in block jobs that wrote a block.",
            ),
            ("layerbank_probe_fits", FIELD_PROBE_FITS, "Probe jobs completed by the workers."),
            (
                "layerbank_probe_fit_seconds",
                FIELD_PROBE_FIT_SECONDS,
                "Seconds the workers spent fitting probes.",
            ),
        )
        for name, field, documentation in counters:
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], values.get(field, 0.0))
            yield counter

        gauges = (
            (
                "layerbank_extraction_images_per_second",
                FIELD_LAST_BLOCK_IMAGES_PER_SECOND,
                "Extraction rate of the most recently written block, images per second "
                "(model and dataset loading included).",
            ),
            (
                "layerbank_probe_last_fit_seconds",
                FIELD_LAST_PROBE_FIT_SECONDS,
                "Seconds the most recent probe job spent fitting.",
            ),
        )
        for name, field, documentation in gauges:
            gauge = GaugeMetricFamily(name, documentation)
            gauge.add_metric([], values.get(field, 0.0))
            yield gauge

    def _redis_name(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


class LatencyMiddleware:
    """Observes the duration of every HTTP request, labelled by route template, not raw path.

    Labelling by template (``/v1/jobs/{job_id}``) keeps the number of series bounded; requests
    that match no route share the label ``unmatched``.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started
            )


@router.get(
    "/metrics",
    responses={
        200: {
            "content": {"text/plain": {}, "application/openmetrics-text": {}},
            "description": "Prometheus text format, or OpenMetrics when the Accept header asks "
            "for it.",
        }
    },
    response_class=Response,
)
def metrics(request: Request) -> Response:
    """Prometheus metrics, in the text or OpenMetrics format the scraper accepts."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), headers={"Content-Type": content_type})


def install_metrics(app: FastAPI) -> None:
    """Add ``GET /metrics`` and the latency middleware to ``app``.

    Each app gets its own registry, so several apps in one process (tests) do not collide.
    Call after ``app.state.redis`` and ``app.state.queue`` are set.
    """
    registry = CollectorRegistry(auto_describe=True)
    histogram = Histogram(
        "layerbank_http_request_duration_seconds",
        "Duration of HTTP requests to the API, by method, route template and status.",
        labelnames=("method", "route", "status"),
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    registry.register(QueueCollector(app.state.redis, app.state.queue))
    app.state.metrics_registry = registry
    app.add_middleware(LatencyMiddleware, histogram=histogram)
    app.include_router(router)
