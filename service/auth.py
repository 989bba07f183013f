"""API keys, scopes and request limits.

Keys live in Redis, shared by every API replica and the CLI:

``layerbank:keys:names``
    hash of key name -> key id.
``layerbank:keys:id:<key id>``
    hash with the name, scope, per-key salt, scrypt digest, creation and last-use times.
``layerbank:keys:jobs:<key name>``
    set of the layerbank job ids the key started, pruned to queued and running jobs on read.
``layerbank:keys:enabled``
    set when the first key is created and never removed by a revoke, so that revoking the last
    key does not turn key checks off in ``auto`` mode.

A key reads ``lb_<key id>_<secret>``. Only its salted scrypt digest is stored, so neither Redis
nor the logs ever contain a usable key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import RedisDep, SettingsDep, StoreDep
from service.jobs import JobNotFoundError, job_state
from service.schemas import ErrorPublic
from store import Store, StoreError, check_name
from store.logs import escape_nonprintable
from store.settings import Settings

logger = logging.getLogger(__name__)

SCOPES = ("read", "write", "admin")
KEY_PREFIX = "layerbank:keys"
# Set by the first key and kept by revokes, so revoking the last key leaves ``auto`` mode checking.
ENABLED_KEY = f"{KEY_PREFIX}:enabled"
KEY_MARKER = "lb"

# scrypt cost: about 16 MiB and tens of milliseconds per check. Verified keys are cached in
# memory by the digest they matched, so a request with a known key skips the scrypt step.
SCRYPT_PARAMS = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

# The scope each HTTP method needs unless the endpoint sets another with `requires_scope`.
SCOPE_BY_METHOD = {
    "GET": "read",
    "HEAD": "read",
    "OPTIONS": "read",
    "POST": "write",
    "PUT": "write",
    "PATCH": "write",
    "DELETE": "admin",
}

_PUBLIC_ATTR = "__layerbank_public__"
_SCOPE_ATTR = "__layerbank_scope__"
_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


class ApiKeyError(StoreError):
    """Raised when an API key name, scope or record is invalid, missing or already taken."""


class LimitExceededError(StoreError):
    """Raised when a request is larger than a configured limit (HTTP 413)."""


class JobQuotaError(StoreError):
    """Raised when an API key already has its maximum number of queued or running jobs."""


class ErrorResponse(BaseModel):
    """Body of every error response except request validation errors."""

    detail: ErrorPublic


class ValidationErrorResponse(BaseModel):
    """Body of a 422: FastAPI's list of validation errors, or one domain error."""

    detail: ErrorPublic | list[dict[str, Any]]


# Declared on every operation, so that clients and schema-based tests know the error shapes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, invalid or revoked API key."},
    403: {
        "model": ErrorResponse,
        "description": "The key's scope is too low, or a path is outside the allowed roots.",
    },
    404: {"model": ErrorResponse, "description": "No such feature set, job, probe or model."},
    409: {
        "model": ErrorResponse,
        "description": "The resource is not complete yet, a job still writes it, or a job "
        "cannot be resumed.",
    },
    413: {"model": ErrorResponse, "description": "The request exceeds a configured limit."},
    422: {"model": ValidationErrorResponse, "description": "Invalid request."},
    429: {"model": ErrorResponse, "description": "The key has its maximum number of jobs."},
    500: {
        "model": ErrorResponse,
        "description": "Internal error; the message names a "
        "request id to look up in the server log.",
    },
    503: {"model": ErrorResponse, "description": "Redis is unavailable."},
}


@dataclass(frozen=True)
class ApiKeyInfo:
    """The public part of an API key record: everything except the salt and digest."""

    name: str
    scope: str
    created: str
    last_used: str | None
    key_id: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _digest(key: str, salt: bytes) -> bytes:
    return hashlib.scrypt(key.encode(), salt=salt, **SCRYPT_PARAMS)


def check_scope(scope: str) -> str:
    """Return ``scope`` if it is one of `SCOPES`, else raise `ApiKeyError`."""
    if scope not in SCOPES:
        raise ApiKeyError(
            f"scope {scope!r} is not a scope; choose one of {', '.join(SCOPES)}",
            field="scope",
            value=scope,
        )
    return scope


def scope_allows(granted: str, needed: str) -> bool:
    """Return whether a key with scope ``granted`` may do what ``needed`` requires."""
    return SCOPES.index(granted) >= SCOPES.index(needed)


class KeyStore:
    """Create, list, verify and revoke API keys stored in Redis.

    Parameters
    ----------
    redis
        The Redis every API replica uses; keys are under ``layerbank:keys:``.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # An asyncio client on the same Redis, opened and closed by the app's lifespan.
        self.async_redis: AsyncRedis | None = None
        self._enabled_seen = False
        self._verified: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _record_key(self, key_id: str) -> str:
        return f"{KEY_PREFIX}:id:{key_id}"

    def count(self) -> int:
        """Return the number of keys."""
        return int(self.redis.hlen(f"{KEY_PREFIX}:names"))

    def enabled(self) -> bool:
        """Return whether a key exists or ever existed in this Redis (see `ENABLED_KEY`).

        Once True, it stays True in this process without asking Redis again, so a Redis that
        restarts without its data does not reopen a running API.
        """
        if not self._enabled_seen:
            self._enabled_seen = bool(self.redis.exists(f"{KEY_PREFIX}:names", ENABLED_KEY))
        return self._enabled_seen

    async def enabled_async(self) -> bool:
        """Return `enabled` through `async_redis`, without blocking the event loop."""
        if self.async_redis is None:
            raise RuntimeError("KeyStore.async_redis is not open; the app's lifespan opens it")
        if not self._enabled_seen:
            found = await self.async_redis.exists(f"{KEY_PREFIX}:names", ENABLED_KEY)
            self._enabled_seen = bool(found)
        return self._enabled_seen

    def create(self, name: str, scope: str) -> str:
        """Store a new key named ``name`` and return it; the plain key is never stored.

        Raises
        ------
        ApiKeyError
            If the name is invalid or taken, or the scope is not one of `SCOPES`.
        """
        check_name(name, field="name")
        check_scope(scope)
        key_id = secrets.token_hex(6)
        key = f"{KEY_MARKER}_{key_id}_{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        record: dict[FieldT, EncodableT] = {
            "name": name,
            "scope": scope,
            "salt": salt.hex(),
            "digest": _digest(key, salt).hex(),
            "created": _now(),
            "last_used": "",
        }
        self.redis.hset(self._record_key(key_id), mapping=record)
        self.redis.set(ENABLED_KEY, "1")
        if not self.redis.hsetnx(f"{KEY_PREFIX}:names", name, key_id):
            self.redis.delete(self._record_key(key_id))
            raise ApiKeyError(
                f"an API key named {name!r} already exists; revoke it first or choose another name",
                field="name",
                value=name,
            )
        logger.info("API key %r created with scope %s", name, scope)
        return key

    def list(self) -> list[ApiKeyInfo]:
        """Return every key's name, scope, creation and last-use time, sorted by name."""
        infos = []
        for _name, raw_id in sorted(self.redis.hgetall(f"{KEY_PREFIX}:names").items()):
            record = self._load(_text(raw_id))
            if record is not None:
                infos.append(self._info(_text(raw_id), record))
        return infos

    def revoke(self, name: str) -> None:
        """Delete the key ``name`` so that every replica rejects it from the next request on."""
        raw_id = self.redis.hget(f"{KEY_PREFIX}:names", name)
        if raw_id is None:
            raise ApiKeyError(
                f"no API key named {name!r}; list keys with `layerbank keys list`",
                field="name",
                value=name,
            )
        pipe = self.redis.pipeline()
        pipe.delete(self._record_key(_text(raw_id)))
        pipe.hdel(f"{KEY_PREFIX}:names", name)
        pipe.delete(f"{KEY_PREFIX}:jobs:{name}")
        pipe.execute()
        logger.info("API key %r revoked", name)

    def verify(self, key: str) -> ApiKeyInfo | None:
        """Return the record of ``key``, or None when it is malformed, unknown or revoked."""
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_MARKER or not parts[1].isalnum():
            return None
        key_id = parts[1]
        record = self._load(key_id)
        if record is None:
            return None
        stored = bytes.fromhex(record["digest"])
        fingerprint = hashlib.sha256(key.encode()).hexdigest()
        with self._lock:
            cached = self._verified.get(fingerprint)
        if cached is None or not hmac.compare_digest(cached, stored):
            if not hmac.compare_digest(_digest(key, bytes.fromhex(record["salt"])), stored):
                return None
            with self._lock:
                if len(self._verified) > 4096:
                    self._verified.clear()
                self._verified[fingerprint] = stored
        return self._info(key_id, record)

    def touch(self, key_id: str) -> None:
        """Record that the key ``key_id`` was just used."""
        self.redis.hset(self._record_key(key_id), "last_used", _now())

    def _load(self, key_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(self._record_key(key_id))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    def _info(self, key_id: str, record: dict[str, str]) -> ApiKeyInfo:
        return ApiKeyInfo(
            name=record["name"],
            scope=record["scope"],
            created=record["created"],
            last_used=record["last_used"] or None,
            key_id=key_id,
        )


# -- endpoint markers ------------------------------------------------------------------------


def public(endpoint: _Endpoint) -> _Endpoint:
    """Mark a route as open to requests without an API key (liveness checks only)."""
    setattr(endpoint, _PUBLIC_ATTR, True)
    return endpoint


def requires_scope(scope: str) -> Callable[[_Endpoint], _Endpoint]:
    """Mark a route as needing ``scope`` instead of the default scope of its HTTP method."""
    check_scope(scope)

    def mark(endpoint: _Endpoint) -> _Endpoint:
        setattr(endpoint, _SCOPE_ATTR, scope)
        return endpoint

    return mark


def is_public(endpoint: object) -> bool:
    """Return whether ``endpoint`` was marked with `public`."""
    return bool(getattr(endpoint, _PUBLIC_ATTR, False))


def required_scope(method: str, endpoint: object) -> str:
    """Return the scope a request with ``method`` to ``endpoint`` needs."""
    return str(getattr(endpoint, _SCOPE_ATTR, None) or SCOPE_BY_METHOD.get(method, "admin"))


# -- the dependency every route gets -----------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_required(settings: Settings, key_store: KeyStore) -> bool:
    """Return whether requests must carry a key under ``settings.auth``.

    ``auto`` requires keys once a key has been created in this Redis (even after every key is
    revoked) or when the API binds to a non-loopback address. ``required`` always does, and
    ``off`` never does.
    """
    if settings.auth == "off":
        return False
    if settings.auth == "required" or not is_loopback(settings.host):
        return True
    return key_store.enabled()


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `layerbank keys create`, sent as `Authorization: Bearer <key>`.",
)


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(
        status_code=401,
        headers={"WWW-Authenticate": challenge},
        detail={"message": message, "field": "Authorization", "value": None},
    )


async def authorize(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKeyInfo | None:
    """Check the request's API key against the scope its route needs (401 or 403).

    Attached to the whole app in `service.app.create_app`, so every route is covered unless it
    is marked `public`. The accepted key is left on ``request.state.api_key`` (None when open).

    Open mode is decided on the event loop (one async Redis call at most). A key is checked in
    a worker thread, because a key not seen before costs one scrypt hash.
    """
    request.state.api_key = None
    endpoint = request.scope.get("endpoint")
    if is_public(endpoint) or settings.auth == "off":
        return None
    key_store: KeyStore = request.app.state.key_store
    required: bool | None = None  # None: `_check_key` decides with a blocking Redis call
    if key_store.async_redis is not None and settings.auth == "auto" and is_loopback(settings.host):
        try:
            required = await key_store.enabled_async()
        except RedisError as exc:
            raise _redis_unavailable(exc) from exc
        if not required:
            return None
    return await run_in_threadpool(_check_key, request, settings, key_store, credentials, required)


# Seconds between two logged tracebacks of a Redis outage; the requests in between are counted.
REDIS_OUTAGE_LOG_INTERVAL = 10.0
_outage_lock = threading.Lock()
_outage_state = {"last": float("-inf"), "suppressed": 0}


def log_redis_outage(context: str, exc: BaseException) -> None:
    """Log a failed Redis call with its traceback, at most once per log interval.

    During an outage every request fails the same way, so the others are only counted and the
    count is reported with the next logged one.
    """
    now = time.monotonic()
    with _outage_lock:
        if now - _outage_state["last"] < REDIS_OUTAGE_LOG_INTERVAL:
            _outage_state["suppressed"] += 1
            return
        suppressed = int(_outage_state["suppressed"])
        _outage_state.update(last=now, suppressed=0)
    logger.error(
        "%s: Redis is unavailable (%d more such failures not logged since the last message)",
        escape_nonprintable(context),
        suppressed,
        exc_info=exc,
    )


# Retry-After of the 503 sent while Redis is unavailable, in seconds.
REDIS_RETRY_AFTER = 5


def _redis_unavailable(exc: BaseException) -> HTTPException:
    log_redis_outage("API key check failed", exc)
    return HTTPException(
        status_code=503,
        headers={"Retry-After": str(REDIS_RETRY_AFTER)},
        detail={
            "message": "Redis is unavailable, so API keys, jobs and results cannot be read; "
            "retry later",
            "field": None,
            "value": None,
        },
    )


def _check_key(
    request: Request,
    settings: Settings,
    key_store: KeyStore,
    credentials: HTTPAuthorizationCredentials | None,
    required: bool | None,
) -> ApiKeyInfo | None:
    endpoint = request.scope.get("endpoint")
    try:
        if not (required or keys_required(settings, key_store)):
            return None
        info = key_store.verify(credentials.credentials) if credentials is not None else None
    except RedisError as exc:
        raise _redis_unavailable(exc) from exc
    if credentials is None:
        scheme = request.headers.get("authorization", "").partition(" ")[0]
        if scheme and scheme.lower() != "bearer":
            raise _unauthorized(
                f"unsupported Authorization scheme {scheme[:20]!r}; send the API key as "
                "`Authorization: Bearer <key>`"
            )
        raise _unauthorized(
            "missing API key; send `Authorization: Bearer <key>` with a key "
            "from `layerbank keys create`"
        )
    if info is None:
        logger.info("%s %s -> 401: invalid API key", request.method, _logged_path(request))
        raise _unauthorized(
            "invalid or revoked API key; ask an admin for a key from `layerbank keys create`",
            error="invalid_token",
        )

    needed = required_scope(request.method, endpoint)
    if not scope_allows(info.scope, needed):
        raise _forbidden(request, info, needed)
    key_store.touch(info.key_id)
    request.state.api_key = info
    return info


def _logged_path(request: Request) -> str:
    return escape_nonprintable(request.url.path)


def _forbidden(
    request: Request, info: ApiKeyInfo, needed: str, reason: str | None = None
) -> HTTPException:
    logger.info(
        "%s %s -> 403: key %r has scope %s, %s needed",
        request.method,
        _logged_path(request),
        info.name,
        info.scope,
        needed,
    )
    because = f" ({reason})" if reason else ""
    return HTTPException(
        status_code=403,
        detail={
            "message": f"this request needs an API key with scope {needed!r}{because}; key "
            f"{info.name!r} has scope {info.scope!r}",
            "field": "scope",
            "value": info.scope,
        },
    )


# -- concurrent jobs per key -------------------------------------------------------------------


@dataclass
class JobQuota:
    """The jobs one API key may still start; routes call `check` before and `record` after."""

    redis: Redis
    store: Store
    key: ApiKeyInfo | None
    limit: int

    @property
    def _set(self) -> str:
        assert self.key is not None
        return f"{KEY_PREFIX}:jobs:{self.key.name}"

    def active_jobs(self) -> int:
        """Return how many jobs started with this key are queued or running."""
        if self.key is None:
            return 0
        active = 0
        for raw in self.redis.smembers(self._set):
            job_id = _text(raw)
            try:
                status = job_state(self.redis, self.store, job_id)["status"]
            except JobNotFoundError:
                status = "gone"
            if status in ("queued", "running"):
                active += 1
            else:
                self.redis.srem(self._set, job_id)
        return active

    def check(self) -> None:
        """Raise `JobQuotaError` if the key already has ``limit`` queued or running jobs."""
        if self.key is None:
            return
        # NOTE: check then record is not atomic, so two replicas racing can each start one job
        # past the limit.
        active = self.active_jobs()
        if active >= self.limit:
            raise JobQuotaError(
                f"API key {self.key.name!r} already has {active} queued or running jobs and the "
                f"limit is {self.limit} (LAYERBANK_MAX_JOBS_PER_KEY); wait for one to finish",
                field="max_jobs_per_key",
                value=self.limit,
            )

    def record(self, job_id: str | None) -> None:
        """Count ``job_id`` against the key until it finishes or fails."""
        if self.key is not None and job_id is not None:
            self.redis.sadd(self._set, job_id)


def get_job_quota(
    request: Request, redis: RedisDep, store: StoreDep, settings: SettingsDep
) -> JobQuota:
    return JobQuota(
        redis, store, getattr(request.state, "api_key", None), settings.max_jobs_per_key
    )


JobQuotaDep = Annotated[JobQuota, Depends(get_job_quota)]


def check_extraction_size(n_layers: int, n_items: int, settings: Settings) -> None:
    """Raise `LimitExceededError` if an extraction has more layers or items than allowed."""
    if n_layers > settings.max_layers_per_extraction:
        raise LimitExceededError(
            f"{n_layers} layers requested but one extraction may store at most "
            f"{settings.max_layers_per_extraction} (LAYERBANK_MAX_LAYERS_PER_EXTRACTION); "
            "request fewer layers",
            field="layers",
            value=n_layers,
        )
    if n_items > settings.max_items_per_extraction:
        raise LimitExceededError(
            f"{n_items} items requested but one extraction may store at most "
            f"{settings.max_items_per_extraction} (LAYERBANK_MAX_ITEMS_PER_EXTRACTION); pass "
            "a smaller limit",
            field="limit",
            value=n_items,
        )


def check_block_count(n_items: int, block_rows: int, settings: Settings) -> None:
    """Raise `LimitExceededError` if ``block_rows`` splits an extraction into too many blocks."""
    n_blocks = -(-n_items // block_rows)
    limit = settings.max_blocks_per_extraction
    if n_blocks > limit:
        raise LimitExceededError(
            f"block_rows {block_rows} splits {n_items} items into {n_blocks} blocks (one rq job "
            f"each), but one extraction may have at most {limit} "
            f"(LAYERBANK_MAX_BLOCKS_PER_EXTRACTION); send block_rows >= "
            f"{-(-n_items // limit)} or leave it out",
            field="block_rows",
            value=block_rows,
        )


# -- ASGI middleware -----------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def _json_message(
    status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[Message, Message]:
    payload = json.dumps(body).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *(headers or []),
        ],
    }
    return start, {"type": "http.response.body", "body": payload}


class BodySizeLimitMiddleware:
    """Reject request bodies over ``max_bytes`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> tuple[Message, Message]:
        return _json_message(
            413,
            {
                "detail": {
                    "message": f"request body is larger than the limit of {self.max_bytes} bytes "
                    "(LAYERBANK_MAX_BODY_BYTES); send a smaller body",
                    "field": "body",
                    "value": self.max_bytes,
                }
            },
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    for message in self._too_large():
                        await send(message)
                    return

        received = 0
        exceeded = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # FastAPI turns an error while reading the body into its own 400, so once the
            # limit is exceeded the app's response is replaced by the 413.
            nonlocal replaced
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start" and not replaced:
                replaced = True
                for too_large in self._too_large():
                    await send(too_large)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not replaced:
            for message in self._too_large():
                await send(message)


class InternalErrorMiddleware:
    """Turn an unhandled exception into a 500 that names a request id and no paths or code.

    The traceback goes to the log under the same request id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except _BodyTooLarge:
            raise
        except Exception:
            request_id = uuid.uuid4().hex[:16]
            logger.exception(
                "request %s: %s %s failed",
                request_id,
                escape_nonprintable(scope.get("method")),
                escape_nonprintable(scope.get("path")),
            )
            if started:
                raise
            body = {
                "detail": {
                    "message": f"internal error, see the server log (request id {request_id})",
                    "field": None,
                    "value": None,
                }
            }
            for message in _json_message(500, body, [(b"x-request-id", request_id.encode())]):
                await send(message)
