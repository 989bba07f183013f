"""openapi.yaml is generated from the app and must stay in sync with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import ErrorResponse
from service.openapi import openapi_document
from store.settings import Settings

SPEC = Path(__file__).resolve().parents[2] / "openapi.yaml"


def test_openapi_yaml_matches_app() -> None:
    committed = yaml.safe_load(SPEC.read_text())
    assert committed == openapi_document(), "openapi.yaml is stale: run `make openapi`"


def test_openapi_lists_main_routes() -> None:
    paths = openapi_document()["paths"]
    for path in (
        "/v1/extractions",
        "/v1/jobs/{job_id}",
        "/v1/featuresets/{featureset_id}",
        "/v1/featuresets/{featureset_id}/layers/{layer}",
        "/v1/probes",
        "/v1/probes/{probe_id}/curve.png",
        "/v1/pretrain",
        "/healthz",
    ):
        assert path in paths


def test_openapi_public_routes_need_no_key() -> None:
    """Routes that take no key declare no security and no 401 or 403."""
    operation = openapi_document()["paths"]["/healthz"]["get"]
    assert operation["security"] == []
    assert "401" not in operation["responses"]
    assert "403" not in operation["responses"]


def test_openapi_keyed_routes_declare_security() -> None:
    operation = openapi_document()["paths"]["/v1/extractions"]["post"]
    assert operation.get("security", [{"HTTPBearer": []}]) != []
    assert "401" in operation["responses"]


def test_openapi_ids_have_their_pattern() -> None:
    """Every id in a path or query is 24 lowercase hex digits, as the API checks."""
    seen = 0
    for path, item in openapi_document()["paths"].items():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                name, schema = parameter["name"], parameter["schema"]
                if name.endswith("_id") or name == "before":
                    options = schema.get("anyOf", [schema])
                    patterns = [o.get("pattern") for o in options if o.get("type") == "string"]
                    assert patterns == ["^[0-9a-f]{24}$"], (path, name)
                    seen += 1
                if name == "probe":
                    assert schema["items"]["pattern"] == "^[0-9a-f]{24}$", path
                    seen += 1
                if name == "name":
                    assert schema["pattern"].startswith("^[A-Za-z0-9]"), path
    assert seen >= 13


def test_openapi_body_ids_have_their_pattern() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for model, field in (
        ("ProbeCreate", "train_featureset"),
        ("ProbeCreate", "test_featureset"),
        ("ProjectionCreate", "featureset"),
    ):
        assert schemas[model]["properties"][field]["pattern"] == "^[0-9a-f]{24}$", field


def test_openapi_lists_metrics() -> None:
    operation = openapi_document()["paths"]["/metrics"]["get"]
    assert "text/plain" in operation["responses"]["200"]["content"]


def test_openapi_method_not_allowed_component() -> None:
    document = openapi_document()
    response = document["components"]["responses"]["MethodNotAllowed"]
    assert "Allow" in response["headers"]
    schema = response["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "#/components/responses/MethodNotAllowed" in document["info"]["description"]


def test_openapi_operations_omit_405() -> None:
    """An operation is a path and a method that the path takes, so none of them returns 405."""
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            assert "405" not in operation["responses"], (path, method)


def test_openapi_405_matches_served_response(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    store = str(tmp_path_factory.mktemp("store"))
    with TestClient(create_app(settings.model_copy(update={"store": store}))) as http:
        served = http.get("/openapi.json").json()
        response = http.put("/v1/extractions", json={})
    component = served["components"]["responses"]["MethodNotAllowed"]
    assert component == openapi_document()["components"]["responses"]["MethodNotAllowed"]
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.headers["content-type"] == "application/json"
    body = ErrorResponse.model_validate(response.json())
    assert body.detail.message == "PUT is not allowed on /v1/extractions; use POST"
