"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from redis.exceptions import RedisError
from rq import Worker

from service.deps import QueueDep, RedisDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(store: StoreDep, redis: RedisDep, queue: QueueDep) -> dict[str, object]:
    """Reports whether Redis answers, how many workers are up and where the store is."""
    try:
        redis.ping()
        workers = len(Worker.all(connection=redis))
        queued = len(queue)
        redis_ok = True
    except RedisError:
        workers, queued, redis_ok = 0, 0, False
    return {"status": "ok" if redis_ok else "degraded", "redis": redis_ok, "workers": workers,
            "queued_jobs": queued, "store": store.root}
