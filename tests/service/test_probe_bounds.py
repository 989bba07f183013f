"""Probe requests over HTTP: adapter memory, unknown ids in the body, plot query parameters."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from service.client import ClientError
from tests.conftest import wait_job

UNKNOWN_ID = "0123456789abcdef01234567"


def _error(client: Any, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Send a request that must fail; return its status code and error detail."""
    with pytest.raises(ClientError) as info:
        client.request(method, path, **kwargs)
    return info.value.status_code, info.value.detail


@pytest.fixture(scope="module")
def logistic_probe(client: Any, digits_featuresets: dict[str, str]) -> str:
    """A complete logistic probe on layers 0-2."""
    answer = client.probe(
        digits_featuresets["train"], digits_featuresets["test"], kind="logistic", params={"C": 1.0}
    )
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    return str(answer["probe_id"])


def test_adapter_over_memory_limit_is_422(client: Any, digits_featuresets: dict[str, str]) -> None:
    with pytest.raises(ClientError) as info:
        client.probe(
            digits_featuresets["train"],
            digits_featuresets["test"],
            kind="adapter",
            layers=[1],
            params={"epochs": 1, "batch_size": 4096, "bottleneck": 4096},
        )

    assert info.value.status_code == 422
    detail = info.value.detail
    assert detail["field"] == "bottleneck"
    assert detail["value"] == 4096
    assert "GiB" in detail["message"]
    assert "limit of 4 GiB" in detail["message"]
    assert "pass bottleneck <= " in detail["message"]


def test_adapter_defaults_accepted(client: Any, digits_featuresets: dict[str, str]) -> None:
    answer = client.probe(
        digits_featuresets["train"],
        digits_featuresets["test"],
        kind="adapter",
        layers=[1],
        params={"epochs": 1},
    )

    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state


@pytest.mark.parametrize("field", ["train_featureset", "test_featureset"])
def test_probe_unknown_featureset_names_field(
    client: Any, digits_featuresets: dict[str, str], field: str
) -> None:
    body = {
        "train_featureset": digits_featuresets["train"],
        "test_featureset": digits_featuresets["test"],
        "kind": "logistic",
        field: UNKNOWN_ID,
    }

    status, detail = _error(client, "POST", "/v1/probes", json=body)

    assert status == 404
    assert detail["field"] == field
    assert detail["value"] == UNKNOWN_ID
    assert field in detail["message"]


def test_projection_unknown_featureset_names_field(client: Any) -> None:
    body = {"featureset": UNKNOWN_ID, "layer": 0, "method": "pca", "n_points": 100}

    status, detail = _error(client, "POST", "/v1/projections", json=body)

    assert status == 404
    assert detail["field"] == "featureset"
    assert detail["value"] == UNKNOWN_ID


@pytest.mark.parametrize(
    ("params", "field"),
    [({"kind": "logistic", "layer": 7}, "layer"), ({"kind": "knn", "layer": 1}, "kind")],
)
def test_confusion_unfitted_kind_or_layer_is_422(
    client: Any, logistic_probe: str, params: dict[str, Any], field: str
) -> None:
    status, detail = _error(
        client, "GET", f"/v1/probes/{logistic_probe}/confusion.png", params=params
    )

    assert status == 422
    assert detail["field"] == field
    assert detail["value"] == params[field]


def test_curve_reference_outside_layers_is_422(client: Any, logistic_probe: str) -> None:
    status, detail = _error(
        client, "GET", f"/v1/probes/{logistic_probe}/curve.png", params={"reference": "99:0.5"}
    )

    assert status == 422
    assert detail["field"] == "reference"
    assert detail["value"] == "99:0.5"
    assert "0..2" in detail["message"]


def test_curve_reference_within_layers_is_png(client: Any, logistic_probe: str) -> None:
    response = client.request(
        "GET", f"/v1/probes/{logistic_probe}/curve.png", params={"reference": "0:0.3,2:0.9"}
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"


@pytest.mark.parametrize("baseline", ["nan", "NaN", "inf", "-inf", "1.5", "-0.1", "high"])
def test_curve_baseline_outside_unit_interval_is_422(
    client: Any, logistic_probe: str, baseline: str
) -> None:
    status, detail = _error(
        client, "GET", f"/v1/probes/{logistic_probe}/curve.png", params={"baseline": baseline}
    )

    assert status == 422
    assert detail["field"] == "baseline"
    assert detail["value"] == baseline
    assert "finite number from 0 to 1" in detail["message"]
    assert f'(got "{baseline}")' in detail["message"]


@pytest.mark.parametrize("baseline", ["0", "0.9", "1"])
def test_curve_baseline_within_unit_interval_is_png(
    client: Any, logistic_probe: str, baseline: str
) -> None:
    response = client.request(
        "GET", f"/v1/probes/{logistic_probe}/curve.png", params={"baseline": baseline}
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"


def _complete_featureset(root: str, dataset: str, split: str, dim: int) -> str:
    """Write a complete one-layer feature set of width ``dim`` and return its id."""
    from store import FeatureSetSpec, Store, create_featureset

    n_items = 60
    spec = FeatureSetSpec(
        model="pixels",
        model_revision="none",
        model_family="pixels",
        dataset=dataset,
        dataset_fingerprint=f"{dataset}-{split}",
        split=split,
        layers=[0],
        pooling="mean",
        dtype="float32",
    )
    featureset = create_featureset(
        Store(root),
        spec,
        layer_map=[{"layer": 0, "description": "pixels"}],
        dim=dim,
        labels=np.arange(n_items) % 3,
        item_ids=np.arange(n_items),
        class_names=["a", "b", "c"],
        block_rows=n_items,
    )
    features = np.random.default_rng(0).standard_normal((1, n_items, dim)).astype(np.float32)
    featureset.write_block(0, features)
    assert featureset.mark_complete()
    return featureset.id


def test_probe_width_mismatch_names_fix(client: Any, settings: Any) -> None:
    dataset = f"widths-{uuid.uuid4().hex[:8]}"
    train = _complete_featureset(str(settings.store), dataset, "train", 48)
    test = _complete_featureset(str(settings.store), dataset, "test", 192)

    with pytest.raises(ClientError) as info:
        client.probe(train, test, kind="logistic")

    assert info.value.status_code == 422
    detail = info.value.detail
    assert detail["field"] == "test_featureset"
    assert "differ in dim (48 vs 192)" in detail["message"]
    assert "same model, layers and pooling" in detail["message"]


def _pixels(client: Any, split: str, limit: int) -> str:
    answer = client.extract("pixels", "digits", split, layers=[0], pooling="mean", limit=limit)
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    return str(answer["featureset_id"])


@pytest.mark.parametrize("fraction", [0.2, 0.9])
def test_probe_one_train_item_per_class_422(client: Any, fraction: float) -> None:
    """Ten stratified digits contain one item per class, so no val_fraction can help."""
    train, test = _pixels(client, "train", 10), _pixels(client, "test", 10)
    body = {
        "train_featureset": train,
        "test_featureset": test,
        "kind": "knn",
        "params": {"val_fraction": fraction},
    }

    status, detail = _error(client, "POST", "/v1/probes", json=body)

    assert status == 422
    assert detail["field"] == "val_fraction"
    assert "each class needs at least 2 train items" in detail["message"]
    assert "larger limit" in detail["message"]
    assert "pass a larger val_fraction" not in detail["message"]
