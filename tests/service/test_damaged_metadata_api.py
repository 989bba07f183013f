"""The API with a feature set whose zarr.json files are damaged on disk.

The list skips the set with one warning, and reads return 409 naming the set, the file and
fsck. fsck reports the damage, and the repair and DELETE still work."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.client import Client, ClientError
from store.settings import Settings
from tests.conftest import wait_job

DAMAGES = {"not-json": "{not json", "not-metadata": "[]", "missing": None}
KEYS = ("zarr.json", "features/zarr.json", "labels/zarr.json", "blocks_done/zarr.json")


@pytest.fixture(autouse=True)
def _delete_damaged_sets(client: Client) -> Iterator[None]:
    """Delete the sets a test damaged, so that later tests of the session, which list feature
    sets and jobs of the shared store, find none."""
    yield
    for featureset_id in _DAMAGED:
        try:
            client.request("DELETE", f"/v1/featuresets/{featureset_id}")
        except ClientError as exc:
            assert exc.status_code == 404, exc
    _DAMAGED.clear()


_DAMAGED: list[str] = []


def _damaged_set(client: Client, settings: Settings, limit: int, key: str, damage: str) -> str:
    answer = client.extract("pixels", "digits", "test", limit=limit, block_rows=10)
    state = wait_job(client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    featureset_id = str(answer["featureset_id"])
    _DAMAGED.append(featureset_id)
    path = Path(settings.store) / "featuresets" / featureset_id / key
    text = DAMAGES[damage]
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    return featureset_id


def _cases() -> list[tuple[str, str]]:
    # A missing group zarr.json reads as an unfinished creation, which has its own tests.
    return [
        (key, damage)
        for key in KEYS
        for damage in DAMAGES
        if (key, damage) != ("zarr.json", "missing")
    ]


@pytest.mark.parametrize(("key", "damage"), _cases())
def test_damaged_metadata_reads(
    client: Client,
    settings: Settings,
    api_url: str,
    key: str,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = 50 + _cases().index((key, damage))
    featureset_id = _damaged_set(client, settings, limit, key, damage)
    with httpx.Client(base_url=api_url, timeout=60) as http:
        _check_reads(http, featureset_id, key, caplog)


def _check_reads(
    http: httpx.Client, featureset_id: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.routes.featuresets"):
        listed = http.get("/v1/featuresets")
        again = http.get("/v1/featuresets")
    assert listed.status_code == 200, listed.text
    assert again.status_code == 200, again.text
    assert featureset_id not in [item["featureset_id"] for item in listed.json()["data"]]
    warnings = [r for r in caplog.records if featureset_id in r.getMessage()]
    assert len(warnings) == 1
    assert key in warnings[0].getMessage()

    for path in ("", "/layers/0", "/labels"):
        response = http.get(f"/v1/featuresets/{featureset_id}{path}")
        assert response.status_code == 409, (path, response.text)
        detail = response.json()["detail"]
        assert featureset_id in detail["message"]
        assert key in detail["message"]
        assert "layerbank fsck" in detail["message"]
        assert detail["field"] == "featureset_id"

    pairs = http.get("/dashboard/probe-pairs")
    assert pairs.status_code == 200, pairs.text

    report = http.get(f"/v1/featuresets/{featureset_id}/fsck")
    assert report.status_code == 200, report.text
    assert report.json()["ok"] is False
    assert key in report.json()["problems"][0]


def test_damaged_group_repair_then_extract(client: Client, settings: Settings) -> None:
    featureset_id = _damaged_set(client, settings, 70, "zarr.json", "not-json")
    report = client.fsck(featureset_id, repair=True)
    assert report["repaired"] == [f"deleted the folder featuresets/{featureset_id}"]
    again = client.extract("pixels", "digits", "test", limit=70, block_rows=10)
    assert again["featureset_id"] == featureset_id
    assert again["created"] is True
    state = wait_job(client, again["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    assert client.fsck(featureset_id)["ok"] is True


def test_damaged_blocks_done_repair(client: Client, settings: Settings) -> None:
    featureset_id = _damaged_set(client, settings, 71, "blocks_done/zarr.json", "not-json")
    report = client.fsck(featureset_id, repair=True)
    assert "rebuilt blocks_done/zarr.json from the group attributes" in report["repaired"]
    assert client.featureset(featureset_id)["status"] == "complete"
    assert client.fsck(featureset_id)["ok"] is True
    assert client.layer_array(featureset_id, 0).shape[0] == 71


def test_delete_damaged_array_metadata(client: Client, settings: Settings) -> None:
    featureset_id = _damaged_set(client, settings, 72, "features/zarr.json", "not-json")
    response = client.request("DELETE", f"/v1/featuresets/{featureset_id}")
    assert response.status_code == 204
    assert not (Path(settings.store) / "featuresets" / featureset_id).exists()


def test_delete_damaged_group_metadata(client: Client, settings: Settings) -> None:
    featureset_id = _damaged_set(client, settings, 73, "zarr.json", "not-json")
    response = client.request("DELETE", f"/v1/featuresets/{featureset_id}")
    assert response.status_code == 204
    assert not (Path(settings.store) / "featuresets" / featureset_id).exists()


@pytest.mark.parametrize("key", ["zarr.json", "blocks_done/zarr.json"])
def test_damaged_set_leaves_job_list_readable(client: Client, settings: Settings, key: str) -> None:
    """The job list and the job of a damaged set return 200, and the job names the damage."""
    limit = 120 + KEYS.index(key)
    featureset_id = _damaged_set(client, settings, limit, key, "not-json")
    jobs = client.request("GET", "/v1/jobs", params={"limit": 1000}).json()["data"]
    mine = [job for job in jobs if job["target_id"] == featureset_id]
    assert len(mine) == 1
    state = client.request("GET", f"/v1/jobs/{mine[0]['job_id']}").json()
    assert state["status"] == "finished"
    assert state["target_id"] == featureset_id
    assert "damaged metadata" in state["error"]["message"]
    assert state["error"]["field"] == "featureset_id"
