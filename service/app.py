"""The FastAPI application factory and the translation of domain errors to HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from rq import Queue
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.auth import (
    ERROR_RESPONSES,
    REDIS_RETRY_AFTER,
    BodySizeLimitMiddleware,
    InternalErrorMiddleware,
    JobQuotaError,
    KeyStore,
    LimitExceededError,
    authorize,
    is_public,
    keys_required,
    log_redis_outage,
)
from service.dashboard import install_dashboard
from service.head import HeadMiddleware, request_method
from service.jobs import (
    PRUNE_INTERVAL,
    JobNotFoundError,
    JobNotResumableError,
    prune_jobs_if_due,
)
from service.metrics import install_metrics
from service.openapi import add_method_not_allowed
from service.query import check_query
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
from store import (
    DamagedChunkError,
    InvalidIdError,
    LayoutError,
    NotFoundError,
    NotReadyError,
    Store,
    StoreError,
)
from store.ids import ID_REGEX, NAME_REGEX
from store.logs import escape_nonprintable
from store.settings import Settings, get_settings
from workers.errors import (
    BusyError,
    DatasetError,
    ModelError,
    PathNotAllowedError,
    WorkersError,
)

logger = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status code.
STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    # Stored data is damaged: the server's fault, not the request's.
    (DamagedChunkError, 500),
    (BusyError, 503),
    (PathNotAllowedError, 403),
    (LimitExceededError, 413),
    (JobQuotaError, 429),
    (JobNotFoundError, 404),
    (JobNotResumableError, 409),
    (NotFoundError, 404),
    (NotReadyError, 409),
    # A feature set whose metadata is damaged or not laid out as this version writes it.
    (LayoutError, 409),
    (InvalidIdError, 422),
    (DatasetError, 422),
    (ModelError, 422),
    (WorkersError, 422),
    (StoreError, 422),
]


class SafeJSONResponse(JSONResponse):
    """A JSON response that can also carry strings with lone surrogates.

    A request may contain the JSON escape \\ud800, which Python reads as a lone surrogate that
    UTF-8 cannot encode. A body containing one, such as the error naming that value, is
    written with every non-ASCII character escaped, so the client reads back what it sent.
    """

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
            return text.encode("ascii")


def error_body(exc: StoreError | WorkersError) -> dict[str, Any]:
    value = _json_safe(exc.value)
    body: dict[str, Any] = {"detail": {"message": exc.message, "field": exc.field, "value": value}}
    if isinstance(exc, NotReadyError) and exc.progress:
        body["detail"]["progress"] = exc.progress
    return body


def _request_line(request: Request) -> str:
    """Return the method and decoded path of ``request`` for a log line, control bytes escaped."""
    return escape_nonprintable(f"{request_method(request)} {request.url.path}")


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (StoreError, WorkersError))
    code = next(code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls))
    level = logging.ERROR if code >= 500 and code != 503 else logging.INFO
    logger.log(
        level, "%s -> %d: %s", _request_line(request), code, escape_nonprintable(exc.message)
    )
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, BusyError) else None
    return SafeJSONResponse(error_body(exc), status_code=code, headers=headers)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log_redis_outage(_request_line(request), exc)
    return SafeJSONResponse(
        {
            "detail": {
                "message": "Redis is unavailable, so jobs and results cannot be read or queued; "
                "retry later",
                "field": None,
                "value": None,
            }
        },
        status_code=503,
        headers={"Retry-After": str(REDIS_RETRY_AFTER)},
    )


def redis_url_for_display(url: str) -> str:
    """Return ``url`` with its password, if any, replaced by ``***``, for logs and hints."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _json_safe(value: Any) -> Any:
    """Return ``value`` with everything JSON cannot carry written as its repr.

    Infinite and NaN floats count too: a request may contain 1e400, which Python reads as inf,
    and the error that names it must still be sent.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    return repr(value)


def _json_value(value: Any, limit: int = 200) -> Any:
    """Return ``value`` as something JSON can carry: finite numbers and short strings as is."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, (list, dict)):
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            pass  # Not JSON as it is, so its repr below is used.
        else:
            if len(text) <= limit:
                return value
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _first(location: Any) -> str | None:
    return str(location[0]) if location else None


# Pydantic error types of a value that is not an object where a model or dict is expected.
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type", "missing")


def _body_not_object(request: Request, error: dict[str, Any]) -> dict[str, Any]:
    """Describe a request body that is missing or not a JSON object, with how to send one."""
    content_type = request.headers.get("content-type")
    value = error.get("input")
    if error.get("type") == "missing":
        message = "the request body is missing"
        value = None
    elif isinstance(value, bytes):
        # FastAPI passes the raw bytes on, unparsed, when the content type is not JSON.
        value = value.decode("utf-8", errors="replace")
        sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        message = f"the request body was not parsed as JSON because the request has {sent}"
    else:
        message = "the request body is not a JSON object"
    return {
        "field": "body",
        "location": "",
        "message": f"{message}; send a JSON object with Content-Type: application/json",
        "type": str(error.get("type", "")),
        "value": _json_value(value),
    }


def _model_at(model: Any, location: list[str]) -> type[BaseModel] | None:
    """Return the pydantic model found by following ``location`` from ``model``, if any."""
    for part in location:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


def _extra_field(request: Request, error: dict[str, Any], location: list[str]) -> dict[str, Any]:
    """Describe an unknown key, listing the keys that the model at its location accepts."""
    key = location[-1] if location else "?"
    parent = ".".join(location[:-1])
    where = f"{parent} in the request body" if parent else "the request body"
    route = request.scope.get("route")
    body_field = getattr(route, "body_field", None)
    body_model = body_field.field_info.annotation if body_field is not None else None
    model = _model_at(body_model, location[:-1])
    message = f"{key!r} is not a field of {where}"
    if model is None:
        message += "; remove it"
    else:
        allowed = [field.alias or name for name, field in model.model_fields.items()]
        message += f", which accepts only {', '.join(allowed)}"
        value = error.get("input")
        nested = [name for name in value if name in allowed] if isinstance(value, dict) else []
        if nested:
            # A common slip: settings wrapped in an object, e.g. {"params": {"steps": 20}}.
            level = f"into {parent}" if parent else "to the top level of the body"
            message += f"; move {', '.join(nested)} out of {key} {level}"
    return {
        "field": location[0] if location else "body",
        "location": ".".join(location),
        "message": message,
        "type": "extra_forbidden",
        "value": _json_value(error.get("input")),
    }


def _location_part(part: object) -> str:
    """Return one part of a pydantic error location as the request names it.

    A union's tag names each alternative by its schema, so an integer with a conversion before
    its check reads ``function-before[name(), int]``. Only the type after the function is kept.
    """
    text = str(part)
    while (start := text.find("function-")) != -1:
        open_at = text.find("[", start)
        skip_to = text.find("), ", open_at)
        if open_at == -1 or skip_to == -1:
            break
        depth, close_at = 0, len(text)
        for index in range(open_at, len(text)):
            depth += {"[": 1, "]": -1}.get(text[index], 0)
            if depth == 0:
                close_at = index
                break
        text = text[:start] + text[skip_to + 3 : close_at] + text[close_at + 1 :]
    return text


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Report request validation errors in the same shape as domain errors, first one first."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        location = [
            _location_part(part)
            for part in error.get("loc", ())
            if part not in ("body", "query", "path")
        ]
        if tuple(error.get("loc", ())) == ("body",) and error.get("type") in _NOT_AN_OBJECT:
            problems.append(_body_not_object(request, error))
            continue
        if error.get("type") == "extra_forbidden":
            problems.append(_extra_field(request, error, location))
            continue
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
    # For a union such as Literal["all"] | list[int], "should be 'all'" helps least, so the
    # problems of the other alternatives come first (the sort is stable).
    problems.sort(key=lambda problem: "literal[" in str(problem.get("location", "")))
    first = (
        problems[0] if problems else {"field": None, "message": "invalid request", "value": None}
    )
    # An unknown key is named by its whole location, since its top-level field may be valid.
    label = first["location"] if first.get("type") == "extra_forbidden" else first["field"]
    message = f"{label or 'request'}: {first['message']}"
    if first["value"] is not None:
        # As JSON, the language of the request: true, not Python's True.
        message += f" (got {json.dumps(first['value'])})"
    if len(problems) > 1:
        message += f"; {len(problems) - 1} more problem(s) under errors"
    logger.info("%s -> 422: %s", _request_line(request), escape_nonprintable(message))
    detail = {
        "message": message,
        "field": first["field"],
        "value": first["value"],
        "errors": problems,
    }
    return SafeJSONResponse({"detail": detail}, status_code=422)


# Methods in an Allow header come in this order, and any others follow in alphabetical order.
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Return every method that the app's routes accept on the request's path.

    Starlette's 405 lists only the methods of the first route whose path matches, but a path
    such as /v1/probes has its GET and its POST in separate routes. Mounts, which declare no
    methods, are skipped.
    """
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        if not route.methods:
            continue
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")  # HeadMiddleware serves HEAD wherever a GET route matches.
    known = [method for method in _METHOD_ORDER if method in methods]
    return known + sorted(methods - set(_METHOD_ORDER))


def _route_matches(request: Request, path: str) -> bool:
    """Return whether a route of the app takes the request's method on ``path``."""
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] == Match.FULL for route in request.app.routes)


def _http_message(
    request: Request, exc: StarletteHTTPException, headers: Mapping[str, str] | None
) -> str:
    """Return the message for an HTTPException whose detail is a plain string."""
    # The raw path keeps percent-escapes such as %2F, which the decoded path loses.
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else request.url.path
    target = f"{request_method(request)} {path}"
    try:
        default_detail = HTTPStatus(exc.status_code).phrase
    except ValueError:
        default_detail = None
    if exc.detail != default_detail:
        # A detail written for this error is kept, and only the default phrases get a hint.
        return f"{target}: {exc.detail}"
    if exc.status_code == 404:
        trimmed = request.url.path.rstrip("/")
        # The raw path, because an id of %2F also ends the decoded path with a slash.
        if path.endswith("/") and trimmed and _route_matches(request, trimmed):
            return f"{target} not found: routes have no trailing slash; use {trimmed}"
        return (
            f"{target} not found: no route matches this path, and an id containing / or %2F "
            "makes it a different path; list the routes with GET /docs or GET /openapi.json"
        )
    if exc.status_code == 405:
        allowed = (headers or {}).get("Allow")
        use = f"use {allowed}" if allowed else "see GET /docs for the methods of each route"
        return f"{request.method} is not allowed on {path}; {use}"
    return f"{target} failed: {exc.detail}"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Wrap a plain-string HTTPException detail, such as routing's 404 and 405, in the error shape.

    A detail that is not a string, like the dicts of service.auth, passes through unchanged.
    """
    assert isinstance(exc, StarletteHTTPException)
    if not isinstance(exc.detail, str) or exc.status_code in (204, 304):
        return await http_exception_handler(request, exc)
    headers = exc.headers
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        # A 405 raised by a mount, such as StaticFiles, matches no route and keeps its header.
        if allowed:
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_DETAIL:
        return _body_parse_error(request, exc.__cause__)
    message = _http_message(request, exc, headers)
    logger.info(
        "%s -> %d: %s", _request_line(request), exc.status_code, escape_nonprintable(message)
    )
    return SafeJSONResponse(
        {"detail": {"message": message, "field": None, "value": None}},
        status_code=exc.status_code,
        headers=headers,
    )


# The detail FastAPI gives a body whose parsing raised anything but a JSONDecodeError, such as
# invalid UTF-8 or JSON nested deeper than Python's recursion limit.
_BODY_PARSE_DETAIL = "There was an error parsing the body"


def _body_parse_error(request: Request, cause: BaseException | None) -> JSONResponse:
    """Return the 422 for a JSON body that could not be decoded, naming the reason."""
    if isinstance(cause, UnicodeDecodeError):
        # Python's JSON parser picks UTF-16 or UTF-32 from the first bytes, UTF-8 otherwise.
        encoding = cause.encoding.upper().removesuffix("-LE").removesuffix("-BE")
        byte = cause.object[cause.start]
        reason = (
            f"the body could not be decoded as {encoding} ({cause.reason}, byte 0x{byte:02x} "
            f"at position {cause.start}); send the JSON encoded as UTF-8"
        )
    elif isinstance(cause, RecursionError):
        reason = "the body's JSON is nested too deeply to parse; send a flatter JSON object"
    else:
        reason = f"the body could not be read as JSON ({cause!r}); send a JSON object"
    message = f"body: {reason}"
    logger.info("%s -> 422: %s", _request_line(request), escape_nonprintable(message))
    return SafeJSONResponse(
        {"detail": {"message": message, "field": "body", "value": None}}, status_code=422
    )


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
            "`REDIS_URL=%s layerbank keys create` to require keys",
            settings.auth,
            settings.host,
            redis_url_for_display(settings.redis_url),
        )
    # An asyncio client is bound to the event loop that first uses it, so the lifespan of the
    # app (one loop) opens and closes it.
    key_store: KeyStore = app.state.key_store
    key_store.async_redis = AsyncRedis.from_url(settings.redis_url)
    pruning = (
        asyncio.create_task(_prune_job_records(app)) if settings.job_retention_days > 0 else None
    )
    try:
        yield
    finally:
        if pruning is not None:
            pruning.cancel()
        client, key_store.async_redis = key_store.async_redis, None
        if client is not None:  # None when another lifespan of the same app closed it.
            await client.aclose()


async def _prune_job_records(app: FastAPI) -> None:
    """Delete old records of ended jobs, once per PRUNE_INTERVAL across the deployment.

    Every API process tries a few times per interval, so the pass still runs on time when the
    process that ran the last one has stopped.
    """
    settings: Settings = app.state.settings
    while True:
        try:
            await run_in_threadpool(
                prune_jobs_if_due,
                app.state.redis,
                app.state.store,
                older_than_days=settings.job_retention_days,
            )
        except (RedisError, StoreError):
            logger.exception("pruning old job records failed; the next pass tries again")
        await asyncio.sleep(PRUNE_INTERVAL / 6)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the store, Redis connection and queue live on ``app.state``."""
    settings = settings or get_settings()
    app = FastAPI(
        title="layerbank",
        version="0.1.0",
        summary="Feature store and probing service for vision transformers.",
        # Every route needs an API key with the scope of its method unless marked public.
        # Unknown or repeated query parameters are a 422 instead of being ignored.
        dependencies=[Depends(authorize), Depends(check_query)],
        responses=ERROR_RESPONSES,
        lifespan=_lifespan,
        # Starlette's redirect to the path without its trailing slash builds the Location from
        # the Host header, which the client controls. The 404 names the path to use instead.
        redirect_slashes=False,
        default_response_class=SafeJSONResponse,
    )
    app.state.settings = settings
    app.state.store = Store(settings.store)
    app.state.redis = Redis.from_url(settings.redis_url)
    app.state.queue = Queue(settings.queue, connection=app.state.redis)
    app.state.key_store = KeyStore(app.state.redis)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Outermost, so that routing, key checks and the other middleware see the GET it makes.
    app.add_middleware(HeadMiddleware)
    app.add_exception_handler(StoreError, _domain_error)
    app.add_exception_handler(WorkersError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
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
    _describe_routes_in_openapi(app)
    return app


# Path and query parameters that are ids or store names, with the form the routes check.
_PARAMETER_PATTERNS = {
    "featureset_id": ID_REGEX,
    "probe_id": ID_REGEX,
    "projection_id": ID_REGEX,
    "job_id": ID_REGEX,
    "before": ID_REGEX,
    "probe": ID_REGEX,
    "name": NAME_REGEX,
}


def _describe_routes_in_openapi(app: FastAPI) -> None:
    """Complete the generated OpenAPI document with what the dependencies do not declare.

    The key check is a dependency of every route, so FastAPI lists a key and its 401 and 403
    on the public routes too. This removes them there, and gives the ids and store names in
    paths and queries the forms that the routes check. It also adds the 405 response that
    every path returns for a method it does not take.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for route in iter_route_contexts(app.routes):
            if not route.methods or not getattr(route, "include_in_schema", False):
                continue
            item = schema["paths"].get(route.path_format, {})
            for method in route.methods:
                operation = item.get(method.lower())
                if operation is None:
                    continue
                if is_public(route.endpoint):
                    operation["security"] = []
                    for code in ("401", "403"):
                        operation["responses"].pop(code, None)
                for parameter in operation.get("parameters", []):
                    pattern = _PARAMETER_PATTERNS.get(parameter["name"])
                    if pattern is not None:
                        _add_pattern(parameter["schema"], pattern)
        add_method_not_allowed(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_pattern(schema: dict[str, Any], pattern: str) -> None:
    """Set ``pattern`` on the string schema ``schema``, or on its items, or its non-null part."""
    if schema.get("type") == "string":
        schema["pattern"] = pattern
    elif schema.get("type") == "array":
        _add_pattern(schema["items"], pattern)
    for option in schema.get("anyOf", []):
        _add_pattern(option, pattern)
