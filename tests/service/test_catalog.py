"""GET /v1/datasets and GET /v1/models over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import wait_job


def test_datasets_lists_builtin_digits(client: Any) -> None:
    answer = client.request("GET", "/v1/datasets").json()
    digits = [entry for entry in answer["data"] if entry["reference"] == "digits"]
    assert answer["count"] == len(answer["data"])
    assert len(digits) == 1
    assert digits[0]["available"] is True
    assert "test" in digits[0]["splits"]


def test_datasets_lists_token_cache(client: Any, tiny_model: Path) -> None:
    answer = client.extract(str(tiny_model), "digits", "test", limit=40, layers=[1])
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    fingerprint = client.featureset(answer["featureset_id"])["spec"]["dataset_fingerprint"]

    caches = client.request("GET", "/v1/datasets").json()["token_caches"]
    matching = [cache for cache in caches if cache["dataset_fingerprint"] == fingerprint]
    assert len(matching) == 1
    assert matching[0]["n_items"] == 40
    assert matching[0]["seq"] == 64
    assert matching[0]["dataset"] == "digits"


def test_models_lists_local_checkpoints(client: Any, tiny_model: Path) -> None:
    answer = client.request("GET", "/v1/models").json()
    local = [entry for entry in answer["data"] if entry["model"] == str(tiny_model)]
    assert len(local) == 1
    assert local[0]["source"] == "local"
    assert local[0]["family"] == "imagegpt"
    assert local[0]["n_hidden_states"] == 3


def test_models_pixels_width_depends_on_dataset(client: Any) -> None:
    """The raw-pixel baseline has no fixed width: it is the dataset's pixel count."""
    answer = client.request("GET", "/v1/models").json()
    pixels = [entry for entry in answer["data"] if entry["model"] == "pixels"]
    assert len(pixels) == 1
    assert pixels[0]["dim"] is None
    assert pixels[0]["n_hidden_states"] == 1
