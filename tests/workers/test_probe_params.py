"""Integer probe parameters: JSON Schema's integer includes floats with an integral value."""

from __future__ import annotations

import math
from typing import Any

import pytest

from workers.errors import ProbeError
from workers.probes.params import read_grid, read_int
from workers.probes.settings import normalise_params, read_mlp_settings


@pytest.mark.parametrize(("value", "expected"), [(2, 2), (2.0, 2), (1e3, 1000), (-0.0, 0)])
def test_read_int_accepts_integral_value(value: float, expected: int) -> None:
    read = read_int({"steps": value}, "steps", 1, low=0)

    assert read == expected
    assert type(read) is int


@pytest.mark.parametrize(
    "value", [2.5, 1e-3, True, False, "2", None, math.nan, math.inf, -math.inf]
)
def test_read_int_rejects_non_integer(value: Any) -> None:
    with pytest.raises(ProbeError) as caught:
        read_int({"steps": value}, "steps", 1, low=0)

    assert caught.value.field == "steps"
    assert caught.value.value is value
    assert f"steps must be an integer, got {value!r}" in caught.value.message


def test_read_int_range_applies_to_integral_float() -> None:
    with pytest.raises(ProbeError) as caught:
        read_int({"steps": 0.0}, "steps", 1, low=1, high=10)

    assert caught.value.field == "steps"
    assert "steps=0.0 is out of range" in caught.value.message
    assert "pass an integer [1, 10]" in caught.value.message


def test_read_grid_integer_accepts_integral_floats() -> None:
    grid, explicit = read_grid({"k": [5.0, 1e1, 5]}, "k", (1,), integer=True)

    assert grid == [5, 10]
    assert all(type(value) is int for value in grid)
    assert explicit


@pytest.mark.parametrize("value", [2.5, True, "3", math.nan, math.inf])
def test_read_grid_integer_rejects_non_integer(value: Any) -> None:
    with pytest.raises(ProbeError) as caught:
        read_grid({"k": [1, value]}, "k", (1,), integer=True)

    assert caught.value.field == "k"
    assert caught.value.value is value
    assert "k must be an integer" in caught.value.message


def test_knn_grid_of_floats_normalises_to_ints() -> None:
    """Equal grids give one probe id whether the caller wrote 5 or 5.0."""
    normalised = normalise_params("knn", {"k": [5.0, 5, 2e1]})

    assert normalised == {"k": [5, 20]}
    assert all(type(value) is int for value in normalised["k"])


def test_integral_float_params_normalise_to_ints() -> None:
    """An integer parameter written as 100.0 gives the probe id of 100."""
    normalised = normalise_params("mlp", {"max_epochs": 1e2, "lr": 0.5, "hidden": [32.0]})

    assert normalised == {"max_epochs": 100, "lr": 0.5, "hidden": [32]}
    assert type(normalised["max_epochs"]) is int
    assert type(normalised["hidden"][0]) is int


def test_mlp_settings_read_integral_floats() -> None:
    settings = read_mlp_settings({"max_epochs": 1e2, "hidden": 32.0, "batch_size": 64.0})

    assert settings.max_epochs == 100
    assert type(settings.max_epochs) is int
    assert settings.hidden == 32
    assert type(settings.hidden) is int
    assert settings.batch_size == 64
    assert type(settings.batch_size) is int
