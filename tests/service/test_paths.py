"""Paths and ids from requests: only the configured roots are read, ids never reach the store."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from store.settings import Settings

REPOSITORY = Path(__file__).resolve().parents[2]
# A Redis database of the session's private server that only this module uses. It has no keys,
# so the app runs open and these tests reach the path checks behind the key check.
PATHS_DB = 7


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A data root, a model root and an outside directory with a dataset and a checkpoint."""
    base = tmp_path_factory.mktemp("paths")
    layout = {name: base / name for name in ("data", "models", "outside", "store")}
    for path in layout.values():
        path.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    np.savez(layout["outside"] / "secret.npz", images=images, labels=np.arange(8) % 2)
    for label in ("a", "b"):
        (layout["outside"] / "folder" / label).mkdir(parents=True)
    (layout["outside"] / "cifar").mkdir()
    (layout["outside"] / "model").mkdir()
    (layout["outside"] / "model" / "config.json").write_text('{"model_type": "imagegpt"}')
    # Links inside the roots that point out of them.
    (layout["data"] / "link.npz").symlink_to(layout["outside"] / "secret.npz")
    (layout["data"] / "linkdir").symlink_to(layout["outside"] / "folder")
    (layout["models"] / "linkmodel").symlink_to(layout["outside"] / "model")
    return layout


@pytest.fixture(scope="module")
def paths_client(
    settings: Settings, redis_server: Any, roots: dict[str, Path]
) -> Iterator[TestClient]:
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{PATHS_DB}"
    Redis.from_url(redis_url).flushdb()
    app = create_app(
        settings.model_copy(
            update={
                "store": str(roots["store"]),
                "redis_url": redis_url,
                "data_roots": [roots["data"]],
                "model_roots": [roots["models"]],
                "allow_hub": False,
            }
        )
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _dataset_cases(roots: dict[str, Path]) -> list[str]:
    data, outside = roots["data"], roots["outside"]
    return [
        f"npz:{outside / 'secret.npz'}",
        f"npz:{data}/../outside/secret.npz",
        f"npz:{data / 'link.npz'}",
        f"imagefolder:{outside / 'folder'}",
        f"imagefolder:{data}/../outside/folder",
        f"imagefolder:{data / 'linkdir'}",
        f"cifar:{outside / 'cifar'}",
        f"cifar:{data}/../outside/cifar",
        "npz:/etc/passwd",
    ]


def test_paths_datasets_outside_roots_rejected(
    paths_client: TestClient, roots: dict[str, Path]
) -> None:
    statuses = {}
    for dataset in _dataset_cases(roots):
        response = paths_client.post(
            "/v1/extractions", json={"model": "pixels", "dataset": dataset, "split": "train"}
        )
        statuses[dataset] = response.status_code
    assert statuses == {dataset: 403 for dataset in statuses}


def test_paths_dataset_message_names_roots(
    paths_client: TestClient, roots: dict[str, Path]
) -> None:
    response = paths_client.post(
        "/v1/extractions",
        json={
            "model": "pixels",
            "dataset": f"npz:{roots['outside'] / 'secret.npz'}",
            "split": "train",
        },
    )
    assert str(roots["data"].resolve()) in response.json()["detail"]["message"]


def test_paths_models_outside_roots_rejected(
    paths_client: TestClient, roots: dict[str, Path]
) -> None:
    models, outside = roots["models"], roots["outside"]
    statuses = {}
    for model in (
        str(outside / "model"),
        f"{models}/../outside/model",
        str(models / "linkmodel"),
        "/etc",
    ):
        response = paths_client.post(
            "/v1/extractions", json={"model": model, "dataset": "digits", "split": "train"}
        )
        statuses[model] = response.status_code
    assert statuses == {model: 403 for model in statuses}


def test_paths_model_message_names_roots(paths_client: TestClient, roots: dict[str, Path]) -> None:
    response = paths_client.post(
        "/v1/extractions",
        json={"model": str(roots["outside"] / "model"), "dataset": "digits", "split": "train"},
    )
    assert str(roots["models"]) in response.json()["detail"]["message"]


def test_paths_store_model_name_traversal_rejected(paths_client: TestClient) -> None:
    response = paths_client.post(
        "/v1/extractions",
        json={"model": "store:../outside/model", "dataset": "digits", "split": "train"},
    )
    assert response.status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/v1/featuresets/..",
        "/v1/featuresets/..%2F..%2Fetc",
        "/v1/featuresets/%2E%2E",
        "/v1/featuresets/" + "a" * 25,
        "/v1/featuresets/" + "0" * 4096,
        "/v1/featuresets/ABCDEF0123456789ABCDEF01",
        "/v1/featuresets/..%2F..%2Fetc/labels",
        "/v1/jobs/..%2F..",
        "/v1/jobs/" + "f" * 300,
        "/v1/probes/..%5C..",
        "/v1/probes/" + "0" * 23 + "%00",
    ],
)
def test_paths_invalid_ids_rejected(
    paths_client: TestClient, roots: dict[str, Path], path: str
) -> None:
    response = paths_client.get(path)
    assert response.status_code in (404, 422)
    assert str(roots["store"]) not in response.text


def test_paths_invalid_id_delete_rejected(paths_client: TestClient, roots: dict[str, Path]) -> None:
    response = paths_client.delete("/v1/featuresets/..%2F..%2Fstore")
    assert response.status_code in (404, 422)
    assert roots["store"].is_dir()


# -- model loading --------------------------------------------------------------------------------


def test_models_trust_remote_code_never_true() -> None:
    pattern = re.compile(r"trust_remote_code[\"']?\s*[:=]\s*True")
    offenders = [
        str(path.relative_to(REPOSITORY))
        for package in ("store", "workers", "service")
        for path in (REPOSITORY / package).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


def test_models_safetensors_preferred_over_pickle(tiny_model: Path, tmp_path: Path) -> None:
    from workers.modelref import resolve_model
    from workers.models import load_model

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_model, checkpoint)
    assert (checkpoint / "model.safetensors").is_file()
    # Not a pickle at all: loading it would raise, so a successful load read the safetensors.
    (checkpoint / "pytorch_model.bin").write_bytes(b"not a pickle")
    ref = resolve_model(str(checkpoint), models_dir=None, allowed_roots=[tmp_path], allow_hub=False)
    model = load_model(ref, device="cpu")
    assert model is not None


@pytest.mark.parametrize("spelling", ["{dir}/", "{parent}//./{name}", "{parent}/./{name}/."])
def test_model_path_spellings_one_ref(tiny_model: Path, spelling: str) -> None:
    """One checkpoint directory is one model reference, so one feature-set id."""
    from workers.modelref import resolve_model

    written = spelling.format(dir=tiny_model, parent=tiny_model.parent, name=tiny_model.name)
    plain = resolve_model(str(tiny_model), models_dir=None, allow_hub=False)
    other = resolve_model(written, models_dir=None, allow_hub=False)
    assert other.ref == plain.ref == str(tiny_model)


def test_relative_model_path_under_roots_rejected(tiny_model: Path) -> None:
    """With model roots, a relative path would be resolved against the API's working
    directory, so it is rejected with a request for an absolute path."""
    import os

    from workers.errors import PathNotAllowedError
    from workers.modelref import resolve_model

    relative = os.path.relpath(tiny_model)
    with pytest.raises(PathNotAllowedError) as caught:
        resolve_model(relative, models_dir=None, allowed_roots=[tiny_model.parent], allow_hub=False)
    assert caught.value.field == "model"
    assert "absolute path" in caught.value.message
    assert os.getcwd() not in caught.value.message


def test_allow_list_path_matches_other_spelling(tiny_model: Path) -> None:
    from workers.modelref import resolve_model

    allowed = [f"{tiny_model}/", "store:approved"]
    ref = resolve_model(f"{tiny_model}//.", models_dir=None, allow_hub=False, allow_list=allowed)
    assert ref.ref == str(tiny_model)


def test_model_path_through_missing_folder_rejected(tiny_model: Path) -> None:
    from workers.errors import ModelError
    from workers.modelref import resolve_model

    written = f"{tiny_model.parent}/missing/../{tiny_model.name}"
    with pytest.raises(ModelError, match="no such directory") as caught:
        resolve_model(written, models_dir=None, allow_hub=False)
    assert caught.value.field == "model"
    assert caught.value.value == written


def test_models_allow_list_rejects_other_models(
    settings: Settings, redis_server: Any, roots: dict[str, Path]
) -> None:
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{PATHS_DB}"
    app = create_app(
        settings.model_copy(
            update={
                "store": str(roots["store"]),
                "redis_url": redis_url,
                "model_roots": [roots["models"]],
                "model_allow_list": ["store:approved"],
                "allow_hub": False,
            }
        )
    )
    with TestClient(app) as client:
        response = client.post(
            "/v1/extractions",
            json={"model": "openai/imagegpt-small", "dataset": "digits", "split": "train"},
        )
    assert response.status_code == 422
    assert "allow-list" in response.json()["detail"]["message"]


def test_models_allow_list_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERBANK_MODEL_ALLOW_LIST", "store:a, openai/imagegpt-small")
    assert Settings().model_allow_list == ["store:a", "openai/imagegpt-small"]
