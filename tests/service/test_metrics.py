"""``GET /metrics``: scraped from the live API after real extraction and probe jobs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue

from service.app import create_app
from service.launcher import free_port
from service.metrics import METRICS_KEY
from store.settings import Settings
from tests.conftest import wait_job

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

LATENCY = "layerbank_http_request_duration_seconds"


def parse(text: str) -> Samples:
    """Return every sample of a scrape keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape(client: Any) -> Samples:
    response = client.request("GET", "/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_queue_idle(settings: Settings, timeout: float = 120.0) -> None:
    """Wait until the session's queue has no queued or running rq job, so that the counters
    move only with this module's jobs.

    After ``timeout`` it returns anyway: the started registry can keep a job whose worker was
    killed until rq's cleanup, and such a job fits nothing.
    """
    queue = Queue(settings.queue, connection=Redis.from_url(settings.redis_url))
    deadline = time.monotonic() + timeout
    while (queue.count or queue.started_job_registry.count) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scrapes(client: Any, tiny_model: Path, settings: Settings) -> dict[str, Any]:
    """Scrapes taken before and after one extraction (4 blocks) and one probe job."""
    options: dict[str, Any] = {"layers": [0, 2], "pooling": "mean", "block_rows": 128}
    train = client.extract(str(tiny_model), "digits", "train", limit=200, **options)
    wait_job(client, train["job_id"])
    wait_queue_idle(settings)
    before = scrape(client)
    # A spec no other test requests, so the extraction runs instead of returning a stored set.
    answer = client.extract(str(tiny_model), "digits", "test", batch_size=128, **options)
    assert answer["created"] is True, answer
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    featureset_id = answer["featureset_id"]
    probe = client.probe(
        train["featureset_id"], featureset_id, kind="logistic", params={"C": [1.0]}
    )
    state = wait_job(client, probe["job_id"])
    assert state is not None and state["status"] == "finished", state
    return {
        "before": before,
        "after": scrape(client),
        "job_id": answer["job_id"],
        "featureset_id": featureset_id,
    }


def test_metrics_counts_blocks_written(scrapes: dict[str, Any]) -> None:
    assert delta(scrapes["before"], scrapes["after"], "layerbank_blocks_written_total") == 4


def test_metrics_counts_extracted_images(scrapes: dict[str, Any]) -> None:
    assert delta(scrapes["before"], scrapes["after"], "layerbank_extracted_images_total") == 500


def test_metrics_extraction_rate_positive(scrapes: dict[str, Any]) -> None:
    after = scrapes["after"]
    assert value(after, "layerbank_extraction_images_per_second") > 0
    assert delta(scrapes["before"], after, "layerbank_extraction_seconds_total") > 0


def test_metrics_counts_probe_fit(scrapes: dict[str, Any]) -> None:
    before, after = scrapes["before"], scrapes["after"]
    assert delta(before, after, "layerbank_probe_fits_total") == 1
    fit_seconds = delta(before, after, "layerbank_probe_fit_seconds_total")
    assert fit_seconds > 0
    assert value(after, "layerbank_probe_last_fit_seconds") == pytest.approx(fit_seconds)


def test_metrics_jobs_by_state(scrapes: dict[str, Any], settings: Settings) -> None:
    before, after = scrapes["before"], scrapes["after"]
    queue = settings.queue
    # 4 block jobs, the finalize job and the probe job finished; none failed.
    assert delta(before, after, "layerbank_jobs", queue=queue, state="finished") >= 6
    assert delta(before, after, "layerbank_jobs", queue=queue, state="failed") == 0
    assert value(after, "layerbank_redis_up") == 1


def test_metrics_latency_by_route_template(scrapes: dict[str, Any]) -> None:
    after = scrapes["after"]
    polls = value(after, f"{LATENCY}_count", method="GET", route="/v1/jobs/{job_id}", status="200")
    assert polls >= 1
    routes = {dict(labels).get("route") for name, labels in after if name.startswith(LATENCY)}
    assert not any(scrapes["job_id"] in str(route) for route in routes)


def test_worker_logs_name_job_and_featureset(
    scrapes: dict[str, Any], stack_dirs: dict[str, Path]
) -> None:
    lines = [
        line
        for path in sorted(stack_dirs["logs"].glob("worker-*.log"))
        for line in path.read_text().splitlines()
        if f"job {scrapes['job_id']} (rq " in line
    ]
    featureset_id = scrapes["featureset_id"]
    # Each of the 4 block jobs and the finalize job logs a start and an end line.
    assert sum(" started" in line for line in lines) == 5
    assert sum(" finished in " in line for line in lines) == 5
    assert all(featureset_id in line for line in lines)
    assert any(f"extract_block('{featureset_id}', 3)" in line for line in lines)


def test_metrics_content_type_negotiated(client: Any) -> None:
    plain = client.request("GET", "/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    openmetrics = client.request(
        "GET", "/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


def test_metrics_key_shared_with_workers() -> None:
    import workers.jobs

    assert workers.jobs.METRICS_KEY == METRICS_KEY


# -- apps of their own on the session's Redis -------------------------------------------------


@pytest.fixture()
def idle_queue_app(redis_server: Any, tmp_path: Path) -> Iterator[tuple[TestClient, Queue]]:
    """An app on a queue no worker listens to, so enqueued jobs stay queued."""
    settings = Settings(
        store=str(tmp_path / "store"),
        redis_url=redis_server.url,
        queue=f"metrics-idle-{uuid.uuid4().hex[:8]}",
        auth="off",
    )
    queue = Queue(settings.queue, connection=Redis.from_url(redis_server.url))
    with TestClient(create_app(settings)) as http:
        yield http, queue
    queue.empty()
    queue.delete(delete_jobs=True)


def test_metrics_queue_depth_counts_waiting(idle_queue_app: tuple[TestClient, Queue]) -> None:
    http, queue = idle_queue_app
    for block in range(3):
        queue.enqueue_call("workers.jobs.extract_block", args=("0" * 24, block))
    samples = parse(http.get("/metrics").text)
    assert value(samples, "layerbank_queue_depth", queue=queue.name) == 3
    assert value(samples, "layerbank_jobs", queue=queue.name, state="queued") == 3
    assert value(samples, "layerbank_jobs", queue=queue.name, state="started") == 0


def test_metrics_unmatched_route_label(idle_queue_app: tuple[TestClient, Queue]) -> None:
    http, _ = idle_queue_app
    assert http.get("/v1/no-such-resource/abc").status_code == 404
    samples = parse(http.get("/metrics").text)
    count = value(samples, f"{LATENCY}_count", method="GET", route="unmatched", status="404")
    assert count == 1


def test_metrics_redis_down_reported(tmp_path: Path) -> None:
    # Nothing listens on this 127.0.0.1 port, so every Redis call fails.
    settings = Settings(
        store=str(tmp_path / "store"), redis_url=f"redis://127.0.0.1:{free_port()}/0", auth="off"
    )
    http = TestClient(create_app(settings))
    response = http.get("/metrics")
    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "layerbank_redis_up") == 0
    assert not any(name == "layerbank_queue_depth" for name, _ in samples)


def test_metrics_unknown_hash_field_ignored(idle_queue_app: tuple[TestClient, Queue]) -> None:
    http, queue = idle_queue_app
    field = f"test-{uuid.uuid4().hex[:8]}"
    queue.connection.hset(METRICS_KEY, field, "not a number")
    try:
        response = http.get("/metrics")
    finally:
        queue.connection.hdel(METRICS_KEY, field)
    assert response.status_code == 200
    assert ("layerbank_blocks_written_total", frozenset()) in parse(response.text)
