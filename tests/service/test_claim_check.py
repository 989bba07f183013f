"""Claim check over HTTP: checkpoints saved during pretraining, probed at one layer each.

Also covers the probe PNGs (confusion matrix, layer curve with reference points) and the
adapter probe kind, on the same small feature sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from service.client import ClientError
from tests.conftest import wait_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PRETRAIN = {
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "n_colors": 8,
    "steps": 6,
    "batch_size": 32,
    "eval_every": 3,
    "checkpoint_every": 3,
    "learning_rate": 0.01,
}


def _save_png(name: str, content: bytes) -> None:
    if os.environ.get("LAYERBANK_TEST_PNG_DIR"):
        Path(os.environ["LAYERBANK_TEST_PNG_DIR"], name).write_bytes(content)


@pytest.fixture(scope="module")
def checkpoints(client: Any) -> list[dict[str, Any]]:
    """A 6-step pretraining of a tiny ImageGPT with checkpoints at steps 0, 3 and 6."""
    answer = client.pretrain("claim-igpt", **PRETRAIN)
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    listing = client.request("GET", "/v1/models/claim-igpt/checkpoints").json()
    return list(listing["data"])


def _extract(client: Any, model: str, split: str, limit: int | None) -> str:
    answer = client.extract(model, "digits", split, layers=[1, 2], pooling="mean", limit=limit)
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    return str(answer["featureset_id"])


def _probe(client: Any, train: str, test: str, params: dict[str, Any]) -> str:
    answer = client.probe(train, test, kind="logistic", layers=[1, 2], params=params)
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    return str(answer["probe_id"])


def _probe_model(client: Any, model: str) -> str:
    """Probe layers 1 and 2 of ``model`` with C=1, on 300 train and all 500 test digits."""
    train = _extract(client, model, "train", 300)
    test = _extract(client, model, "test", None)
    return _probe(client, train, test, {"C": [1.0]})


@pytest.fixture(scope="module")
def probes(client: Any, checkpoints: list[dict[str, Any]]) -> list[str]:
    """One logistic probe of layers 1 and 2 per checkpoint, all with the same settings."""
    return [_probe_model(client, checkpoint["model"]) for checkpoint in checkpoints]


def _claim_error(client: Any, probe_ids: list[str], path: str = "accuracy-vs-loss") -> Any:
    with pytest.raises(ClientError) as caught:
        client.request("GET", f"/v1/claims/{path}", params={"probe": probe_ids, "layer": 2})
    assert caught.value.status_code == 422
    return caught.value.detail


def test_pretrain_saves_checkpoints_with_loss(checkpoints: list[dict[str, Any]]) -> None:
    assert [c["step"] for c in checkpoints] == [0, 3, 6]
    assert [c["model"] for c in checkpoints] == [f"store:claim-igpt@step{s}" for s in (0, 3, 6)]
    assert all(c["val_bits_per_token"] > 0 for c in checkpoints)
    assert checkpoints[-1]["val_loss"] < checkpoints[0]["val_loss"]


def test_checkpoint_unknown_step_422(client: Any, checkpoints: list[dict[str, Any]]) -> None:
    with pytest.raises(ClientError) as caught:
        client.extract("store:claim-igpt@step4", "digits", "test", layers=[1])
    assert caught.value.status_code == 422
    assert "steps 0, 3, 6" in caught.value.detail["message"]


def test_claim_points_follow_checkpoints(
    client: Any, probes: list[str], checkpoints: list[dict[str, Any]]
) -> None:
    claim = client.request(
        "GET", "/v1/claims/accuracy-vs-loss", params={"probe": probes, "layer": 2}
    ).json()
    assert [p["step"] for p in claim["points"]] == [0, 3, 6]
    assert [p["val_loss"] for p in claim["points"]] == [c["val_loss"] for c in checkpoints]
    assert all(0.0 <= p["test_accuracy"] <= 1.0 for p in claim["points"])
    assert claim["spearman"] is None or -1.0 <= claim["spearman"] <= 1.0


def test_claim_png(client: Any, probes: list[str]) -> None:
    response = client.request(
        "GET", "/v1/claims/accuracy-vs-loss.png", params={"probe": probes, "layer": 2}
    )
    assert response.content.startswith(PNG_SIGNATURE)
    _save_png("claim.png", response.content)


def test_claim_several_layers_without_layer_422(client: Any, probes: list[str]) -> None:
    with pytest.raises(ClientError) as caught:
        client.request("GET", "/v1/claims/accuracy-vs-loss", params={"probe": probes})
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "layer"
    assert "layer None" not in caught.value.detail["message"]


def test_claim_kind_not_fitted_422(client: Any, probes: list[str]) -> None:
    """A kind the probe was not fitted with is a wrong kind, not a wrong layer."""
    with pytest.raises(ClientError) as caught:
        client.request(
            "GET",
            "/v1/claims/accuracy-vs-loss",
            params={"probe": probes, "layer": 2, "kind": "mlp"},
        )
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "kind"
    assert caught.value.detail["value"] == "mlp"
    assert "fitted with kinds ['logistic']" in caught.value.detail["message"]


def test_claim_layer_not_fitted_422(client: Any, probes: list[str]) -> None:
    with pytest.raises(ClientError) as caught:
        client.request("GET", "/v1/claims/accuracy-vs-loss", params={"probe": probes, "layer": 0})
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "layer"
    assert caught.value.detail["value"] == 0
    assert "[1, 2]" in caught.value.detail["message"]


def test_claim_repeated_probe_422(client: Any, probes: list[str]) -> None:
    with pytest.raises(ClientError) as caught:
        client.request(
            "GET",
            "/v1/claims/accuracy-vs-loss",
            params={"probe": [probes[0], *probes], "layer": 2},
        )
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "probe"
    assert caught.value.detail["value"] == probes[0]
    assert "listed 2 times" in caught.value.detail["message"]


@pytest.mark.parametrize("path", ["accuracy-vs-loss", "accuracy-vs-loss.png"])
def test_claim_probe_of_other_run_422(client: Any, probes: list[str], path: str) -> None:
    """The final model of another run ends at step 3 too, like checkpoint step 3 here."""
    answer = client.pretrain("claim-other", **{**PRETRAIN, "steps": 3})
    state = wait_job(client, answer["job_id"])
    assert state is None or state["status"] == "finished", state
    other = _probe_model(client, "store:claim-other")

    detail = _claim_error(client, [other, probes[1], probes[0]], path)

    assert detail["field"] == "probe"
    assert detail["value"] == [other]
    assert "different pretraining runs" in detail["message"]
    assert "store:claim-other" in detail["message"]
    assert "store:claim-igpt" in detail["message"]


def test_claim_same_checkpoint_twice_422(client: Any, probes: list[str]) -> None:
    """store:claim-igpt is the model after its last step, the weights of @step6."""
    final = _probe_model(client, "store:claim-igpt")

    detail = _claim_error(client, [*probes, final])

    assert detail["field"] == "probe"
    assert detail["value"] == [probes[2], final]
    assert "step 6" in detail["message"]
    assert "one probe per checkpoint" in detail["message"]


def test_claim_other_probe_params_422(client: Any, probes: list[str]) -> None:
    spec = client.probe_result(probes[2])["spec"]
    other_c = _probe(client, spec["train_featureset"], spec["test_featureset"], {"C": [10.0]})

    detail = _claim_error(client, [probes[0], probes[1], other_c])

    assert detail["field"] == "probe"
    assert detail["value"] == [other_c]
    assert "params" in detail["message"]
    assert '"C": [10.0]' in detail["message"]
    assert '"C": [1.0]' in detail["message"]


def test_claim_other_train_limit_422(client: Any, probes: list[str]) -> None:
    spec = client.probe_result(probes[2])["spec"]
    train = _extract(client, "store:claim-igpt@step6", "train", 200)
    other_limit = _probe(client, train, spec["test_featureset"], {"C": [1.0]})

    detail = _claim_error(client, [probes[0], probes[1], other_limit])

    assert detail["field"] == "probe"
    assert detail["value"] == [other_limit]
    assert "train feature set's limit" in detail["message"]
    assert "200" in detail["message"]
    assert "300" in detail["message"]


def test_confusion_png(client: Any, probes: list[str]) -> None:
    response = client.request(
        "GET", f"/v1/probes/{probes[-1]}/confusion.png", params={"kind": "logistic", "layer": 2}
    )
    assert response.content.startswith(PNG_SIGNATURE)
    _save_png("confusion.png", response.content)


def test_confusion_png_unknown_layer_422(client: Any, probes: list[str]) -> None:
    with pytest.raises(ClientError) as caught:
        client.request(
            "GET", f"/v1/probes/{probes[-1]}/confusion.png", params={"kind": "logistic", "layer": 0}
        )
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "layer"


def test_curve_png_with_reference_points(client: Any, probes: list[str]) -> None:
    response = client.request(
        "GET",
        f"/v1/probes/{probes[-1]}/curve.png",
        params={"reference": "1:0.5,2:0.6", "baseline": 0.97},
    )
    assert response.content.startswith(PNG_SIGNATURE)
    _save_png("curve.png", response.content)


def test_curve_png_bad_reference_422(client: Any, probes: list[str]) -> None:
    with pytest.raises(ClientError) as caught:
        client.request("GET", f"/v1/probes/{probes[-1]}/curve.png", params={"reference": "13:78.2"})
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "reference"


def test_adapter_probe_reports_parameters(client: Any, probes: list[str]) -> None:
    spec = client.probe_result(probes[-1])["spec"]
    answer = client.probe(
        spec["train_featureset"],
        spec["test_featureset"],
        kind="adapter",
        layers=[1],
        params={"bottleneck": 4, "epochs": 2, "lr": 0.01},
    )
    state = wait_job(client, answer["job_id"])
    assert state is not None and state["status"] == "finished", state
    row = client.probe_result(answer["probe_id"])["rows"][0]
    assert row["kind"] == "adapter"
    assert row["trainable_parameters"]["adapters"] == 2 * (2 * 32 * 4 + 32 + 4)
    assert 0.0 <= row["test_accuracy"] <= 1.0
