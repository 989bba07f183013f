"""`layerbank featuresets ID` of a feature set whose job failed shows the job, its error and
the hint that GET /v1/featuresets/{id} returns, in the table and in --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.client import Client
from store.settings import Settings
from tests.conftest import wait_job


@pytest.fixture(scope="module")
def failed_set(client: Client, settings: Settings) -> dict[str, Any]:
    """A complete set with one shard truncated and then repaired, so its job reads as failed
    with blocks missing and a hint to resume it."""
    answer = client.extract("pixels", "digits", "test", limit=64, block_rows=16)
    state = wait_job(client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    featureset_id = answer["featureset_id"]
    shard = Path(settings.store) / "featuresets" / featureset_id / "features" / "c/0/1/0"
    shard.write_bytes(shard.read_bytes()[:64])
    client.fsck(featureset_id, repair=True)
    summary = client.featureset(featureset_id)
    assert summary["status"] == "failed"
    assert summary["error"] is not None
    assert summary["hint"]
    return summary


def _cli(client: Client, *args: str) -> Any:
    url = str(client._http.base_url).rstrip("/")
    return CliRunner().invoke(app, [*args, "--url", url], terminal_width=400)


def _squeezed(text: str) -> str:
    return "".join(text.replace("│", "").split())


def test_table_shows_job_error_hint(client: Client, failed_set: dict[str, Any]) -> None:
    result = _cli(client, "featuresets", failed_set["featureset_id"])
    assert result.exit_code == 0, result.output
    # Rich folds long values over several rows of the table, so the text is compared without
    # whitespace and without the table's vertical borders.
    text = _squeezed(result.output)
    assert failed_set["job_id"] in text
    assert _squeezed(failed_set["error"]["message"]) in text
    assert _squeezed(failed_set["hint"]) in text


def test_json_carries_job_error_hint(client: Client, failed_set: dict[str, Any]) -> None:
    result = _cli(client, "featuresets", failed_set["featureset_id"], "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["job_id"] == failed_set["job_id"]
    assert body["error"] == failed_set["error"]
    assert body["hint"] == failed_set["hint"]
