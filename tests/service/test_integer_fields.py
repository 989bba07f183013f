"""Integer fields of request bodies accept ints and floats with an integral value, such as 2.0
and 1e3, as JSON Schema's integer does, and reject every other value."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from service.client import Client
from service.schemas import ExtractionCreate, PretrainCreate, ProbeCreate, ProjectionCreate

SOME_ID = "0" * 24
# The smallest valid body of each request model.
REQUIRED: dict[type[BaseModel], dict[str, Any]] = {
    ExtractionCreate: {"model": "pixels", "dataset": "digits", "split": "train"},
    ProbeCreate: {"train_featureset": SOME_ID, "test_featureset": SOME_ID},
    PretrainCreate: {"name": "integer-fields"},
    ProjectionCreate: {"featureset": SOME_ID, "layer": 0},
}


def _integer_schema(schema: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Return ("scalar" or "list", the integer's schema) if ``schema`` admits an integer."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "integer":
            return "scalar", option
        if option.get("type") == "array" and option.get("items", {}).get("type") == "integer":
            return "list", option["items"]
    return None


def _integer_fields() -> list[tuple[type[BaseModel], str, str, int]]:
    """Return (model, field, "scalar" or "list", a valid value) for every integer field."""
    fields = []
    for model in REQUIRED:
        for name, schema in model.model_json_schema()["properties"].items():
            found = _integer_schema(schema)
            if found is not None:
                shape, integer = found
                fields.append((model, name, shape, int(integer.get("minimum", 0)) + 1))
    return fields


INTEGER_FIELDS = _integer_fields()


def test_integer_fields_found() -> None:
    names = {(model.__name__, name) for model, name, _, _ in INTEGER_FIELDS}

    assert ("ExtractionCreate", "seed") in names
    assert ("ExtractionCreate", "layers") in names
    assert ("ExtractionCreate", "token_layers") in names
    assert ("ProbeCreate", "layers") in names
    assert ("PretrainCreate", "steps") in names
    assert ("ProjectionCreate", "n_points") in names


@pytest.mark.parametrize(
    ("model", "name"),
    [(model, name) for model, name, _, _ in INTEGER_FIELDS],
    ids=[f"{model.__name__}.{name}" for model, name, _, _ in INTEGER_FIELDS],
)
def test_integer_field_bounds_are_json_schema(model: type[BaseModel], name: str) -> None:
    """Bounds read minimum and maximum, never pydantic's own ge and le."""
    found = _integer_schema(model.model_json_schema()["properties"][name])

    assert found is not None
    assert not {"ge", "gt", "le", "lt"} & found[1].keys(), found[1]


def test_optional_integer_keeps_bounds_in_schema() -> None:
    batch_size = _integer_schema(ExtractionCreate.model_json_schema()["properties"]["batch_size"])

    assert batch_size is not None
    assert batch_size[1]["minimum"] == 1
    assert batch_size[1]["maximum"] == 4096


@pytest.mark.parametrize(
    ("model", "name", "shape", "value"),
    INTEGER_FIELDS,
    ids=[f"{model.__name__}.{name}" for model, name, _, _ in INTEGER_FIELDS],
)
def test_integer_field_accepts_integral_float(
    model: type[BaseModel], name: str, shape: str, value: int
) -> None:
    sent: Any = float(value) if shape == "scalar" else [float(value)]
    body = json.dumps({**REQUIRED[model], name: sent})

    read = getattr(model.model_validate_json(body), name)

    expected = value if shape == "scalar" else [value]
    assert read == expected
    assert type(read if shape == "scalar" else read[0]) is int


@pytest.mark.parametrize(
    ("model", "name", "shape", "value"),
    INTEGER_FIELDS,
    ids=[f"{model.__name__}.{name}" for model, name, _, _ in INTEGER_FIELDS],
)
def test_integer_field_rejects_fraction(
    model: type[BaseModel], name: str, shape: str, value: int
) -> None:
    sent: Any = value + 0.5 if shape == "scalar" else [value + 0.5]

    with pytest.raises(ValidationError) as caught:
        model.model_validate_json(json.dumps({**REQUIRED[model], name: sent}))

    assert caught.value.errors()[0]["loc"][0] == name


def test_integral_float_keeps_bounds() -> None:
    with pytest.raises(ValidationError) as caught:
        ExtractionCreate.model_validate_json(
            '{"model": "pixels", "dataset": "digits", "split": "train", "seed": -1.0}'
        )

    assert caught.value.errors()[0]["type"] == "greater_than_equal"


def _post_extraction(api_url: str, fields: str) -> httpx.Response:
    """POST an extraction whose body ends with ``fields``, written as raw JSON text."""
    body = '{"model": "pixels", "dataset": "digits", "split": "train", ' + fields + "}"
    with httpx.Client(base_url=api_url, timeout=60) as http:
        return http.post(
            "/v1/extractions", content=body, headers={"content-type": "application/json"}
        )


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("2.5", 2.5),
        ("1e-3", 0.001),
        ("true", True),
        ('"2"', "2"),
        ("NaN", "nan"),
        ("Infinity", "inf"),
        ("-Infinity", "-inf"),
        ("1e400", "inf"),
        # Integral, but echoed as sent rather than as its 301-digit int.
        ("1e300", 1e300),
    ],
)
def test_extraction_seed_non_integer_is_422(api_url: str, literal: str, value: Any) -> None:
    response = _post_extraction(api_url, f'"limit": 20, "seed": {literal}')

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["field"] == "seed"
    assert detail["value"] == value
    assert detail["message"].startswith("seed: Input should be a valid integer")
    assert f"(got {json.dumps(value)})" in detail["message"]


def test_extraction_layers_fraction_is_422(api_url: str) -> None:
    response = _post_extraction(api_url, '"layers": [0, 0.5]')

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["field"] == "layers"
    assert detail["value"] == 0.5
    assert "valid integer" in detail["message"]


def test_extraction_integral_floats_same_featureset(client: Client, api_url: str) -> None:
    """2.0 and 1e1 give the feature set that 2 and 10 give: the id is computed from ints."""
    as_ints = client.extract(
        "pixels", "digits", "train", limit=10, seed=2, block_rows=5, layers=[0]
    )

    response = _post_extraction(
        api_url, '"limit": 1e1, "seed": 2.0, "block_rows": 5.0, "layers": [0.0]'
    )

    assert response.status_code in (200, 202), response.text
    answer = response.json()
    assert answer["featureset_id"] == as_ints["featureset_id"]
    assert answer["created"] is False
    spec = client.featureset(answer["featureset_id"])["spec"]
    assert spec["limit"] == 10
    assert spec["seed"] == 2
