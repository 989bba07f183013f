"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from redis.exceptions import RedisError
from rq import Worker

from service.auth import public
from service.deps import QueueDep, RedisDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
@public
def healthz(redis: RedisDep, queue: QueueDep) -> dict[str, object]:
    """Report whether Redis responds and how many workers and queued jobs there are (no key)."""
    try:
        redis.ping()
        workers = len(Worker.all(connection=redis))
        queued = len(queue)
        redis_ok = True
    except RedisError:
        workers, queued, redis_ok = 0, 0, False
    return {
        "status": "ok" if redis_ok else "degraded",
        "redis": redis_ok,
        "workers": workers,
        "queued_jobs": queued,
    }
