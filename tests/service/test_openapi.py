"""openapi.yaml is generated from the app and must stay in sync with it."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.openapi import openapi_document

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
