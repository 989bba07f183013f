"""Bad input to the API, one table row per case: each gets a 4xx whose detail names the field,
never a 5xx, and leaves the store as it was."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.app import _http_error
from service.client import Client
from service.routes.probes import describe_difference
from tests.conftest import wait_job

MISSING_ID = "0" * 24
# Marks a case that does not check the value its detail reports.
ANY_VALUE = object()


@dataclass(frozen=True)
class Case:
    """One bad request and the answer expected for it."""

    name: str
    method: str
    path: str
    body: Any = None
    status: tuple[int, ...] = (422,)
    field: str | None = None
    raw: bytes | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    # Substrings the detail's message must contain, and the value it must report.
    message: tuple[str, ...] = ()
    value: Any = ANY_VALUE


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _image_folder(root: Path, name: str, writer: Any) -> str:
    """Write an image folder of two classes, three images each; ``writer`` writes one file."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for index in range(3):
            writer(root / name / label / f"{index}.png", rng)
    return f"imagefolder:{root / name}"


@pytest.fixture(scope="module")
def data(stack_dirs: dict[str, Path]) -> dict[str, str]:
    """Dataset references of malformed files under the session's data root."""
    root = stack_dirs["data"] / "bad-input"
    rng = np.random.default_rng(0)
    refs: dict[str, str] = {}

    def npz(name: str, **arrays: Any) -> None:
        path = root / f"{name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        refs[name] = f"npz:{path}"

    labels = np.arange(6) % 2
    npz("six_channels", images=rng.integers(0, 255, (6, 8, 8, 6), dtype=np.uint8), labels=labels)
    npz("strips", images=rng.integers(0, 255, (6, 1, 1000, 3), dtype=np.uint8), labels=labels)
    nan = rng.random((6, 8, 8, 3)).astype(np.float32)
    nan[2, 3, 3, 0] = np.nan
    npz("nan_pixels", images=nan, labels=labels)
    infinite = rng.random((6, 8, 8, 3)).astype(np.float32)
    infinite[1, 0, 0, 2] = np.inf
    npz("inf_pixels", images=infinite, labels=labels)
    npz("empty", images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, np.int64))
    npz("no_labels", images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8))
    npz(
        "one_class",
        images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
        labels=np.zeros(6, np.int64),
    )
    npz(
        "label_count",
        images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
        labels=np.arange(4),
    )
    npz(
        "pets",
        images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
        labels=np.arange(6) % 2,
        class_names=np.array(["cat", "dog"]),
    )
    bad_file = root / "not_npz.npz"
    bad_file.write_bytes(b"this is not a zip archive")
    refs["not_npz"] = f"npz:{bad_file}"
    npy_file = root / "npy_as_npz.npz"
    with npy_file.open("wb") as handle:
        np.save(handle, np.zeros((6, 8, 8, 3), np.uint8))
    refs["npy_as_npz"] = f"npz:{npy_file}"

    def corrupt(path: Path, generator: np.random.Generator) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    def truncated(path: Path, generator: np.random.Generator) -> None:
        _png(path, generator.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        path.write_bytes(path.read_bytes()[:40])

    def rgba(path: Path, generator: np.random.Generator) -> None:
        _png(path, generator.integers(0, 255, (8, 8, 4), dtype=np.uint8), "RGBA")

    def sixteen_bit(path: Path, generator: np.random.Generator) -> None:
        _png(path, generator.integers(0, 65535, (8, 8), dtype=np.uint16))

    refs["corrupt_png"] = _image_folder(root, "corrupt", corrupt)
    refs["truncated_png"] = _image_folder(root, "truncated", truncated)
    refs["rgba_png"] = _image_folder(root, "rgba", rgba)
    refs["sixteen_bit_png"] = _image_folder(root, "sixteen", sixteen_bit)
    unsupported = stack_dirs["models"] / "bad-input-bert"
    unsupported.mkdir(parents=True, exist_ok=True)
    (unsupported / "config.json").write_text(json.dumps({"model_type": "bert_generation_x"}))
    refs["unsupported_model"] = str(unsupported)
    from transformers import ViTConfig, ViTModel

    no_processor = stack_dirs["models"] / "bad-input-vit-no-processor"
    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    ViTModel(config).save_pretrained(no_processor)
    refs["vit_no_processor"] = str(no_processor)
    return refs


@pytest.fixture(scope="module")
def featuresets(client: Client, tiny_model: Path, data: dict[str, str]) -> dict[str, str]:
    """Small complete feature sets the probe and projection cases refer to."""
    requests = {
        "pixels_train": ("pixels", "digits", "train", {"limit": 40}),
        "pixels_test": ("pixels", "digits", "test", {"limit": 20}),
        "tiny_test": (str(tiny_model), "digits", "test", {"limit": 20}),
        "tiny_two_layers": (str(tiny_model), "digits", "train", {"limit": 40, "layers": [0, 1]}),
        "pixels_three": ("pixels", "digits", "train", {"limit": 3}),
        "pixels_all": ("pixels", "digits", "all", {}),
        "pets": ("pixels", data["pets"], "all", {}),
    }
    ids = {}
    for name, (model, dataset, split, options) in requests.items():
        answer = client.extract(model, dataset, split, **options)
        state = wait_job(client, answer["job_id"], timeout=120)
        assert state is None or state["status"] == "finished", state
        ids[name] = answer["featureset_id"]
    return ids


def _with_literal(body: dict[str, Any], literal: str) -> bytes:
    """Return ``body`` as JSON with the string "LITERAL" replaced by ``literal``, a number that
    has no finite float, such as 1e400."""
    return json.dumps(body).replace('"LITERAL"', literal).encode()


def _extraction(**fields: Any) -> dict[str, Any]:
    return {"model": "pixels", "dataset": "digits", "split": "train", "limit": 20, **fields}


def _cases(data: dict[str, str], fs: dict[str, str], tiny: str, max_body: int) -> list[Case]:
    post_x, post_p, post_proj = "/v1/extractions", "/v1/probes", "/v1/projections"

    def probe(**fields: Any) -> dict[str, Any]:
        return {
            "train_featureset": fs["pixels_train"],
            "test_featureset": fs["pixels_test"],
            "kind": "logistic",
            **fields,
        }

    return [
        Case("unknown model", "POST", post_x, _extraction(model="no-such-model"), field="model"),
        Case(
            "model without hidden states",
            "POST",
            post_x,
            _extraction(model=data["unsupported_model"]),
            field="model",
        ),
        Case(
            "model without image processor",
            "POST",
            post_x,
            _extraction(model=data["vit_no_processor"]),
            field="model",
            message=("preprocessor_config.json", "save_pretrained"),
        ),
        Case(
            "input policy for pixels",
            "POST",
            post_x,
            _extraction(input_policy="sos"),
            field="input_policy",
            message=("ImageGPT models only", "pixels"),
            value="sos",
        ),
        Case(
            "layer out of range",
            "POST",
            post_x,
            _extraction(model=tiny, layers=[0, 7]),
            field="layers",
        ),
        Case(
            "negative layer", "POST", post_x, _extraction(model=tiny, layers=[-1]), field="layers"
        ),
        Case(
            "token layer out of range",
            "POST",
            post_x,
            _extraction(model=tiny, token_layers=[99]),
            field="token_layers",
            message=("token_layers", "99", "0.."),
            value=99,
        ),
        Case(
            "unknown extraction key",
            "POST",
            post_x,
            _extraction(layer=[0]),
            field="layer",
            message=("layer", "layers", "token_layers", "pooling"),
        ),
        Case("negative batch size", "POST", post_x, _extraction(batch_size=-4), field="batch_size"),
        Case("huge batch size", "POST", post_x, _extraction(batch_size=10**9), field="batch_size"),
        Case(
            "unknown dataset", "POST", post_x, _extraction(dataset="no-such-set"), field="dataset"
        ),
        Case("unknown split", "POST", post_x, _extraction(split="validation"), field="split"),
        Case(
            "dataset path with NUL",
            "POST",
            post_x,
            _extraction(dataset=data["pets"] + "\u0000"),
            field="dataset",
            message=("control characters",),
        ),
        Case(
            "split missing", "POST", post_x, {"model": "pixels", "dataset": "digits"}, field="split"
        ),
        Case(
            "empty dataset",
            "POST",
            post_x,
            _extraction(dataset=data["empty"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "labels missing",
            "POST",
            post_x,
            _extraction(dataset=data["no_labels"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "one class only",
            "POST",
            post_x,
            _extraction(dataset=data["one_class"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "label count differs",
            "POST",
            post_x,
            _extraction(dataset=data["label_count"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "not an npz file",
            "POST",
            post_x,
            _extraction(dataset=data["not_npz"], split="all", limit=None),
            field="dataset",
            message=("not a valid .npz (zip) archive", "numpy.savez", "images", "labels"),
        ),
        Case(
            "npy file named npz",
            "POST",
            post_x,
            _extraction(dataset=data["npy_as_npz"], split="all", limit=None),
            field="dataset",
            message=("not a valid .npz (zip) archive", "numpy.savez"),
        ),
        Case(
            "corrupt image file",
            "POST",
            post_x,
            _extraction(dataset=data["corrupt_png"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "truncated png",
            "POST",
            post_x,
            _extraction(dataset=data["truncated_png"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "six-channel arrays",
            "POST",
            post_x,
            _extraction(dataset=data["six_channels"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "nan pixel values",
            "POST",
            post_x,
            _extraction(dataset=data["nan_pixels"], split="all", limit=None),
            field="dataset",
        ),
        Case(
            "infinite pixel values",
            "POST",
            post_x,
            _extraction(dataset=data["inf_pixels"], split="all", limit=None),
            field="dataset",
        ),
        Case("unknown pooling", "POST", post_x, _extraction(pooling="max"), field="pooling"),
        Case("layers wrong type", "POST", post_x, _extraction(layers="first"), field="layers"),
        Case("limit wrong type", "POST", post_x, _extraction(limit="ten"), field="limit"),
        Case("model wrong type", "POST", post_x, _extraction(model=["pixels"]), field="model"),
        Case(
            "dataset path escape",
            "POST",
            post_x,
            _extraction(dataset="npz:../../etc/passwd.npz", split="all"),
            status=(403, 422),
            field="dataset",
        ),
        Case(
            "malformed json",
            "POST",
            post_x,
            raw=b'{"model": "pixels",',
            headers={"content-type": "application/json"},
            field="body",
        ),
        Case(
            "lone surrogate in a value",
            "POST",
            post_x,
            # json.dumps writes the lone surrogate as the escape \ud800, which is valid JSON.
            raw=json.dumps(_extraction(model="\ud800")).encode(),
            headers={"content-type": "application/json"},
            field="model",
            message=("\\ud800",),
        ),
        Case(
            "lone surrogate as a key",
            "POST",
            post_x,
            raw=json.dumps({**_extraction(), "\udfff": 1}).encode(),
            headers={"content-type": "application/json"},
            message=("\\udfff",),
        ),
        Case(
            "lone surrogate as a probe parameter",
            "POST",
            post_p,
            raw=json.dumps(probe(kind="knn", params={"\ud800": 1})).encode(),
            headers={"content-type": "application/json"},
            message=("\\ud800", "knn"),
        ),
        Case(
            "lone surrogate in a pretraining dataset path",
            "POST",
            "/v1/pretrain",
            raw=json.dumps(
                {"name": "bad-input-surrogate", "dataset": "npz:/x/\ud800.npz"}
            ).encode(),
            headers={"content-type": "application/json"},
            field="dataset",
            message=("\\ud800",),
        ),
        Case(
            "lone surrogate in an extraction model path",
            "POST",
            post_x,
            raw=json.dumps(_extraction(model="/models/\ud800")).encode(),
            headers={"content-type": "application/json"},
            field="model",
        ),
        Case(
            "body not utf-8",
            "POST",
            post_x,
            raw=b'{"model": "pixels", "dataset": "digits", "split": "\xff"}',
            headers={"content-type": "application/json"},
            field="body",
            message=("UTF-8", "position 51"),
        ),
        Case(
            "body utf-16 cut short",
            "POST",
            post_x,
            # A UTF-16 byte-order mark, then half of a two-byte character.
            raw=b"\xff\xfe\x7b",
            headers={"content-type": "application/json"},
            field="body",
            message=("as UTF-16", "truncated data", "send the JSON encoded as UTF-8"),
        ),
        Case(
            "body nested too deep",
            "POST",
            post_x,
            raw=b'{"a": ' * 3000 + b"1" + b"}" * 3000,
            headers={"content-type": "application/json"},
            field="body",
            message=("nested too deeply",),
        ),
        Case(
            "json array body",
            "POST",
            post_x,
            [1, 2, 3],
            field="body",
            message=("JSON object", "Content-Type: application/json"),
        ),
        Case(
            "json body sent as form data",
            "POST",
            post_x,
            raw=json.dumps(_extraction()).encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
            field="body",
            message=("JSON object", "Content-Type: application/json"),
        ),
        Case(
            "json body without content type",
            "POST",
            post_x,
            raw=json.dumps(_extraction()).encode(),
            field="body",
            message=("Content-Type: application/json",),
        ),
        Case(
            "pretrain params nested",
            "POST",
            "/v1/pretrain",
            {"name": "bad-input-nested", "params": {"steps": 20, "n_layer": 3}},
            field="params",
            message=("params", "n_layer", "steps", "learning_rate", "top level"),
        ),
        Case(
            "oversized body",
            "POST",
            post_x,
            raw=b'{"model": "' + b"x" * (max_body + 10) + b'"}',
            headers={"content-type": "application/json"},
            status=(413,),
            field="body",
        ),
        Case(
            "train and test differ in model",
            "POST",
            post_p,
            probe(test_featureset=fs["tiny_test"]),
            field="test_featureset",
        ),
        Case(
            "train and test differ in layer count",
            "POST",
            post_p,
            probe(train_featureset=fs["tiny_two_layers"], test_featureset=fs["tiny_test"]),
            field="test_featureset",
        ),
        Case(
            "train and test name classes differently",
            "POST",
            post_p,
            probe(test_featureset=fs["pets"]),
            field="test_featureset",
            message=("class 0", "'0'", "'cat'", "same classes"),
            value=fs["pets"],
        ),
        Case(
            "test classes missing from train",
            "POST",
            post_p,
            probe(train_featureset=fs["pixels_three"]),
            field="test_featureset",
            message=("test_featureset contains labels", "missing from train_featureset"),
        ),
        Case("probe layer not stored", "POST", post_p, probe(layers=[3]), field="layers"),
        Case(
            "probe params of a kind not an object",
            "POST",
            post_p,
            probe(params={"logistic": None}),
            field="params",
            message=("params.logistic is null, not an object",),
        ),
        Case(
            "probe params of a kind as pairs",
            "POST",
            post_p,
            probe(params={"logistic": [["C", 1]]}),
            field="params",
            message=('params.logistic is [["C", 1]], not an object',),
        ),
        Case(
            "probe kind list empty",
            "POST",
            post_p,
            probe(kind=[]),
            field="kind",
            message=("kind is an empty list", "logistic, knn"),
        ),
        Case(
            "probe kind named twice",
            "POST",
            post_p,
            probe(kind=["knn", "logistic", "knn"]),
            field="kind",
            message=("kind names knn more than once",),
        ),
        Case(
            "probe test set is the train set",
            "POST",
            post_p,
            probe(test_featureset=fs["pixels_train"]),
            field="test_featureset",
            message=("test_featureset", fs["pixels_train"], 'split "test"'),
            value=fs["pixels_train"],
        ),
        Case(
            "probe test set holds train items",
            "POST",
            post_p,
            probe(test_featureset=fs["pixels_all"]),
            field="test_featureset",
            message=("shares 40 of its 1797 items", "'train' and 'all'", 'split "test"'),
            value=fs["pixels_all"],
        ),
        Case("probe unknown kind", "POST", post_p, probe(kind="forest"), field="kind"),
        Case(
            "adapter probe on pixels",
            "POST",
            post_p,
            probe(kind="adapter"),
            field="kind",
            message=("adapter probes need an ImageGPT model", "'pixels'", "logistic, knn or mlp"),
            value="adapter",
        ),
        Case(
            "probe tol overflows to infinity",
            "POST",
            post_p,
            raw=_with_literal(probe(params={"logistic": {"tol": "LITERAL"}}), "1e400"),
            headers={"content-type": "application/json"},
            field="tol",
            value="inf",
        ),
        Case(
            "probe C grid with infinity",
            "POST",
            post_p,
            raw=_with_literal(probe(params={"logistic": {"C": [1, "LITERAL"]}}), "Infinity"),
            headers={"content-type": "application/json"},
            field="C",
        ),
        Case(
            "knn k above train size",
            "POST",
            post_p,
            probe(kind="knn", params={"k": [500]}),
            field="k",
        ),
        Case(
            "probe unknown feature set",
            "POST",
            post_p,
            probe(train_featureset=MISSING_ID),
            status=(404,),
            field="train_featureset",
        ),
        Case(
            "tsne on 3 points",
            "POST",
            post_proj,
            {"featureset": fs["pixels_test"], "layer": 0, "method": "tsne", "n_points": 3},
            field="n_points",
        ),
        Case(
            "projection layer true",
            "POST",
            post_proj,
            {"featureset": fs["pixels_test"], "layer": True, "method": "pca"},
            field="layer",
            message=("valid integer", "(got true)"),
        ),
        Case(
            "extraction layers of fractions",
            "POST",
            post_x,
            _extraction(layers=[1.5]),
            field="layers",
            message=("valid integer", "(got 1.5)"),
        ),
        Case(
            "projection layer as text",
            "POST",
            post_proj,
            {"featureset": fs["pixels_test"], "layer": "0", "method": "pca"},
            field="layer",
        ),
        Case("extraction limit as text", "POST", post_x, _extraction(limit="20"), field="limit"),
        Case("probe seed true", "POST", post_p, probe(seed=True), field="seed"),
        Case(
            "pretrain steps true",
            "POST",
            "/v1/pretrain",
            {"name": "bad-input-bool", "steps": True},
            field="steps",
        ),
        Case(
            "projection of missing layer",
            "POST",
            post_proj,
            {"featureset": fs["pixels_test"], "layer": 5, "method": "pca"},
            field="layer",
        ),
        Case("featureset id with dots", "GET", "/v1/featuresets/..", status=(404, 422)),
        Case("featureset id with slash", "GET", "/v1/featuresets/..%2F..%2Fetc", status=(404, 422)),
        Case("job id with dots", "GET", "/v1/jobs/a..b", field="job_id"),
        Case(
            "layer fetch with dotted id",
            "GET",
            "/v1/featuresets/a..b/layers/0",
            field="featureset_id",
        ),
        Case(
            "layer fetch negative start",
            "GET",
            f"/v1/featuresets/{fs['pixels_test']}/layers/0?start=-1",
            field="start",
        ),
        Case(
            "layer fetch stop past end",
            "GET",
            f"/v1/featuresets/{fs['pixels_test']}/layers/0?start=0&stop=999",
            field="stop",
        ),
        Case("fsck with dotted id", "GET", "/v1/featuresets/a..b/fsck", field="featureset_id"),
        Case(
            "layer fetch with encoded slashes",
            "GET",
            "/v1/featuresets/..%2F..%2Fetc/layers/1",
            status=(404,),
            message=("not found", "/docs"),
            value=None,
        ),
        Case(
            "checkpoints of name with slash",
            "GET",
            "/v1/models/a%2Fb/checkpoints",
            status=(404,),
            message=("not found", "/docs"),
            value=None,
        ),
        Case(
            "extractions with put",
            "PUT",
            post_x,
            _extraction(),
            status=(405,),
            message=("PUT", "POST"),
            value=None,
        ),
    ]


def _problems(case: Case, detail: Any) -> list[str]:
    """Return how ``detail`` differs from the project's error shape and from ``case``."""
    if not isinstance(detail, dict) or not {"message", "field", "value"} <= detail.keys():
        return [f"detail {detail!r} lacks message, field and value"]
    problems = []
    if case.field is not None and detail["field"] != case.field:
        problems.append(f"field {detail['field']!r} is not {case.field!r} in {detail!r}")
    for part in case.message:
        if part not in detail["message"]:
            problems.append(f"{part!r} not in message {detail['message']!r}")
    if case.value is not ANY_VALUE and detail["value"] != case.value:
        problems.append(f"value {detail['value']!r} is not {case.value!r}")
    return problems


def _snapshot(client: Client) -> tuple[list[str], list[str]]:
    featuresets = sorted(fs["featureset_id"] for fs in client.featuresets())
    probes = sorted(p["probe_id"] for p in client.request("GET", "/v1/probes").json()["data"])
    return featuresets, probes


def test_bad_input_table_is_4xx(
    client: Client,
    api_url: str,
    settings: Any,
    tiny_model: Path,
    data: dict[str, str],
    featuresets: dict[str, str],
) -> None:
    cases = _cases(data, featuresets, str(tiny_model), settings.max_body_bytes)
    assert len(cases) >= 30
    before = _snapshot(client)
    failures = []
    with httpx.Client(base_url=api_url, timeout=60) as http:
        for case in cases:
            if case.raw is not None:
                response = http.request(
                    case.method, case.path, content=case.raw, headers=case.headers
                )
            else:
                response = http.request(case.method, case.path, json=case.body)
            body = response.json() if "json" in response.headers.get("content-type", "") else {}
            detail = body.get("detail")
            if response.status_code not in case.status:
                failures.append(f"{case.name}: HTTP {response.status_code} {detail!r}")
            else:
                failures.extend(f"{case.name}: {problem}" for problem in _problems(case, detail))
    assert not failures, "\n".join(failures)
    assert _snapshot(client) == before


@pytest.mark.parametrize("name", ["rgba_png", "sixteen_bit_png"])
def test_bad_input_odd_images_accepted(client: Client, data: dict[str, str], name: str) -> None:
    answer = client.extract("pixels", data[name], "all")
    state = wait_job(client, answer["job_id"], timeout=60)
    assert state is not None and state["status"] == "finished", state
    # Pixels of normalised (n, 8, 8, 3) uint8 images.
    assert client.layer_array(answer["featureset_id"], 0).shape == (6, 192)


def test_method_not_allowed_keeps_allow_header(api_url: str) -> None:
    with httpx.Client(base_url=api_url, timeout=60) as http:
        response = http.put("/v1/extractions", json=_extraction())
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["detail"]["message"] == (
        "PUT is not allowed on /v1/extractions; use POST"
    )


def _request(path: str) -> Request:
    return Request(
        {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    )


def test_http_error_passes_dict_detail_through() -> None:
    detail = {"message": "API key missing", "field": "Authorization", "value": None}
    exc = HTTPException(401, detail=detail, headers={"WWW-Authenticate": "Bearer"})
    response = asyncio.run(_http_error(_request("/v1/models"), exc))
    assert response.status_code == 401
    assert json.loads(bytes(response.body)) == {"detail": detail}
    assert response.headers["www-authenticate"] == "Bearer"


def test_http_error_wraps_string_detail_keeping_headers() -> None:
    exc = HTTPException(401, detail="Unauthorized", headers={"WWW-Authenticate": "Bearer"})
    response = asyncio.run(_http_error(_request("/v1/models"), exc))
    body = json.loads(bytes(response.body))
    assert response.status_code == 401
    assert body["detail"]["message"] == "GET /v1/models failed: Unauthorized"
    assert body["detail"]["field"] is None
    assert body["detail"]["value"] is None
    assert response.headers["www-authenticate"] == "Bearer"


def test_http_error_keeps_written_detail() -> None:
    exc = HTTPException(404, detail="no such static file")
    response = asyncio.run(_http_error(_request("/static/x.js"), exc))
    message = json.loads(bytes(response.body))["detail"]["message"]
    assert message == "GET /static/x.js: no such static file"


def test_http_error_unregistered_status_code() -> None:
    exc = HTTPException(499, detail="client closed request")
    response = asyncio.run(_http_error(_request("/v1/models"), exc))
    assert response.status_code == 499
    message = json.loads(bytes(response.body))["detail"]["message"]
    assert message == "GET /v1/models: client closed request"


def test_overlap_found_in_sets_without_id_scope(
    featuresets: dict[str, str], stack_dirs: dict[str, Path]
) -> None:
    """Digits feature sets stored before the id scope was recorded are still compared."""
    import zarr

    from service.routes.probes import _check_disjoint
    from store import Store, StoreError

    store = Store(stack_dirs["store"])
    for name in ("pixels_train", "pixels_all"):
        group = zarr.open_group(store.zarr_store, path=f"featuresets/{featuresets[name]}")
        group.attrs.pop("item_ids_span_splits")
    train, test = (store.featureset(featuresets[n]) for n in ("pixels_train", "pixels_all"))
    assert train.ids_span_splits is None
    with pytest.raises(StoreError) as caught:
        _check_disjoint(train, test)
    assert caught.value.field == "test_featureset"
    assert "shares 40 of its 1797 items" in caught.value.message


def test_path_spellings_share_id_and_copies_overlap(
    client: Client, api_url: str, stack_dirs: dict[str, Path]
) -> None:
    """Two spellings of one path give one feature set. A copy of the file gives another, but it
    has the same fingerprint, so the ids of one split are compared."""
    import shutil

    root = stack_dirs["data"] / "bad-input"
    rng = np.random.default_rng(7)
    path = root / "spelling.npz"
    images = rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(12) % 3)
    shutil.copy(path, root / "spelling-copy.npz")
    ids = []
    spellings = (f"npz:{path}", f"npz:{root}//./spelling.npz", f"npz:{root}/spelling-copy.npz")
    for reference in spellings:
        answer = client.extract("pixels", reference, "all")
        state = wait_job(client, answer["job_id"], timeout=120)
        assert state is None or state["status"] == "finished", state
        ids.append(answer["featureset_id"])

    response = httpx.post(
        f"{api_url}/v1/probes",
        json={"train_featureset": ids[0], "test_featureset": ids[2], "kind": "knn"},
    )

    assert ids[0] == ids[1]
    assert ids[0] != ids[2]
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == "test_featureset"
    assert "shares 12 of its 12 items" in response.json()["detail"]["message"]


@pytest.mark.parametrize("layers", [[1.5], "ALL"])
def test_error_location_names_no_validator(api_url: str, layers: Any) -> None:
    """Locations read like the request: the integer type, not the function that converts it."""
    with httpx.Client(base_url=api_url, timeout=60) as http:
        response = http.post("/v1/extractions", json={**_extraction(), "layers": layers})

    assert response.status_code == 422
    locations = [problem["location"] for problem in response.json()["detail"]["errors"]]
    assert locations
    for location in locations:
        assert location.startswith("layers")
        assert "function" not in location
        assert "_integral" not in location


def test_processor_difference_names_keys() -> None:
    """Only the processor settings that differ are named, as JSON."""
    train = {"input_policy": "sos", "n_colors": 16, "resize": None}
    test = {"input_policy": "plain", "n_colors": 16}

    described = describe_difference("processor", train, test)

    assert (
        described == 'processor.input_policy ("sos" vs "plain"), processor.resize (null vs missing)'
    )
    assert describe_difference("pooling", "mean", "last") == 'pooling ("mean" vs "last")'
