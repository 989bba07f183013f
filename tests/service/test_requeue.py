"""Queuing an extraction again while blocks of its earlier job are still queued or running."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from service.jobs import enqueue_extraction, job_state, load_job
from store import FeatureSet, Store
from store.featureset import create_featureset
from store.spec import FeatureSetSpec

N_ITEMS, BLOCK_ROWS = 200, 50  # four blocks


def _pending_featureset(root: Path) -> FeatureSet:
    spec = FeatureSetSpec(
        model="pixels",
        model_revision="none",
        model_family="pixels",
        dataset=f"digits-{uuid.uuid4().hex[:8]}",
        dataset_fingerprint="0" * 16,
        split="train",
        layers=[0],
        pooling="mean",
        dtype="float32",
    )
    return create_featureset(
        Store(root),
        spec,
        layer_map=[{"layer": 0, "description": "pixels"}],
        dim=4,
        labels=np.arange(N_ITEMS) % 10,
        item_ids=np.arange(N_ITEMS),
        class_names=[str(i) for i in range(10)],
        block_rows=BLOCK_ROWS,
    )


def _queued_blocks(queue: Queue) -> Counter[int]:
    jobs = Job.fetch_many(queue.get_job_ids(), connection=queue.connection)
    return Counter(
        job.args[1] for job in jobs if job is not None and job.func_name.endswith("extract_block")
    )


def _fail(job: Job) -> None:
    """Mark ``job`` failed as a worker would, without running it."""
    Queue(job.origin, connection=job.connection).remove(job.id)
    job.set_status(JobStatus.FAILED)


def test_requeue_skips_blocks_still_queued(redis_server: Any, tmp_path: Path) -> None:
    redis = Redis.from_url(redis_server.url)
    # A queue no worker listens to, so the blocks stay queued.
    queue = Queue(f"requeue-{uuid.uuid4().hex[:8]}", connection=redis)
    store = Store(tmp_path / "store")
    featureset = _pending_featureset(tmp_path / "store")
    job_id = enqueue_extraction(queue, featureset, timeout=60)
    first_block = Job.fetch(load_job(redis, job_id)["rq_ids"][0], connection=redis)
    _fail(first_block)
    assert job_state(redis, store, job_id)["status"] == "failed"

    enqueue_extraction(queue, featureset, timeout=60, job_id=job_id)

    assert _queued_blocks(queue) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert job_state(redis, store, job_id)["status"] == "queued"
    assert len(load_job(redis, job_id)["rq_ids"]) == 4 + 1
    queue.empty()
    redis.close()
