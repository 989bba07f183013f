"""Faults beyond a killed worker: damaged files, a full disk, replicas racing, readers racing
writers, and bitwise-identical output after a kill -9.

Tests that kill workers or fill the disk run on a private stack (redis-server, API, workers) whose
store root is a size-limited tmpfs when this process may mount one. The other tests use the
session's stack.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from rq.job import Job
from rq.registry import FinishedJobRegistry

from service.client import Client, ClientError
from service.launcher import RedisServer, free_port, stop_process
from store import Store
from store.settings import Settings
from tests.conftest import wait_job
from tests.service.test_reliability import Stack, _freeze_worker_mid_block, _rq_jobs, _serve

QUEUE = "layerbank-faults"
HEARTBEAT_INTERVAL = 2.0
TMPFS_SIZE = "4m"


@pytest.fixture(scope="module")
def faults(
    tmp_path_factory: pytest.TempPathFactory, stack_dirs: dict[str, Path], tiny_model: Path
) -> Iterator[tuple[Stack, bool]]:
    """A private stack, and whether its store root is a tmpfs of ``TMPFS_SIZE``."""
    root = tmp_path_factory.mktemp("faults")
    store_root = root / "store"
    store_root.mkdir()
    mounted = _mount_tmpfs(store_root, TMPFS_SIZE)
    redis = RedisServer(free_port(), root / "redis", prefer="path").start()
    env = {
        "LAYERBANK_STORE": str(store_root),
        "REDIS_URL": redis.url,
        "LAYERBANK_DEVICE": "cpu",
        "LAYERBANK_MODEL_ROOTS": str(stack_dirs["models"]),
        "LAYERBANK_DATA_ROOTS": str(stack_dirs["data"]),
        "LAYERBANK_QUEUE": QUEUE,
        "LAYERBANK_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    settings = Settings(
        store=str(store_root),
        redis_url=redis.url,
        device="cpu",
        model_roots=[stack_dirs["models"]],
        data_roots=[stack_dirs["data"]],
        queue=QUEUE,
    )
    url, server, thread = _serve(settings)
    logs = root / "logs"
    logs.mkdir()
    with Client(url, timeout=60) as client:
        current = Stack(redis, env, settings, url, logs, client)
        for index in range(2):
            current.start_worker(f"faults-{index}")
        try:
            yield current, mounted
        finally:
            current.signal_workers(signal.SIGCONT)
            current.signal_workers(signal.SIGTERM)
            for process in current.workers.values():
                stop_process(process)
            server.should_exit = True
            thread.join(timeout=10)
            redis.stop()
            if mounted:
                subprocess.run(["umount", str(store_root)], check=True)


def _mount_tmpfs(directory: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
    )
    return result.returncode == 0


def _resume(client: Client, job_id: str) -> dict[str, Any]:
    return client.request("POST", f"/v1/jobs/{job_id}/resume").json()  # type: ignore[no-any-return]


def _raw(root: str, featureset_id: str, name: str) -> bytes:
    array = zarr.open_array(root, path=f"featuresets/{featureset_id}/{name}", mode="r")
    return np.ascontiguousarray(array[:]).tobytes()


def test_fsck_repair_resume_rewrites_block(client: Client, settings: Settings) -> None:
    answer = client.extract("pixels", "digits", "test", limit=60, block_rows=20)
    state = wait_job(client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    featureset_id = answer["featureset_id"]
    before = client.layer_array(featureset_id, 0)
    shard = Path(settings.store) / "featuresets" / featureset_id / "features" / "c/0/1/0"
    shard.write_bytes(shard.read_bytes()[:64])

    found = client.fsck(featureset_id)
    assert found["ok"] is False
    assert found["corrupt_blocks"] == [1]
    repaired = client.request("POST", f"/v1/featuresets/{featureset_id}/fsck/repair").json()
    assert repaired["missing_blocks"] == [1]
    # The report gives the stored status after its own repair. The set's summary reports the
    # job, which the repair left failed, and how to resume it.
    assert repaired["status"] == "pending"
    assert client.job(answer["job_id"])["status"] == "failed"
    summary = client.featureset(featureset_id)
    assert summary["status"] == "failed"
    assert f"/v1/jobs/{answer['job_id']}/resume" in summary["hint"]
    # Only complete sets are served, labels as well as layers.
    for part in ("labels", "layers/0"):
        with pytest.raises(ClientError) as refused:
            client.request("GET", f"/v1/featuresets/{featureset_id}/{part}")
        assert refused.value.status_code == 409, part
        assert "not complete yet" in refused.value.detail["message"]

    # Two resumes at once queue the missing block once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda _: _resume(client, answer["job_id"]), range(2)))
    # One block and the finalize job.
    assert len(_job_rq_ids(settings, answer["job_id"])) == 1 + 1
    state = wait_job(client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    assert client.fsck(featureset_id)["ok"] is True
    np.testing.assert_array_equal(client.layer_array(featureset_id, 0), before)


def _job_rq_ids(settings: Settings, job_id: str) -> list[str]:
    from redis import Redis

    from service.jobs import load_job

    return list(load_job(Redis.from_url(settings.redis_url), job_id)["rq_ids"])


def test_fsck_cli_exit_code_follows_report(client: Client, settings: Settings) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    answer = client.extract("pixels", "digits", "test", limit=40, block_rows=20)
    wait_job(client, answer["job_id"], timeout=60)
    runner = CliRunner()
    url = str(client._http.base_url).rstrip("/")
    clean = runner.invoke(app, ["fsck", answer["featureset_id"], "--url", url, "--json"])
    assert clean.exit_code == 0, clean.output
    leftover = Path(settings.store) / "featuresets" / answer["featureset_id"] / "x.1.partial"
    leftover.write_bytes(b"x")
    try:
        damaged = runner.invoke(app, ["fsck", answer["featureset_id"], "--url", url])
        # The repair reports what it found, so its exit code is 1 too, and deletes the file.
        repaired = runner.invoke(
            app, ["fsck", answer["featureset_id"], "--url", url, "--repair", "--json"]
        )
    finally:
        leftover.unlink(missing_ok=True)
    assert damaged.exit_code == 1
    assert repaired.exit_code == 1, repaired.output
    assert json.loads(repaired.output)["repaired"] == ["deleted x.1.partial"]
    assert not leftover.exists()
    again = runner.invoke(app, ["fsck", answer["featureset_id"], "--url", url])
    assert again.exit_code == 0, again.output


def test_reader_sees_409_then_complete_rows(client: Client, tiny_model: Path) -> None:
    done = client.extract("pixels", "digits", "test", limit=40, block_rows=20)
    wait_job(client, done["job_id"], timeout=60)
    reference = client.layer_array(done["featureset_id"], 0)
    # Thirty-two blocks of one image per forward pass, so the set is still being written when
    # the first read comes, even on a busy machine.
    answer = client.extract(
        str(tiny_model), "digits", "train", limit=640, block_rows=20, batch_size=1, layers=[0, 2]
    )
    featureset_id = answer["featureset_id"]
    rejected = 0
    while True:
        # A complete feature set reads the same while another one is written.
        np.testing.assert_array_equal(client.layer_array(done["featureset_id"], 0), reference)
        try:
            rows = client.layer_array(featureset_id, 2)
        except ClientError as exc:
            assert exc.status_code == 409
            assert "progress" in exc.detail
            rejected += 1
            if rejected == 1:
                with pytest.raises(ClientError) as probe:
                    client.probe(featureset_id, featureset_id, kind="knn")
                assert probe.value.status_code == 409
                assert probe.value.detail["progress"]["blocks_total"] == 32
            continue
        break
    assert rejected >= 1
    assert rows.shape == (640, 32)
    assert np.isfinite(rows).all()


def test_killed_worker_output_bitwise_identical(
    faults: tuple[Stack, bool], client: Client, settings: Settings, tiny_model: Path
) -> None:
    stack, _ = faults
    # Twenty blocks, one image per forward pass: the tiny model writes a block in a fraction of
    # a second, and six blocks could all finish before a busy machine's poll caught one.
    options = {"layers": "all", "limit": 1000, "block_rows": 50, "batch_size": 1}
    interrupted = stack.client.extract(str(tiny_model), "digits", "train", **options)
    killed, _, _ = _freeze_worker_mid_block(
        stack, interrupted["job_id"], interrupted["featureset_id"]
    )
    os.kill(stack.workers[killed].pid, signal.SIGKILL)
    stack.workers.pop(killed).wait(timeout=10)
    reference = client.extract(str(tiny_model), "digits", "train", **options)
    state = wait_job(stack.client, interrupted["job_id"], timeout=120)
    stack.start_worker(f"{killed}-replacement")
    assert state is not None and state["status"] == "finished", state
    reference_state = wait_job(client, reference["job_id"], timeout=120)
    assert reference_state is not None and reference_state["status"] == "finished"

    featureset_id = interrupted["featureset_id"]
    assert reference["featureset_id"] == featureset_id
    for name in ("features", "labels", "item_ids", "blocks_done"):
        assert _raw(stack.settings.store, featureset_id, name) == _raw(
            settings.store, featureset_id, name
        ), name
    assert stack.client.fsck(featureset_id)["ok"] is True


def test_replicas_one_extraction_for_20_requests(faults: tuple[Stack, bool]) -> None:
    stack, _ = faults
    url, server, thread = _serve(stack.settings)
    stack.start_worker("faults-third")
    urls = [stack.api_url, url]

    def submit(index: int) -> dict[str, Any]:
        with Client(urls[index % 2], timeout=60) as replica:
            return replica.extract("pixels", "digits", "train", limit=160, block_rows=40)

    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(submit, range(20)))
        state = wait_job(stack.client, answers[0]["job_id"], timeout=60)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    featureset_id = answers[0]["featureset_id"]
    assert {answer["featureset_id"] for answer in answers} == {featureset_id}
    assert {answer["job_id"] for answer in answers} == {answers[0]["job_id"]}
    assert sum(answer["created"] for answer in answers) == 1
    assert state is not None and state["status"] == "finished", state
    connection = stack.connection()
    finished = FinishedJobRegistry(QUEUE, connection=connection).get_job_ids()
    ran = [
        job
        for job in Job.fetch_many(finished, connection=connection)
        if job is not None and job.args and job.args[0] == featureset_id
    ]
    # Four blocks and one finalize job ran, each once.
    assert len(ran) == 4 + 1
    assert len(_rq_jobs(stack, answers[0]["job_id"])) == 4 + 1


def test_disk_full_fails_cleanly_then_resumes(faults: tuple[Stack, bool]) -> None:
    stack, mounted = faults
    if not mounted:
        pytest.skip("mounting a tmpfs needs root and a permitted mount(8); disk full not tested")
    store_root = Path(stack.settings.store)
    # Leave about 300 KiB: the group and two of the eight 150 KiB blocks fit.
    free = os.statvfs(store_root).f_bavail * os.statvfs(store_root).f_frsize
    filler = store_root / "filler"
    filler.write_bytes(b"\x00" * max(0, free - 300 * 1024))
    try:
        answer = stack.client.extract("pixels", "digits", "train", limit=800, block_rows=100)
        state = wait_job(stack.client, answer["job_id"], timeout=90)
        report = stack.client.fsck(answer["featureset_id"])
    finally:
        filler.unlink()
    assert state is not None
    assert state["status"] == "failed"
    assert "no space left" in state["error"]["message"]
    assert state["error"]["field"] == "store"
    assert report["ok"] is True, report["problems"]
    assert report["missing_blocks"] != []

    subprocess.run(["mount", "-o", "remount,size=16m", str(store_root)], check=True)
    _resume(stack.client, answer["job_id"])
    resumed = wait_job(stack.client, answer["job_id"], timeout=90)
    assert resumed is not None and resumed["status"] == "finished", resumed
    assert stack.client.fsck(answer["featureset_id"])["ok"] is True
    assert np.isfinite(stack.client.layer_array(answer["featureset_id"], 0)).all()
    assert Store(stack.settings.store).featureset(answer["featureset_id"]).is_complete
