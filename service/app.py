"""The FastAPI application factory and the translation of domain errors to HTTP."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from rq import Queue

from service.auth import (
    ERROR_RESPONSES,
    BodySizeLimitMiddleware,
    InternalErrorMiddleware,
    JobQuotaError,
    KeyStore,
    LimitExceededError,
    authorize,
    keys_required,
)
from service.dashboard import install_dashboard
from service.jobs import JobNotFoundError
from service.metrics import install_metrics
from service.routes import (
    catalog,
    claims,
    extractions,
    featuresets,
    fsck,
    health,
    jobs,
    models,
    probes,
    projections,
)
from store import InvalidIdError, NotFoundError, NotReadyError, Store, StoreError
from store.settings import Settings, get_settings
from workers.errors import DatasetError, ModelError, PathNotAllowedError, WorkersError

logger = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status code.
STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    (PathNotAllowedError, 403),
    (LimitExceededError, 413),
    (JobQuotaError, 429),
    (JobNotFoundError, 404),
    (NotFoundError, 404),
    (NotReadyError, 409),
    (InvalidIdError, 422),
    (DatasetError, 422),
    (ModelError, 422),
    (WorkersError, 422),
    (StoreError, 422),
]


def error_body(exc: StoreError | WorkersError) -> dict[str, Any]:
    value = exc.value
    if not (value is None or isinstance(value, (str, int, float, bool, list, dict))):
        value = repr(value)
    body: dict[str, Any] = {"detail": {"message": exc.message, "field": exc.field, "value": value}}
    if isinstance(exc, NotReadyError) and exc.progress:
        body["detail"]["progress"] = exc.progress
    return body


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (StoreError, WorkersError))
    code = next(code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls))
    logger.info("%s %s -> %d: %s", request.method, request.url.path, code, exc.message)
    return JSONResponse(error_body(exc), status_code=code)


def _json_value(value: Any, limit: int = 200) -> Any:
    """Return ``value`` as something JSON can carry: finite numbers and short strings as is."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _first(location: Any) -> str | None:
    return str(location[0]) if location else None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Report request validation errors in the same shape as domain errors, first one first."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        location = [
            str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")
        ]
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            problems.append(
                {
                    "field": "body",
                    "message": f"invalid JSON: {reason}; send a JSON object",
                    "type": "json_invalid",
                    "value": None,
                }
            )
            continue
        # The top-level request field: deeper parts of a location are union tags such as
        # "list[int]" or list indices, kept in "location" for the curious.
        problems.append(
            {
                "field": location[0] if location else _first(error.get("loc", ())),
                "location": ".".join(location),
                "message": str(error.get("msg", "invalid value")),
                "type": str(error.get("type", "")),
                "value": None
                if error.get("type") == "missing"
                else _json_value(error.get("input")),
            }
        )
    first = (
        problems[0] if problems else {"field": None, "message": "invalid request", "value": None}
    )
    message = f"{first['field'] or 'request'}: {first['message']}"
    if first["value"] is not None:
        message += f" (got {first['value']!r})"
    if len(problems) > 1:
        message += f"; {len(problems) - 1} more problem(s) under errors"
    logger.info("%s %s -> 422: %s", request.method, request.url.path, message)
    detail = {
        "message": message,
        "field": first["field"],
        "value": first["value"],
        "errors": problems,
    }
    return JSONResponse({"detail": detail}, status_code=422)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    try:
        open_mode = not keys_required(settings, app.state.key_store)
    except RedisError:
        logger.exception("could not count API keys in Redis at start-up")
        open_mode = settings.auth == "off"
    if open_mode:
        logger.warning(
            "API keys are NOT checked (LAYERBANK_AUTH=%s, no keys, host %s): anyone "
            "who can reach the port can read, write and delete; create a key with "
            "`layerbank keys create` to require keys",
            settings.auth,
            settings.host,
        )
    # The asyncio client belongs to this event loop, so it lives exactly as long as the loop.
    key_store: KeyStore = app.state.key_store
    key_store.async_redis = AsyncRedis.from_url(settings.redis_url)
    try:
        yield
    finally:
        client, key_store.async_redis = key_store.async_redis, None
        await client.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the store, Redis connection and queue live on ``app.state``."""
    settings = settings or get_settings()
    app = FastAPI(
        title="layerbank",
        version="0.1.0",
        summary="Feature store and probing service for vision transformers.",
        # Every route needs an API key with the scope of its method unless marked public.
        dependencies=[Depends(authorize)],
        responses=ERROR_RESPONSES,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.store = Store(settings.store)
    app.state.redis = Redis.from_url(settings.redis_url)
    app.state.queue = Queue(settings.queue, connection=app.state.redis)
    app.state.key_store = KeyStore(app.state.redis)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(StoreError, _domain_error)
    app.add_exception_handler(WorkersError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for router in (
        extractions.router,
        jobs.router,
        featuresets.router,
        probes.router,
        models.router,
        health.router,
    ):
        app.include_router(router)
    app.include_router(catalog.router)
    app.include_router(projections.router)
    app.include_router(claims.router)
    app.include_router(fsck.router)
    install_dashboard(app)
    install_metrics(app)
    return app
