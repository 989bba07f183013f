"""Projections over HTTP: queue, dedupe, JSON, .npy, PNG and request checks."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.client import ClientError
from tests.conftest import wait_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def test_featureset(client: Any, tiny_model: Path) -> str:
    """The tiny model's layers 1 and 2 on the digits test split (500 items)."""
    answer = client.extract(str(tiny_model), "digits", "test", layers=[1, 2], pooling="mean")
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    return str(answer["featureset_id"])


@pytest.fixture(scope="module")
def tsne_projection(client: Any, test_featureset: str) -> dict[str, Any]:
    body = {"featureset": test_featureset, "layer": 2, "method": "tsne", "n_points": 200, "seed": 0}
    answer = client.request("POST", "/v1/projections", json=body).json()
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    return dict(answer)


def test_projection_json_has_stratified_points(
    client: Any, tsne_projection: dict[str, Any]
) -> None:
    projection = client.request("GET", f"/v1/projections/{tsne_projection['projection_id']}").json()
    assert projection["status"] == "complete"
    assert np.asarray(projection["coords"]).shape == (200, 2)
    assert projection["info"]["perplexity"] == 30.0
    assert projection["class_names"] == [str(d) for d in range(10)]


def test_projection_subsample_keeps_class_balance(
    client: Any, test_featureset: str, tsne_projection: dict[str, Any]
) -> None:
    projection = client.request("GET", f"/v1/projections/{tsne_projection['projection_id']}").json()
    all_counts = np.bincount(client.labels(test_featureset), minlength=10)
    counts = np.bincount(projection["labels"], minlength=10)
    expected = 200 * all_counts / all_counts.sum()
    assert counts.sum() == 200
    assert np.abs(counts - expected).max() < 1.0


def test_projection_labels_match_featureset_rows(
    client: Any, test_featureset: str, tsne_projection: dict[str, Any]
) -> None:
    projection = client.request("GET", f"/v1/projections/{tsne_projection['projection_id']}").json()
    labels = client.labels(test_featureset)
    np.testing.assert_array_equal(labels[projection["item_indices"]], projection["labels"])


def test_projection_npy_equals_json(client: Any, tsne_projection: dict[str, Any]) -> None:
    projection_id = tsne_projection["projection_id"]
    response = client.request("GET", f"/v1/projections/{projection_id}/coords.npy")
    coords = np.load(io.BytesIO(response.content), allow_pickle=False)
    projection = client.request("GET", f"/v1/projections/{projection_id}").json()
    assert coords.dtype == np.float32
    np.testing.assert_array_equal(coords, np.asarray(projection["coords"], dtype=np.float32))


def test_projection_same_request_same_id(
    client: Any, test_featureset: str, tsne_projection: dict[str, Any]
) -> None:
    body = {"featureset": test_featureset, "layer": 2, "method": "tsne", "n_points": 200, "seed": 0}
    response = client.request("POST", "/v1/projections", json=body)
    assert response.status_code == 200
    assert response.json()["projection_id"] == tsne_projection["projection_id"]
    assert response.json()["created"] is False


def test_projection_listed(client: Any, tsne_projection: dict[str, Any]) -> None:
    listing = client.request("GET", "/v1/projections").json()
    ids = [item["projection_id"] for item in listing["data"]]
    assert tsne_projection["projection_id"] in ids


@pytest.mark.parametrize("suffix", [".png", "/scatter.png"])
def test_projection_scatter_png(client: Any, tsne_projection: dict[str, Any], suffix: str) -> None:
    response = client.request("GET", f"/v1/projections/{tsne_projection['projection_id']}{suffix}")
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(PNG_SIGNATURE)
    if os.environ.get("LAYERBANK_TEST_PNG_DIR"):
        Path(os.environ["LAYERBANK_TEST_PNG_DIR"], "scatter.png").write_bytes(response.content)


def test_projection_pca_more_points_than_items_uses_all(client: Any, test_featureset: str) -> None:
    body = {"featureset": test_featureset, "layer": 1, "method": "pca", "n_points": 5000}
    answer = client.request("POST", "/v1/projections", json=body).json()
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    projection = client.request("GET", f"/v1/projections/{answer['projection_id']}").json()
    assert projection["n_points"] == 500
    assert projection["spec"]["n_points"] == 500


def test_projection_too_few_points_422(client: Any, test_featureset: str) -> None:
    body = {"featureset": test_featureset, "layer": 2, "method": "tsne", "n_points": 5}
    with pytest.raises(ClientError) as caught:
        client.request("POST", "/v1/projections", json=body)
    assert caught.value.status_code == 422
    assert "at least 10 points" in caught.value.detail["message"]


def test_projection_umap_without_package_422(client: Any, test_featureset: str) -> None:
    import importlib.util

    if importlib.util.find_spec("umap") is not None:
        pytest.skip("umap-learn is installed here")
    body = {"featureset": test_featureset, "layer": 2, "method": "umap", "n_points": 100}
    with pytest.raises(ClientError) as caught:
        client.request("POST", "/v1/projections", json=body)
    assert caught.value.status_code == 422
    assert "not installed" in caught.value.detail["message"]


def test_projection_unknown_layer_422(client: Any, test_featureset: str) -> None:
    body = {"featureset": test_featureset, "layer": 0, "method": "pca", "n_points": 100}
    with pytest.raises(ClientError) as caught:
        client.request("POST", "/v1/projections", json=body)
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "layer"


def test_projection_unknown_id_404(client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        client.request("GET", f"/v1/projections/{'0' * 24}")
    assert caught.value.status_code == 404


def test_projection_of_damaged_labels_is_refused(client: Any, settings: Any) -> None:
    """Labels are written once, so a projection of a set whose labels cannot be decoded fails
    at the POST with the fix, instead of queueing a job that fails and cannot be resumed."""
    answer = client.extract("pixels", "digits", "test", limit=40, seed=9301, block_rows=20)
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    featureset_id = answer["featureset_id"]
    chunk = Path(settings.store) / "featuresets" / featureset_id / "labels" / "c" / "1"
    chunk.write_bytes(b"not zstd")

    with pytest.raises(ClientError) as caught:
        client.request(
            "POST",
            "/v1/projections",
            json={"featureset": featureset_id, "layer": 0, "method": "pca"},
        )
    assert caught.value.status_code == 500
    assert "delete the feature set and extract it again" in caught.value.detail["message"]
    client.request("DELETE", f"/v1/featuresets/{featureset_id}")
