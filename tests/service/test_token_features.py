"""Token-level features and non-ImageGPT families over HTTP: real workers, real Zarr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from service.client import ClientError
from tests.conftest import wait_job

IMAGE, PATCH, HIDDEN = 16, 8, 32
N_TOKENS = (IMAGE // PATCH) ** 2 + 1


@pytest.fixture(scope="module")
def tiny_vit(stack_dirs: dict[str, Path]) -> Path:
    """A tiny seeded ViT with its image processor under the allowed model root."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = stack_dirs["models"] / "tiny-vit"
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    return path


def _reference_states(path: Path, images: np.ndarray) -> list[np.ndarray]:
    from transformers import ViTImageProcessor, ViTModel

    model = ViTModel.from_pretrained(path).eval()
    pixel_values = ViTImageProcessor.from_pretrained(path)(
        images=list(images), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return [state.numpy() for state in states]


def test_extraction_vit_token_features(
    client: Any, tiny_vit: Path, stack_dirs: dict[str, Path]
) -> None:
    from workers.datasets import load_split

    answer = client.extract(
        str(tiny_vit),
        "digits",
        "test",
        limit=30,
        layers="all",
        pooling="cls",
        token_layers=[2, 1],
        block_rows=16,
    )
    token_bytes = 2 * 30 * N_TOKENS * HIDDEN * 4
    assert answer["token_bytes"] == token_bytes
    assert answer["estimated_bytes"] == 3 * 30 * HIDDEN * 4 + token_bytes
    state = wait_job(client, answer["job_id"])
    assert state is not None
    assert state["status"] == "finished", state

    featureset = client.featureset(answer["featureset_id"])
    assert featureset["token_layers"] == [1, 2]
    assert featureset["token_shape"] == [2, 30, N_TOKENS, HIDDEN]
    assert featureset["layer_map"][2]["description"] == (
        "output of block 2, before the final layer norm (layernorm)"
    )

    images = load_split("digits", "test", limit=30, seed=0).images
    states = _reference_states(tiny_vit, images)
    cls = client.layer_array(answer["featureset_id"], 2)
    np.testing.assert_allclose(cls, states[2][:, 0], rtol=1e-5, atol=1e-5)
    group = zarr.open_group(stack_dirs["store"] / "featuresets" / answer["featureset_id"], mode="r")
    tokens = np.asarray(group["token_features"][:])
    np.testing.assert_allclose(tokens[0], states[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tokens[1], states[2], rtol=1e-5, atol=1e-5)


def test_extraction_token_layers_all_rejected(client: Any, tiny_vit: Path) -> None:
    with pytest.raises(ClientError) as caught:
        client.extract(str(tiny_vit), "digits", "test", limit=30, layers="all", token_layers="all")
    assert caught.value.status_code == 422


def test_extraction_token_layer_out_of_range(client: Any, tiny_vit: Path) -> None:
    with pytest.raises(ClientError) as caught:
        client.extract(str(tiny_vit), "digits", "test", limit=30, token_layers=[7])
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "token_layers"
    assert caught.value.detail["value"] == 7


def test_extraction_pixels_token_layers_rejected(client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        client.extract("pixels", "digits", "test", limit=30, token_layers=[0])
    assert caught.value.status_code == 422
    assert caught.value.detail["field"] == "token_layers"


def test_extraction_token_bytes_over_limit(
    settings: Any, redis_server: Any, tiny_vit: Path
) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(settings.model_copy(update={"max_token_bytes": 1000}))
    body = {
        "model": str(tiny_vit),
        "dataset": "digits",
        "split": "test",
        "limit": 30,
        "token_layers": [1],
    }
    with TestClient(app) as http:
        response = http.post("/v1/extractions", json=body)
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert detail["field"] == "token_layers"
    assert "LAYERBANK_MAX_TOKEN_BYTES=1000" in detail["message"]
    assert f"{30 * N_TOKENS * HIDDEN * 4} bytes" in detail["message"]
