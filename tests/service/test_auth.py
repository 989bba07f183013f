"""API keys and scopes: the key store, the route x credential matrix, modes, CLI and logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from redis import Redis
from typer.testing import CliRunner

from service.app import create_app, redis_url_for_display
from service.auth import ApiKeyError, KeyStore
from store.settings import Settings

# Redis databases of the session's private server that only these tests use, so the keys
# created here never switch the session API (database 0) from open mode to keys required.
KEYS_DB = 5
EMPTY_DB = 6

# The scope each route needs; "public" needs no key. A route missing here fails
# test_auth_every_route_has_expected_scope, so a new route cannot ship without a decision.
EXPECTED_SCOPE: dict[tuple[str, str], str] = {
    ("POST", "/v1/extractions"): "write",
    ("GET", "/v1/jobs"): "read",
    ("GET", "/v1/jobs/{job_id}"): "read",
    ("POST", "/v1/jobs/{job_id}/resume"): "write",
    ("POST", "/v1/jobs/{job_id}/cancel"): "write",
    ("GET", "/v1/featuresets"): "read",
    ("GET", "/v1/featuresets/{featureset_id}"): "read",
    ("DELETE", "/v1/featuresets/{featureset_id}"): "admin",
    ("GET", "/v1/featuresets/{featureset_id}/layers/{layer}"): "read",
    ("GET", "/v1/featuresets/{featureset_id}/labels"): "read",
    ("GET", "/v1/featuresets/{featureset_id}/fsck"): "read",
    ("POST", "/v1/featuresets/{featureset_id}/fsck/repair"): "admin",
    ("POST", "/v1/probes"): "write",
    ("GET", "/v1/probes"): "read",
    ("GET", "/v1/probes/{probe_id}"): "read",
    ("GET", "/v1/probes/{probe_id}/curve"): "read",
    ("GET", "/v1/probes/{probe_id}/curve.png"): "read",
    ("GET", "/v1/probes/{probe_id}/confusion.png"): "read",
    ("POST", "/v1/projections"): "write",
    ("GET", "/v1/projections"): "read",
    ("GET", "/v1/projections/{projection_id}"): "read",
    ("GET", "/v1/projections/{projection_id}.png"): "read",
    ("GET", "/v1/projections/{projection_id}/scatter.png"): "read",
    ("GET", "/v1/projections/{projection_id}/coords.npy"): "read",
    ("GET", "/v1/claims/accuracy-vs-loss"): "read",
    ("GET", "/v1/claims/accuracy-vs-loss.png"): "read",
    ("POST", "/v1/pretrain"): "write",
    ("GET", "/v1/models"): "read",
    ("GET", "/metrics"): "read",
    ("GET", "/v1/models/{name}/checkpoints"): "read",
    ("GET", "/v1/datasets"): "read",
    # The dashboard page and its static files hold no data: its script calls the API with the
    # key the user enters. A mount such as /static has no dependencies at all.
    ("GET", "/dashboard"): "public",
    ("GET", "/dashboard/"): "public",
    ("GET", "/"): "public",
    ("GET", "/static"): "public",
    # Which feature sets the dashboard's probe form may pair: derived from stored data.
    ("GET", "/dashboard/probe-pairs"): "read",
    ("GET", "/healthz"): "public",
    # FastAPI's own schema and documentation pages: they show the API, never data.
    ("GET", "/openapi.json"): "public",
    ("GET", "/docs"): "public",
    ("GET", "/docs/oauth2-redirect"): "public",
    ("GET", "/redoc"): "public",
}
CREDENTIALS = ("none", "bad", "read", "write", "admin")
SCOPE_ORDER = ("read", "write", "admin")
ZERO_ID = "0" * 24


def _redis_url(redis_server: Any, db: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def keys_redis(redis_server: Any) -> Iterator[Redis]:
    redis = Redis.from_url(_redis_url(redis_server, KEYS_DB))
    redis.flushdb()
    yield redis
    redis.flushdb()
    redis.close()


@pytest.fixture(scope="module")
def keys(keys_redis: Redis) -> dict[str, str]:
    """One key per scope, plus a well-formed key that was never issued."""
    store = KeyStore(keys_redis)
    issued = {scope: store.create(f"test-{scope}", scope) for scope in SCOPE_ORDER}
    issued["bad"] = "lb_000000000000_" + "x" * 43
    return issued


@pytest.fixture(scope="module")
def auth_app(
    settings: Settings,
    redis_server: Any,
    keys: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> FastAPI:
    return create_app(
        settings.model_copy(
            update={
                "redis_url": _redis_url(redis_server, KEYS_DB),
                "store": str(tmp_path_factory.mktemp("auth-store")),
            }
        )
    )


@pytest.fixture(scope="module")
def auth_client(auth_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(auth_app, raise_server_exceptions=False) as client:
        yield client


def _route_table(app: FastAPI) -> list[tuple[str, str]]:
    """Return (method, path) of every route, included routers and mounts too."""
    table = []
    for context in iter_route_contexts(app.routes):
        # A mount (static files) has no methods and bypasses dependencies: it must be listed.
        methods = context.methods or {"GET"}
        for method in sorted(set(methods) - {"HEAD"}):
            table.append((method, context.path))
    return table


def _concrete(path: str) -> str:
    return (
        path.replace("{layer}", "0")
        .replace("{featureset_id}", ZERO_ID)
        .replace("{job_id}", ZERO_ID)
        .replace("{probe_id}", ZERO_ID)
        .replace("{projection_id}", ZERO_ID)
        .replace("{name}", "no-such-model")
    )


def _headers(credential: str, keys: dict[str, str]) -> dict[str, str]:
    return {} if credential == "none" else {"Authorization": f"Bearer {keys[credential]}"}


def test_auth_every_route_has_expected_scope(auth_app: FastAPI) -> None:
    missing = [entry for entry in _route_table(auth_app) if entry not in EXPECTED_SCOPE]
    assert missing == [], f"routes without an expected scope in EXPECTED_SCOPE: {missing}"


def test_auth_expected_scope_has_no_stale_routes(auth_app: FastAPI) -> None:
    stale = [entry for entry in EXPECTED_SCOPE if entry not in _route_table(auth_app)]
    assert stale == [], f"EXPECTED_SCOPE lists routes the app does not have: {stale}"


def test_auth_matrix(auth_app: FastAPI, auth_client: TestClient, keys: dict[str, str]) -> None:
    wrong = []
    for method, path in _route_table(auth_app):
        needed = EXPECTED_SCOPE.get((method, path))
        if needed is None:
            continue  # reported by test_auth_every_route_has_expected_scope
        for credential in CREDENTIALS:
            body = {} if method == "POST" else None
            response = auth_client.request(
                method, _concrete(path), json=body, headers=_headers(credential, keys)
            )
            if needed == "public":
                ok = response.status_code not in (401, 403)
            elif credential in ("none", "bad"):
                ok = response.status_code == 401 and response.headers.get(
                    "www-authenticate", ""
                ).startswith("Bearer")
            elif SCOPE_ORDER.index(credential) < SCOPE_ORDER.index(needed):
                ok = response.status_code == 403 and repr(needed) in response.text
            else:
                ok = response.status_code not in (401, 403, 500)
            if not ok:
                wrong.append((method, path, credential, response.status_code))
    assert wrong == [], f"(method, path, credential, status) with an unexpected status: {wrong}"


def test_auth_forbidden_message_names_scope(auth_client: TestClient, keys: dict[str, str]) -> None:
    response = auth_client.delete(f"/v1/featuresets/{ZERO_ID}", headers=_headers("write", keys))
    assert response.json()["detail"]["message"].startswith(
        "this request needs an API key with scope 'admin'"
    )


def test_auth_healthz_hides_store_path(auth_client: TestClient, auth_app: FastAPI) -> None:
    response = auth_client.get("/healthz")
    assert auth_app.state.store.root not in response.text


def test_auth_key_stored_hashed(keys_redis: Redis, keys: dict[str, str]) -> None:
    dump = b"".join(
        b"".join(k + v for k, v in keys_redis.hgetall(name).items())
        for name in keys_redis.keys("layerbank:keys:*")
        if keys_redis.type(name) == b"hash"
    )
    assert keys["admin"].encode() not in dump


def test_auth_key_list_has_no_secret(keys_redis: Redis, keys: dict[str, str]) -> None:
    listed = repr(KeyStore(keys_redis).list())
    assert keys["read"] not in listed


def test_auth_key_duplicate_name_rejected(keys_redis: Redis, keys: dict[str, str]) -> None:
    with pytest.raises(ApiKeyError, match="already exists"):
        KeyStore(keys_redis).create("test-read", "read")


def test_auth_key_unknown_scope_rejected(keys_redis: Redis) -> None:
    with pytest.raises(ApiKeyError, match="is not a scope"):
        KeyStore(keys_redis).create("test-owner", "owner")


def test_auth_last_used_recorded(
    auth_client: TestClient, keys_redis: Redis, keys: dict[str, str]
) -> None:
    auth_client.get("/v1/featuresets", headers=_headers("write", keys))
    info = {key.name: key for key in KeyStore(keys_redis).list()}["test-write"]
    assert info.last_used is not None


def test_auth_revoked_key_rejected(auth_client: TestClient, keys_redis: Redis) -> None:
    store = KeyStore(keys_redis)
    key = store.create("test-revoked", "admin")
    before = auth_client.get("/v1/featuresets", headers={"Authorization": f"Bearer {key}"})
    store.revoke("test-revoked")
    after = auth_client.get("/v1/featuresets", headers={"Authorization": f"Bearer {key}"})
    assert before.status_code == 200
    assert after.status_code == 401


def test_auth_auto_revoking_last_key_keeps_checks(
    settings: Settings, empty_redis_url: str, tmp_path: Path
) -> None:
    key_store = KeyStore(Redis.from_url(empty_redis_url))
    key = key_store.create("only", "read")
    key_store.revoke("only")
    app = create_app(
        settings.model_copy(
            update={"store": str(tmp_path / "store"), "redis_url": empty_redis_url, "auth": "auto"}
        )
    )
    with TestClient(app) as client:
        with_old_key = client.get("/v1/featuresets", headers={"Authorization": f"Bearer {key}"})
        without_key = client.get("/v1/featuresets")
    assert key_store.count() == 0
    assert with_old_key.status_code == 401
    assert without_key.status_code == 401


def test_auth_keys_stay_required_after_redis_data_loss(
    settings: Settings, empty_redis_url: str, tmp_path: Path
) -> None:
    redis = Redis.from_url(empty_redis_url)
    key = KeyStore(redis).create("before-loss", "read")
    app = create_app(
        settings.model_copy(
            update={"store": str(tmp_path / "store"), "redis_url": empty_redis_url, "auth": "auto"}
        )
    )
    with TestClient(app) as client:
        keyed = client.get("/v1/featuresets", headers={"Authorization": f"Bearer {key}"})
        redis.flushdb()
        after_loss = client.get("/v1/featuresets")
    assert keyed.status_code == 200
    assert after_loss.status_code == 401


@pytest.mark.parametrize("auth", ["off", "auto"])
def test_redis_down_is_503_with_retry_after(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, auth: str
) -> None:
    """With keys on, the key check reads Redis first, so its 503 also carries Retry-After."""
    from service.launcher import free_port

    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        settings.model_copy(
            update={"store": str(tmp_path / "store"), "redis_url": unreachable, "auth": auth}
        )
    )
    with TestClient(app) as client, caplog.at_level("ERROR"):
        responses = [client.get(f"/v1/jobs/{'a' * 24}") for _ in range(3)]
    assert [response.status_code for response in responses] == [503, 503, 503]
    assert "Redis is unavailable" in responses[0].json()["detail"]["message"]
    assert responses[0].headers["Retry-After"] == "5"
    # One traceback for the outage; the other failures are counted, not logged.
    assert len([r for r in caplog.records if "Redis is unavailable" in r.getMessage()]) <= 1


def test_auth_bearer_without_key_is_missing(auth_client: TestClient) -> None:
    response = auth_client.get("/v1/featuresets", headers={"Authorization": "Bearer"})
    assert response.status_code == 401
    assert response.json()["detail"]["message"].startswith("missing API key")


def test_auth_non_bearer_scheme_rejected(auth_client: TestClient, keys: dict[str, str]) -> None:
    response = auth_client.get(
        "/v1/featuresets", headers={"Authorization": f"Basic {keys['admin']}"}
    )
    assert response.status_code == 401
    assert "unsupported Authorization scheme 'Basic'" in response.json()["detail"]["message"]


# -- modes --------------------------------------------------------------------------------------


@pytest.fixture()
def empty_redis_url(redis_server: Any) -> Iterator[str]:
    url = _redis_url(redis_server, EMPTY_DB)
    redis = Redis.from_url(url)
    redis.flushdb()
    yield url
    redis.flushdb()
    redis.close()


def _status_without_key(settings: Settings, tmp_path: Path, **update: Any) -> int:
    app = create_app(settings.model_copy(update={"store": str(tmp_path / "store"), **update}))
    with TestClient(app) as client:
        return client.get("/v1/featuresets").status_code


def test_auth_auto_open_without_keys(
    settings: Settings, empty_redis_url: str, tmp_path: Path
) -> None:
    status = _status_without_key(settings, tmp_path, redis_url=empty_redis_url, auth="auto")
    assert status == 200


def test_auth_auto_requires_key_once_one_exists(
    settings: Settings, empty_redis_url: str, tmp_path: Path
) -> None:
    KeyStore(Redis.from_url(empty_redis_url)).create("first", "read")
    status = _status_without_key(settings, tmp_path, redis_url=empty_redis_url, auth="auto")
    assert status == 401


def test_auth_auto_key_created_while_serving(
    settings: Settings, empty_redis_url: str, tmp_path: Path
) -> None:
    app = create_app(
        settings.model_copy(
            update={"store": str(tmp_path / "store"), "redis_url": empty_redis_url, "auth": "auto"}
        )
    )
    with TestClient(app) as client:
        assert client.get("/v1/featuresets").status_code == 200
        KeyStore(Redis.from_url(empty_redis_url)).create("late", "read")
        assert client.get("/v1/featuresets").status_code == 401


def test_auth_auto_redis_down_is_503(settings: Settings, tmp_path: Path) -> None:
    from service.launcher import free_port

    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        settings.model_copy(
            update={"store": str(tmp_path / "store"), "redis_url": unreachable, "auth": "auto"}
        )
    )
    with TestClient(app) as client:
        response = client.get("/v1/featuresets")
    assert response.status_code == 503
    assert "Redis is unavailable" in response.json()["detail"]["message"]


def test_auth_auto_non_loopback_requires_key(
    settings: Settings, empty_redis_url: str, tmp_path: Path
) -> None:
    status = _status_without_key(
        settings, tmp_path, redis_url=empty_redis_url, auth="auto", host="0.0.0.0"
    )
    assert status == 401


def test_auth_required_without_keys(
    settings: Settings, empty_redis_url: str, tmp_path: Path
) -> None:
    status = _status_without_key(settings, tmp_path, redis_url=empty_redis_url, auth="required")
    assert status == 401


def test_auth_off_ignores_keys(
    settings: Settings, redis_server: Any, keys: dict[str, str], tmp_path: Path
) -> None:
    status = _status_without_key(
        settings, tmp_path, redis_url=_redis_url(redis_server, KEYS_DB), auth="off"
    )
    assert status == 200


def test_auth_open_mode_warns_at_startup(
    settings: Settings, empty_redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.app")
    _status_without_key(settings, tmp_path, redis_url=empty_redis_url, auth="auto")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("API keys are NOT checked" in r.getMessage() for r in warnings)
    # The hint names this API's Redis: `layerbank keys` alone would use 127.0.0.1:6379.
    assert any(
        f"REDIS_URL={empty_redis_url} layerbank keys create" in r.getMessage() for r in warnings
    )


def test_redis_url_for_display_hides_password() -> None:
    assert redis_url_for_display("redis://:secret@db.internal:6380/2") == (
        "redis://:***@db.internal:6380/2"
    )
    assert redis_url_for_display("redis://user:secret@h/0") == "redis://user:***@h/0"
    assert redis_url_for_display("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- secrets and errors -------------------------------------------------------------------------


def test_auth_key_never_logged(
    settings: Settings, empty_redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = KeyStore(Redis.from_url(empty_redis_url)).create("logged", "read")
    app = create_app(
        settings.model_copy(update={"store": str(tmp_path / "store"), "redis_url": empty_redis_url})
    )
    with TestClient(app) as client:
        client.get("/v1/featuresets", headers={"Authorization": f"Bearer {key}"})
        client.delete(f"/v1/featuresets/{ZERO_ID}", headers={"Authorization": f"Bearer {key}"})
        client.get("/v1/featuresets", headers={"Authorization": f"Bearer {key}x"})
    assert key not in caplog.text


def test_auth_internal_error_hides_traceback(
    settings: Settings, empty_redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(
        settings.model_copy(update={"store": str(tmp_path / "store"), "redis_url": empty_redis_url})
    )

    def explode() -> None:
        raise RuntimeError(f"broken file {tmp_path}/secret.bin")

    app.add_api_route("/v1/explode", explode)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/explode")
    request_id = response.headers["x-request-id"]
    assert response.status_code == 500
    assert response.json()["detail"]["message"] == (
        f"internal error, see the server log (request id {request_id})"
    )
    assert "Traceback" in caplog.text
    assert request_id in caplog.text


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_keys_create_list_revoke(empty_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import app as cli

    monkeypatch.setenv("REDIS_URL", empty_redis_url)
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--scope", "write", "--name", "ci-bot"])
    key = created.stdout.strip().splitlines()[-1].strip()
    listed = runner.invoke(cli, ["keys", "list"])
    revoked = runner.invoke(cli, ["keys", "revoke", "ci-bot"])
    after = runner.invoke(cli, ["keys", "list"])
    assert created.exit_code == 0
    assert key.startswith("lb_")
    assert "ci-bot" in listed.stdout
    assert "write" in listed.stdout
    assert key not in listed.stdout
    assert revoked.exit_code == 0
    assert "no API keys remain" in revoked.stdout
    assert "ci-bot" not in after.stdout


def test_cli_keys_revoke_unknown_fails(
    empty_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import app as cli

    monkeypatch.setenv("REDIS_URL", empty_redis_url)
    result = CliRunner().invoke(cli, ["keys", "revoke", "nobody"])
    assert result.exit_code == 1


def test_cli_up_non_loopback_without_keys_refused(
    empty_redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.cli import app as cli

    monkeypatch.setenv("REDIS_URL", empty_redis_url)
    result = CliRunner().invoke(
        cli,
        [
            "up",
            "--host",
            "0.0.0.0",
            "--port",
            "1",
            "--workers",
            "0",
            "--store",
            str(tmp_path / "store"),
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: refusing to bind to 0.0.0.0")
    assert len(result.output.strip().splitlines()) == 1


def test_demo_sends_api_key(
    settings: Settings, redis_server: Any, keys: dict[str, str], tmp_path: Path
) -> None:
    """The demo sends its --api-key: a read key reaches the scope check (403), not 401."""
    import threading

    import uvicorn

    from service.cli import app as cli
    from service.launcher import free_port, wait_for_http

    # An app of its own: the module's app is in use by the TestClient of the other tests.
    keyed = create_app(
        settings.model_copy(
            update={
                "redis_url": _redis_url(redis_server, KEYS_DB),
                "store": str(tmp_path / "store"),
            }
        )
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(keyed, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz")
        result = CliRunner().invoke(
            cli,
            ["demo", "--url", url, "--output", str(tmp_path / "out"), "--api-key", keys["read"]],
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert result.exit_code == 1, result.output
    assert "error: demo failed: HTTP 403" in result.stderr
    assert "write" in result.stderr


@pytest.mark.parametrize(("credential", "status"), [("read", 403), ("write", 403), ("admin", 404)])
def test_auth_fsck_repair_needs_admin(
    auth_client: TestClient, keys: dict[str, str], credential: str, status: int
) -> None:
    """A repair can delete a feature set's folder, so it needs the scope of DELETE, while the
    check alone needs read."""
    path = f"/v1/featuresets/{ZERO_ID}/fsck"

    check = auth_client.get(path, headers=_headers(credential, keys))
    repair = auth_client.post(f"{path}/repair", headers=_headers(credential, keys))

    assert check.status_code == 404
    assert repair.status_code == status, repair.text
    if status == 403:
        detail = repair.json()["detail"]
        assert detail["message"].startswith("this request needs an API key with scope 'admin'")
