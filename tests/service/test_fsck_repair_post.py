"""The fsck repair is a POST: HEAD and GET of the check never delete anything, and a GET with
the old ``repair`` query parameter is rejected with the route to use instead."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.client import Client
from store.settings import Settings
from tests.conftest import wait_job


def _unfinished_set(client: Client, settings: Settings, limit: int) -> Path:
    """Extract a small set, then strip its creation attributes, as a killed creation leaves
    them, so that a repair would delete its folder."""
    answer = client.extract("pixels", "digits", "test", limit=limit, block_rows=10)
    state = wait_job(client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    folder = Path(settings.store) / "featuresets" / answer["featureset_id"]
    metadata_file = folder / "zarr.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["attributes"] = {}
    metadata_file.write_text(json.dumps(metadata))
    return folder


def _raw(client: Client) -> httpx.Client:
    return client._http


@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest.mark.parametrize("value", ["true", "false", "1"])
def test_read_with_repair_rejected(
    client: Client, settings: Settings, method: str, value: str
) -> None:
    folder = _unfinished_set(client, settings, 41)
    featureset_id = folder.name
    response = _raw(client).request(
        method, f"/v1/featuresets/{featureset_id}/fsck", params={"repair": value}
    )
    assert response.status_code == 422
    assert folder.exists()
    assert (folder / "features").exists()
    if method == "GET":
        detail = response.json()["detail"]
        assert detail["field"] == "repair"
        assert f"POST /v1/featuresets/{featureset_id}/fsck/repair" in detail["message"]


def test_head_and_get_check_do_not_repair(client: Client, settings: Settings) -> None:
    folder = _unfinished_set(client, settings, 42)
    path = f"/v1/featuresets/{folder.name}/fsck"
    head = _raw(client).head(path)
    get = _raw(client).get(path)
    assert head.status_code == 200
    assert get.status_code == 200
    assert get.json()["repaired"] == []
    assert folder.exists()


def test_post_repair_deletes_unfinished_set(client: Client, settings: Settings) -> None:
    folder = _unfinished_set(client, settings, 43)
    response = _raw(client).post(f"/v1/featuresets/{folder.name}/fsck/repair")
    assert response.status_code == 200, response.text
    report = response.json()
    assert f"deleted the folder featuresets/{folder.name}" in report["repaired"]
    assert not folder.exists()


def test_client_fsck_repair_sends_post(client: Client, settings: Settings) -> None:
    folder = _unfinished_set(client, settings, 44)
    report = client.fsck(folder.name, repair=True)
    assert f"deleted the folder featuresets/{folder.name}" in report["repaired"]
    assert not folder.exists()


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_repair_route_takes_post_only(client: Client, settings: Settings, method: str) -> None:
    folder = _unfinished_set(client, settings, 45)
    response = _raw(client).request(method, f"/v1/featuresets/{folder.name}/fsck/repair")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert folder.exists()
