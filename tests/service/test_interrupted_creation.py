"""Feature sets whose creation an API process did not finish: the list, the single read, fsck,
DELETE and the repeated POST, on the session's stack, and one API process killed by SIGKILL
while it creates 30 feature sets."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from service.client import Client, ClientError
from service.launcher import free_port, wait_for_http
from store.settings import Settings
from tests.conftest import wait_job


def _extract_finished(client: Client, limit: int) -> str:
    answer = client.extract("pixels", "digits", "test", limit=limit, block_rows=10)
    state = wait_job(client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    return str(answer["featureset_id"])


def _interrupt(settings: Settings, featureset_id: str, keys: list[str], arrays: bool) -> None:
    """Leave only the attributes ``keys`` of the group and, unless ``arrays``, no arrays, as a
    process killed during the creation leaves them."""
    folder = Path(settings.store) / "featuresets" / featureset_id
    metadata_file = folder / "zarr.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["attributes"] = {k: v for k, v in metadata["attributes"].items() if k in keys}
    metadata_file.write_text(json.dumps(metadata))
    if not arrays:
        for child in folder.iterdir():
            if child.is_dir():
                shutil.rmtree(child)


def _error(call: Any) -> ClientError:
    with pytest.raises(ClientError) as raised:
        call()
    return raised.value


def _cli(client: Client, *args: str) -> Any:
    from service.cli import app

    url = str(client._http.base_url).rstrip("/")
    return CliRunner().invoke(app, [*args, "--url", url])


def test_spec_without_block_rows_recovers(client: Client, settings: Settings) -> None:
    featureset_id = _extract_finished(client, 37)
    other_id = _extract_finished(client, 36)
    _interrupt(settings, featureset_id, ["featureset_id", "spec"], arrays=True)

    listed = [item["featureset_id"] for item in client.featuresets()]
    assert featureset_id not in listed
    assert other_id in listed
    listing = _cli(client, "featuresets")
    assert listing.exit_code == 0, listing.output

    read = _error(lambda: client.featureset(featureset_id))
    assert read.status_code == 409
    assert featureset_id in read.detail["message"]
    assert "send the same POST /v1/extractions again" in read.detail["message"]
    assert "KeyError" not in read.detail["message"]
    labels = _error(lambda: client.labels(featureset_id))
    assert labels.status_code == 409

    report = client.fsck(featureset_id)
    assert report["ok"] is False
    assert featureset_id in report["problems"][0]
    assert "send the same POST /v1/extractions again" in report["problems"][0]

    again = client.extract("pixels", "digits", "test", limit=37, block_rows=10)
    assert again["featureset_id"] == featureset_id
    assert again["created"] is True
    assert again["status"] == "queued"
    state = wait_job(client, again["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    summary = client.featureset(featureset_id)
    assert summary["status"] == "complete"
    assert summary["block_rows"] == 10
    assert client.fsck(featureset_id)["ok"] is True
    assert featureset_id in [item["featureset_id"] for item in client.featuresets()]


def test_fsck_repair_deletes_unfinished_set(client: Client, settings: Settings) -> None:
    featureset_id = _extract_finished(client, 38)
    _interrupt(settings, featureset_id, [], arrays=False)

    repaired = client.request("POST", f"/v1/featuresets/{featureset_id}/fsck/repair").json()
    assert f"deleted the folder featuresets/{featureset_id}" in repaired["repaired"]
    assert "send the same POST /v1/extractions again" in repaired["problems"][0]
    assert not (Path(settings.store) / "featuresets" / featureset_id).exists()
    assert _error(lambda: client.featureset(featureset_id)).status_code == 404

    again = client.extract("pixels", "digits", "test", limit=38, block_rows=10)
    assert again["created"] is True
    state = wait_job(client, again["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    assert client.featureset(featureset_id)["status"] == "complete"


def test_delete_removes_unfinished_set(client: Client, settings: Settings) -> None:
    featureset_id = _extract_finished(client, 39)
    _interrupt(settings, featureset_id, ["featureset_id", "spec", "layer_map"], arrays=True)

    response = client.request("DELETE", f"/v1/featuresets/{featureset_id}")
    assert response.status_code == 204
    assert not (Path(settings.store) / "featuresets" / featureset_id).exists()
    assert _error(lambda: client.featureset(featureset_id)).status_code == 404


# The kill comes when this many of the 30 creations have written their last array. On a 2-core
# machine it then finds the other creations at earlier steps, and some of these writing their
# attributes.
ARRAYS_WRITTEN_AT_KILL = 20
# The limits of the 30 extraction requests, one feature set each.
LIMITS = range(30, 60)


def _kill_when_creating(
    process: subprocess.Popen[bytes], featuresets: Path, known: set[str]
) -> None:
    """Kill ``process`` with SIGKILL while it creates feature sets in ``featuresets``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        folders = list(featuresets.iterdir()) if featuresets.is_dir() else []
        written = [
            path
            for path in folders
            if path.name not in known and (path / "blocks_done" / "zarr.json").is_file()
        ]
        if len(written) >= ARRAYS_WRITTEN_AT_KILL:
            break
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)


def test_killed_api_leaves_sets_recoverable(
    client: Client, settings: Settings, stack_env: dict[str, str], tmp_path: Path
) -> None:
    root = Path(settings.store)
    featuresets = root / "featuresets"
    known = {path.name for path in featuresets.iterdir()} if featuresets.is_dir() else set()
    known_partial = set(root.glob("*.partial")) | set(featuresets.glob("*.partial"))
    try:
        _kill_api_mid_creation(stack_env, featuresets, known, tmp_path / "api.log")
        _check_recoverable(client, featuresets, known)
    finally:
        # Temporary files of the store's metadata that the kill left would fail the fsck of
        # every later test once they are a minute old.
        for leftover in set(root.glob("*.partial")) | set(featuresets.glob("*.partial")):
            if leftover not in known_partial:
                leftover.unlink(missing_ok=True)


def _kill_api_mid_creation(
    stack_env: dict[str, str], featuresets: Path, known: set[str], log_path: Path
) -> None:
    """Send 30 extraction requests to a second API process and kill it while it creates the
    feature sets."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.serve"],
            env={**stack_env, "LAYERBANK_HOST": "127.0.0.1", "LAYERBANK_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    second = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{second}/healthz", timeout=120)
        killer = threading.Thread(target=_kill_when_creating, args=(process, featuresets, known))
        killer.start()

        def post(limit: int) -> None:
            body = {"model": "pixels", "dataset": "digits", "split": "all", "limit": limit}
            try:
                httpx.post(f"{second}/v1/extractions", json=body, timeout=60)
            except httpx.HTTPError:
                pass  # the process was killed while it handled the request

        posts = [threading.Thread(target=post, args=(limit,)) for limit in LIMITS]
        for thread in posts:
            thread.start()
        for thread in posts:
            thread.join()
        killer.join()
    finally:
        process.kill()
        process.wait()


def _check_recoverable(client: Client, featuresets: Path, known: set[str]) -> None:
    """Check through the surviving API process every folder the killed one left, then send the
    same requests again and check that every feature set completes."""
    listed = {item["featureset_id"] for item in client.featuresets()}
    left = sorted(path.name for path in featuresets.iterdir() if path.is_dir())
    for featureset_id in set(left) - known:
        response = client._http.get(f"/v1/featuresets/{featureset_id}")
        assert response.status_code in (200, 409), (featureset_id, response.text)
        assert (response.status_code == 200) == (featureset_id in listed), featureset_id
        fsck = client._http.get(f"/v1/featuresets/{featureset_id}/fsck")
        assert fsck.status_code == 200, (featureset_id, fsck.text)

    answers = [client.extract("pixels", "digits", "all", limit=limit) for limit in LIMITS]
    for answer in answers:
        state = wait_job(client, answer["job_id"], timeout=120)
        assert state is None or state["status"] == "finished", state
    listed = {item["featureset_id"] for item in client.featuresets()}
    for answer in answers:
        summary = client.featureset(answer["featureset_id"])
        assert summary["status"] == "complete", summary
        assert answer["featureset_id"] in listed
