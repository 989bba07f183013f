"""The main job end to end over HTTP: real Redis, real rq workers, real Zarr, real digits."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.client import ClientError
from tests.conftest import rq_starts, wait_job
from tests.factories import reference_pooled


def test_extraction_layer_matches_direct_forward(
    client: Any, tiny_model: Path, digits_featuresets: dict[str, str]
) -> None:
    from workers.datasets import load_split

    featureset_id = digits_featuresets["train"]
    images = load_split("digits", "train").images
    expected = reference_pooled(tiny_model, images[:40])
    for layer in range(3):
        array = client.layer_array(featureset_id, layer)
        assert array.shape == (len(images), 32)
        assert array.dtype == np.float32
        np.testing.assert_allclose(array[:40], expected[layer], rtol=1e-4, atol=1e-5)


def test_extraction_featureset_describes_layers(
    client: Any, digits_featuresets: dict[str, str]
) -> None:
    summary = client.featureset(digits_featuresets["train"])
    assert summary["status"] == "complete"
    assert summary["shape"] == [3, 1297, 32]
    assert summary["progress"]["blocks_done"] == summary["progress"]["blocks_total"] == 6
    descriptions = [row["description"] for row in summary["layer_map"]]
    assert descriptions[0].startswith("embeddings")
    assert "ln_f" in descriptions[2]


def test_extraction_same_request_twice_one_featureset(
    client: Any, tiny_model: Path, digits_featuresets: dict[str, str]
) -> None:
    again = client.extract(
        str(tiny_model),
        "digits",
        "train",
        layers="all",
        pooling="mean",
        block_rows=256,
        batch_size=64,
    )
    assert again["featureset_id"] == digits_featuresets["train"]
    assert again["created"] is False
    assert again["status"] == "complete"
    ids = [fs["featureset_id"] for fs in client.featuresets()]
    assert ids.count(digits_featuresets["train"]) == 1


def test_json_row_limit_names_stop(client: Any, digits_featuresets: dict[str, str]) -> None:
    """The 413 of a JSON read names stop with the stop that was sent, not the row count."""
    featureset_id = digits_featuresets["train"]
    for part in ("layers/1", "labels"):
        with pytest.raises(ClientError) as refused:
            client.request(
                "GET",
                f"/v1/featuresets/{featureset_id}/{part}",
                params={"start": 100, "stop": 1297, "format": "json"},
            )
        assert refused.value.status_code == 413, part
        detail = refused.value.detail
        assert detail["field"] == "stop"
        assert detail["value"] == 1297
        assert "1197 rows" in detail["message"]
        assert "stop <= 1100" in detail["message"]


def test_extraction_job_reports_progress(client: Any, tiny_model: Path) -> None:
    answer = client.extract(
        str(tiny_model), "digits", "test", layers=[1], pooling="last_token", block_rows=100
    )
    state = wait_job(client, answer["job_id"])
    assert state is not None
    assert state["status"] == "finished"
    assert state["progress"] == {"done": 5, "total": 5, "items_done": 500, "items_total": 500}


def test_layer_fetch_json_slice_and_labels(client: Any, digits_featuresets: dict[str, str]) -> None:
    featureset_id = digits_featuresets["test"]
    response = client.request(
        "GET",
        f"/v1/featuresets/{featureset_id}/layers/1",
        params={"start": 10, "stop": 13, "format": "json"},
    )
    body = response.json()
    assert body["shape"] == [3, 32]
    full = client.layer_array(featureset_id, 1)
    np.testing.assert_allclose(np.asarray(body["data"], dtype=np.float32), full[10:13])
    labels = client.labels(featureset_id)
    assert labels.shape == (500,)
    assert sorted(np.unique(labels).tolist()) == list(range(10))


def test_layer_fetch_npy_has_content_length(
    client: Any, digits_featuresets: dict[str, str]
) -> None:
    response = client.request("GET", f"/v1/featuresets/{digits_featuresets['test']}/layers/0")
    assert response.headers["content-type"] == "application/octet-stream"
    assert int(response.headers["content-length"]) == len(response.content)
    assert np.load(io.BytesIO(response.content)).shape == (500, 32)


def test_probe_logistic_beats_chance_and_converges(
    client: Any, digits_featuresets: dict[str, str]
) -> None:
    answer = client.probe(
        digits_featuresets["train"],
        digits_featuresets["test"],
        kind="logistic",
        params={"C": [0.1, 1, 10]},
    )
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    result = client.probe_result(answer["probe_id"])
    rows = result["rows"]
    assert [row["layer"] for row in rows] == [0, 1, 2]
    assert max(row["test_accuracy"] for row in rows) > 0.4
    assert all(row["converged"] for row in rows)
    assert all(row["params"]["C"] in (0.1, 1, 10) for row in rows)
    curve = client.curve(answer["probe_id"])
    assert [point["layer"] for point in curve["kinds"]["logistic"]] == [0, 1, 2]
    png = client.curve_png(answer["probe_id"], baseline=0.9)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (
            {"model": "no-such-org/no-such-model", "dataset": "digits", "split": "train"},
            422,
            "model",
        ),
        ({"model": "pixels", "dataset": "no-such-dataset", "split": "train"}, 422, "dataset"),
        ({"model": "pixels", "dataset": "digits", "split": "validation"}, 422, "split"),
        ({"model": "pixels", "dataset": "digits", "split": "train", "layers": [3]}, 422, "layers"),
        ({"model": "/etc", "dataset": "digits", "split": "train"}, 403, "model"),
    ],
)
def test_extraction_bad_request_names_field(
    client: Any, body: dict[str, Any], status: int, field: str
) -> None:
    with pytest.raises(ClientError) as info:
        client.extract(**body)
    assert info.value.status_code == status
    assert info.value.detail["field"] == field
    assert repr(body.get(field, body.get("layers")))[:10] in info.value.detail["message"] or (
        field in ("split", "layers")
    )


def test_extraction_layer_out_of_range_message(client: Any, tiny_model: Path) -> None:
    with pytest.raises(ClientError) as info:
        client.extract(str(tiny_model), "digits", "train", layers=[0, 30])
    assert info.value.status_code == 422
    assert "layer 30 is out of range" in info.value.detail["message"]
    assert "(0..2)" in info.value.detail["message"]


def test_probe_mismatched_featuresets_rejected(
    client: Any, digits_featuresets: dict[str, str]
) -> None:
    pixels = client.extract("pixels", "digits", "test")
    wait_job(client, pixels["job_id"])
    with pytest.raises(ClientError) as info:
        client.probe(digits_featuresets["train"], pixels["featureset_id"])
    assert info.value.status_code == 422
    assert info.value.detail["field"] == "test_featureset"


def test_probe_on_unfinished_featureset_is_409(
    client: Any, settings: Any, digits_featuresets: dict[str, str]
) -> None:
    from store import FeatureSetSpec, Store, create_featureset

    store = Store(settings.store)
    spec = FeatureSetSpec(
        model="pending-model",
        model_revision="r",
        model_family="imagegpt",
        dataset="digits",
        dataset_fingerprint="f",
        split="train",
        layers=[0],
        pooling="mean",
    )
    pending = create_featureset(
        store,
        spec,
        layer_map=[],
        dim=4,
        labels=np.zeros(10, np.int64),
        item_ids=np.arange(10),
        class_names=[],
        block_rows=5,
    )
    with pytest.raises(ClientError) as info:
        client.probe(pending.id, digits_featuresets["test"])
    assert info.value.status_code == 409
    assert info.value.detail["progress"] == {
        "blocks_done": 0,
        "blocks_total": 2,
        "items_done": 0,
        "items_total": 10,
    }
    with pytest.raises(ClientError) as layer_info:
        client.layer_array(pending.id, 0)
    assert layer_info.value.status_code == 409


def test_ids_with_path_separators_rejected(client: Any) -> None:
    for bad in ("..%2F..%2Fetc", "abc", "0123456789abcdef0123456Z"):
        with pytest.raises(ClientError) as info:
            client.featureset(bad)
        assert info.value.status_code in (404, 422)


def test_pretrain_then_extract_store_model(client: Any) -> None:
    created = client.pretrain(
        "tiny-pretrained", n_layer=1, n_embd=16, n_head=2, n_colors=8, steps=3, batch_size=16
    )
    state = wait_job(client, created["job_id"])
    assert state is not None and state["status"] == "finished", state
    again = client.pretrain(
        "tiny-pretrained", n_layer=1, n_embd=16, n_head=2, n_colors=8, steps=3, batch_size=16
    )
    assert again["status"] == "complete"
    models = {m["model"]: m for m in client._json("GET", "/v1/models")["data"]}
    assert models["store:tiny-pretrained"]["n_hidden_states"] == 2
    assert models["store:tiny-pretrained"]["training"]["input_policy"] == "sos"
    answer = client.extract("store:tiny-pretrained", "digits", "test", limit=50)
    finished = wait_job(client, answer["job_id"])
    assert finished is not None and finished["status"] == "finished", finished
    summary = client.featureset(answer["featureset_id"])
    assert summary["spec"]["processor"]["input_policy"] == "sos"
    assert summary["n_items"] == 50


def test_api_process_never_imports_torch(settings: Any) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.app import create_app\n"
        "client = TestClient(create_app())\n"
        "assert client.get('/v1/featuresets').status_code == 200\n"
        "r = client.post('/v1/extractions', json={'model': 'pixels', 'dataset': 'digits',"
        " 'split': 'train', 'limit': 20})\n"
        "assert r.status_code in (200, 202), r.text\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = {
        "LAYERBANK_STORE": settings.store,
        "REDIS_URL": settings.redis_url,
        "LAYERBANK_QUEUE": "layerbank-no-torch-check",
        "HF_HUB_OFFLINE": "1",
    }
    import os

    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _queue_stored_probe(
    settings: Any, featuresets: dict[str, str], params: dict[str, Any]
) -> tuple[str, str]:
    """Store a probe spec and queue its job without the API's checks, as a spec stored before
    a check existed would be. Returns the probe id and the job id."""
    import uuid

    from redis import Redis
    from rq import Queue

    from service.jobs import enqueue_single
    from store import Store

    probe_id = uuid.uuid4().hex[:24]
    spec = {
        "train_featureset": featuresets["train"],
        "test_featureset": featuresets["test"],
        "layers": [0],
        "kinds": ["knn"],
        "params": {"knn": params},
        "seed": 0,
    }
    attrs = {"probe_id": probe_id, "spec": spec, "status": "pending", "rows": [], "best": {}}
    Store(settings.store).write_result("probes", probe_id, attrs)
    job_id = enqueue_single(
        Queue(settings.queue, connection=Redis.from_url(settings.redis_url)),
        "workers.jobs.run_probe",
        (probe_id,),
        kind="probe",
        target=probe_id,
        timeout=300,
    )
    return probe_id, job_id


def test_probe_failed_job_reports_failed(
    client: Any, settings: Any, stack_dirs: dict[str, Path], digits_featuresets: dict[str, str]
) -> None:
    from redis import Redis

    from service.jobs import load_job

    # Every k of the grid fits the train set but not the part left for fitting after the
    # validation split, which the job checks again.
    probe_id, job_id = _queue_stored_probe(settings, digits_featuresets, {"k": [1297]})
    state = wait_job(client, job_id)
    assert state is not None
    assert state["status"] == "failed"
    # A bad parameter fails the same way on every run, so the worker does not retry it.
    redis = Redis.from_url(settings.redis_url)
    rq_id = load_job(redis, job_id)["rq_ids"][0]
    assert rq_starts(stack_dirs["logs"], rq_id) == 1
    result = client.probe_result(probe_id)
    assert result["status"] == "failed"
    assert "k" in result["error"]["message"]
    assert result["error"]["value"] == [1297]
    with pytest.raises(ClientError) as info:
        client.curve(probe_id)
    assert info.value.status_code == 409
    assert "failed" in info.value.detail["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"model": "pixels", "dataset": "digits", "split": "train", "limit": NaN}', "limit"),
        ('{"model": "pixels", "dataset": "digits", "split": "train", "layer": 3}', "layer"),
        ('{"model": "pixels", "dataset": "digits"}', "split"),
        ('{"model": "pixels", "dataset": "digits", "split": "train", "layers": "last"}', "layers"),
        (
            '{"model": "pixels", "dataset": "digits", "split": "train", "batch_size": -1}',
            "batch_size",
        ),
        ('{"model": "pixels", "dataset"', "body"),
    ],
)
def test_validation_error_has_domain_shape(client: Any, body: str, field: str) -> None:
    response = client._http.post(
        "/v1/extractions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["field"] == field
    assert field in detail["message"]


def test_extraction_limit_covering_split_reuses_featureset(client: Any) -> None:
    whole = client.extract("pixels", "digits", "test")
    wait_job(client, whole["job_id"])
    limited = client.extract("pixels", "digits", "test", limit=100000, seed=3)
    assert limited["featureset_id"] == whole["featureset_id"]
    assert limited["created"] is False


def test_pretrain_same_name_other_settings_rejected(client: Any) -> None:
    first = client.pretrain(
        "tiny-clash", n_layer=1, n_embd=16, n_head=2, n_colors=8, steps=40, batch_size=16
    )
    with pytest.raises(ClientError) as info:
        client.pretrain(
            "tiny-clash", n_layer=1, n_embd=16, n_head=2, n_colors=8, steps=41, batch_size=16
        )
    assert info.value.status_code == 422
    assert info.value.detail["field"] == "name"
    state = wait_job(client, first["job_id"])
    assert state is not None and state["status"] == "finished", state


@pytest.mark.parametrize(
    ("kind", "params", "field"),
    [
        ("logistic", {"C": "big"}, "C"),
        ("logistic", {"C": [0.1, -1]}, "C"),
        ("logistic", {"max_itr": 10}, "max_itr"),
        ("knn", {"k": [5000]}, "k"),
        ("mlp", {"dropout": 1.5}, "dropout"),
        ("logistic", {"val_fraction": 1.5}, "val_fraction"),
        ("knn", {"val_fraction": 0}, "val_fraction"),
        ("adapter", {"bottleneck": 0}, "bottleneck"),
        ("adapter", {"epochs": 100000}, "epochs"),
        ("adapter", {"lr": "fast"}, "lr"),
        ("adapter", {"val_fraction": -0.2}, "val_fraction"),
        ("adapter", {"depth": 2}, "depth"),
        ("logistic", {"C": [float(c) for c in range(1, 102)]}, "C"),
        ("logistic", {"C": [1.0] * 101 + [float(c) for c in range(2, 102)]}, "C"),
        ("mlp", {"hidden": 100_000_000}, "hidden"),
        ("mlp", {"max_epochs": 10**9}, "max_epochs"),
        ("mlp", {"patience": 10**9}, "patience"),
        ("knn", {"chunk_size": 10**6}, "chunk_size"),
        ("mlp", {"val_fraction": 0.001}, "val_fraction"),
        ("mlp", {"lr": 1e300}, "lr"),
        ("mlp", {"weight_decay": 1e300}, "weight_decay"),
        ("logistic", {"engine": "torch", "history_size": 10**9}, "history_size"),
        ("logistic", {"max_iter": 1e12}, "max_iter"),
        ("adapter", {"batch_size": 65536, "bottleneck": 65536}, "bottleneck"),
    ],
)
def test_probe_bad_params_rejected_before_queueing(
    client: Any, digits_featuresets: dict[str, str], kind: str, params: dict[str, Any], field: str
) -> None:
    with pytest.raises(ClientError) as info:
        client.probe(
            digits_featuresets["train"], digits_featuresets["test"], kind=kind, params=params
        )
    assert info.value.status_code == 422
    assert info.value.detail["field"] == field


def test_resume_finished_job_is_200(client: Any, digits_featuresets: dict[str, str]) -> None:
    answer = client.extract("pixels", "digits", "test", limit=300)
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    response = client.request("POST", f"/v1/jobs/{answer['job_id']}/resume")
    assert response.status_code == 200
    assert response.json()["status"] == "finished"


def test_probe_k_emptied_by_split_is_422(client: Any, digits_featuresets: dict[str, str]) -> None:
    """k=1296 is below the 1,297 train items but above the items left for fitting once the
    validation part is held out. The API computes the split sizes from the class counts."""
    with pytest.raises(ClientError) as info:
        client.probe(
            digits_featuresets["train"],
            digits_featuresets["test"],
            kind="knn",
            params={"k": [1296]},
        )

    assert info.value.status_code == 422
    assert info.value.detail["field"] == "k"
    assert info.value.detail["value"] == [1296]
    assert "validation split" in info.value.detail["message"]


def test_resume_of_probe_failed_on_value_is_409(
    client: Any, settings: Any, digits_featuresets: dict[str, str]
) -> None:
    """A probe whose k the worker rejects fails without retries. A resume would fail the same
    way, so it is rejected with the job's own error instead of run again."""
    from redis import Redis
    from rq.job import Job

    from service.jobs import load_job

    _, job_id = _queue_stored_probe(settings, digits_featuresets, {"k": [1296]})
    state = wait_job(client, job_id)
    assert state is not None and state["status"] == "failed", state
    redis = Redis.from_url(settings.redis_url)
    rq_id = load_job(redis, job_id)["rq_ids"][0]
    runs_before = len(Job.fetch(rq_id, connection=redis).results())

    with pytest.raises(ClientError) as refused:
        client.request("POST", f"/v1/jobs/{job_id}/resume")

    assert refused.value.status_code == 409
    assert refused.value.detail["field"] == state["error"]["field"] == "k"
    assert refused.value.detail["value"] == state["error"]["value"]
    assert state["error"]["message"] in refused.value.detail["message"]
    assert (
        "a resume would repeat it, so do what the error says instead"
        in refused.value.detail["message"]
    )
    assert client.job(job_id)["status"] == "failed"
    assert len(Job.fetch(rq_id, connection=redis).results()) == runs_before


def test_finished_extraction_stays_finished_after_delete(client: Any, settings: Any) -> None:
    """A job's status is how its work ended: deleting the feature set it completed later
    leaves it finished, with the progress it ended at."""
    from redis import Redis

    from service.jobs import FINISHED_FIELD, FINISHED_PROGRESS_FIELD

    answer = client.extract("pixels", "digits", "test", limit=23, seed=5)
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    client.request("DELETE", f"/v1/featuresets/{answer['featureset_id']}")

    after = client.job(answer["job_id"])

    assert after["status"] == "finished"
    assert after["error"] is None
    assert after["progress"] == state["progress"]
    assert after["progress"]["items_done"] == after["progress"]["items_total"] == 23
    # A record written before workers recorded the end: rq's finished jobs still show it.
    redis = Redis.from_url(settings.redis_url)
    redis.hdel(f"layerbank:job:{answer['job_id']}", FINISHED_FIELD, FINISHED_PROGRESS_FIELD)
    assert client.job(answer["job_id"])["status"] == "finished"


def test_probe_job_finished_after_deletes(client: Any, settings: Any) -> None:
    """Deleting the feature set a finished probe read (which deletes the probe result) and
    rq's deletion of the finished rq job leave the probe job finished."""
    from redis import Redis
    from rq.job import Job

    from service.jobs import load_job

    ids = {}
    for split, limit in (("train", 60), ("test", 30)):
        extraction = client.extract("pixels", "digits", split, limit=limit, seed=7103)
        assert wait_job(client, extraction["job_id"])["status"] == "finished"
        ids[split] = extraction["featureset_id"]
    answer = client.probe(ids["train"], ids["test"], kind="knn", params={"k": [1]})
    assert wait_job(client, answer["job_id"])["status"] == "finished"
    redis = Redis.from_url(settings.redis_url)
    Job.fetch(load_job(redis, answer["job_id"])["rq_ids"][0], connection=redis).delete()
    client.request("DELETE", f"/v1/featuresets/{ids['train']}")
    client.request("DELETE", f"/v1/featuresets/{ids['test']}")

    after = client.job(answer["job_id"])

    assert after["status"] == "finished", after
    assert after["error"] is None


def test_probe_job_progress_total_from_start(
    client: Any, digits_featuresets: dict[str, str]
) -> None:
    answer = client.probe(
        digits_featuresets["train"],
        digits_featuresets["test"],
        kind=["knn", "logistic"],
        layers=[0, 1, 2],
        params={"knn": {"k": [3]}, "logistic": {"C": [0.5]}},
        seed=11,
    )
    # Layers times kinds, whether the job is still queued or already running.
    assert client.job(answer["job_id"])["progress"]["total"] == 6
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    assert (state["progress"]["done"], state["progress"]["total"]) == (6, 6)


def test_equal_grids_share_one_probe_id(client: Any, digits_featuresets: dict[str, str]) -> None:
    """A grid is stored as the engines read it, so its spelling does not change the probe id."""
    job_ids = set()

    def probe_id(kind: str | list[str], params: dict[str, Any]) -> str:
        answer = client.probe(
            digits_featuresets["train"],
            digits_featuresets["test"],
            kind=kind,
            layers=[1],
            params=params,
            seed=21,
        )
        job_ids.add(answer["job_id"])
        return str(answer["probe_id"])

    c_ids = {probe_id("logistic", {"C": grid}) for grid in ([1.0], 1, [1, 1.0], [1.0] * 150)}
    k_ids = {probe_id("knn", {"k": grid}) for grid in ([3, 1], [1, 3, 3], [3.0, 1e0])}
    iter_ids = {probe_id("logistic", {"C": 1, "max_iter": value}) for value in (50, 50.0, 5e1)}
    default_ids = {
        probe_id("logistic", params)
        for params in ({}, {"max_iter": 5000}, {"engine": "sklearn", "tol": 1e-5})
    }
    assert len(c_ids) == 1
    assert len(k_ids) == 1
    assert len(iter_ids) == 1
    assert len(default_ids) == 1
    kind_ids = {probe_id(kinds, {}) for kinds in (["knn", "logistic"], ["logistic", "knn"])}
    assert len(kind_ids) == 1
    # The fits run to the end here, so that no later test counts them.
    for job_id in job_ids:
        state = wait_job(client, job_id, timeout=300)
        assert state is not None and state["status"] == "finished", state
