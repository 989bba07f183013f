"""Integer probe parameters: JSON Schema's integer includes floats with an integral value."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from workers.errors import ProbeError
from workers.probes.params import (
    MAX_GRID_VALUES,
    check_known,
    format_json,
    read_choice,
    read_float,
    read_grid,
    read_int,
)
from workers.probes.settings import (
    fit_part_size,
    normalise_params,
    read_adapter_settings,
    read_mlp_settings,
)


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
    assert f"steps must be an integer, got {json.dumps(value)}" in caught.value.message


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


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("adapter", "for an adapter probe"),
        ("mlp", "for an mlp probe"),
        ("logistic", "for a logistic probe"),
        ("knn", "for a knn probe"),
    ],
)
def test_unknown_param_article(kind: str, expected: str) -> None:
    with pytest.raises(ProbeError) as caught:
        check_known({"C": 1}, kind, ())

    assert caught.value.field == "C"
    assert f"unknown parameter 'C' {expected};" in caught.value.message


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "null"), (True, "true"), (False, "false"), ("2", '"2"'), ([1], "[1]")],
)
def test_int_message_shows_json(value: Any, shown: str) -> None:
    with pytest.raises(ProbeError) as caught:
        read_int({"max_iter": value}, "max_iter", 1)

    assert caught.value.message == f"max_iter must be an integer, got {shown}"
    assert caught.value.value is value


@pytest.mark.parametrize(("value", "shown"), [(None, "null"), (True, "true"), ("x", '"x"')])
def test_float_message_shows_json(value: Any, shown: str) -> None:
    with pytest.raises(ProbeError) as caught:
        read_float({"lr": value}, "lr", 1e-3)

    assert caught.value.message == f"lr must be a finite number, got {shown}"


def test_float_range_message_shows_json() -> None:
    with pytest.raises(ProbeError) as caught:
        read_float({"lr": 2.0}, "lr", 1e-3, low=0.0, high=1.0)

    assert "lr=2.0 is out of range" in caught.value.message


def test_choice_message_shows_json() -> None:
    with pytest.raises(ProbeError) as caught:
        read_choice({"engine": None}, "engine", "sklearn", ("sklearn", "torch"))

    assert caught.value.message == 'engine=null is not supported; use one of "sklearn", "torch"'
    assert caught.value.field == "engine"


def test_grid_too_long_value_is_grid() -> None:
    grid = [float(c) for c in range(1, MAX_GRID_VALUES + 2)]

    with pytest.raises(ProbeError) as caught:
        read_grid({"C": grid}, "C", (1.0,))

    assert caught.value.field == "C"
    assert caught.value.value == grid
    assert f"C grid has {MAX_GRID_VALUES + 1} distinct values" in caught.value.message


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "null"),
        ({"a": [1.5, True]}, '{"a": [1.5, true]}'),
        ("café", '"café"'),
        ("\ud800", '"\\ud800"'),
        (math.nan, "NaN"),
        ({1, 2}, "{1, 2}"),
    ],
)
def test_format_json(value: Any, shown: str) -> None:
    assert format_json(value) == shown


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_val_fraction_one_item_per_class(fraction: float) -> None:
    """No val_fraction helps: the split keeps one item of each class for fitting."""
    labels = np.arange(10)

    with pytest.raises(ProbeError) as caught:
        fit_part_size({"val_fraction": fraction}, labels)

    message = caught.value.message
    assert caught.value.field == "val_fraction"
    assert "each class needs at least 2 train items" in message
    assert "larger limit" in message
    assert "pass a larger val_fraction" not in message


def test_val_fraction_too_small_names_fraction() -> None:
    """With two items per class, a larger val_fraction does leave validation items."""
    labels = np.repeat(np.arange(10), 2)

    with pytest.raises(ProbeError) as caught:
        fit_part_size({"val_fraction": 0.2}, labels)

    assert caught.value.field == "val_fraction"
    assert caught.value.value == 0.2
    assert "val_fraction=0.2 leaves no validation items out of 20" in caught.value.message
    assert "pass a larger val_fraction" in caught.value.message
    assert fit_part_size({"val_fraction": 0.5}, labels) == 10


def test_val_fraction_one_class_of_two_items() -> None:
    """One class with two items is enough for a val_fraction above 0.25."""
    labels = np.array([0, 1, 2, 2])

    with pytest.raises(ProbeError) as caught:
        fit_part_size({"val_fraction": 0.2}, labels)

    assert "pass a larger val_fraction" in caught.value.message
    assert fit_part_size({"val_fraction": 0.5}, labels) == 3


def test_defaults_written_out_are_left_out() -> None:
    """A default written out gives the probe id of the request that leaves it out."""
    y_train = np.repeat(np.arange(4), 25)

    logistic = normalise_params(
        "logistic", {"engine": "torch", "tol": 1e-6, "max_iter": 1000.0, "C": 2}, y_train
    )
    knn = normalise_params("knn", {"engine": "torch", "val_fraction": 0.2}, y_train)

    assert logistic == {"engine": "torch", "C": [2.0]}
    assert knn == {}


def test_parameter_others_need_is_kept() -> None:
    """engine stays when c_batch, a torch-only parameter, needs it."""
    y_train = np.repeat(np.arange(4), 25)

    normalised = normalise_params("logistic", {"engine": "torch", "c_batch": 2}, y_train)

    assert normalised == {"engine": "torch", "c_batch": 2}


def test_c_batch_whole_grid_dropped() -> None:
    """A c_batch that covers the whole C grid runs it at once, as no c_batch does."""
    y_train = np.repeat(np.arange(4), 25)
    plain = normalise_params("logistic", {"engine": "torch", "C": [0.1, 1.0]}, y_train)

    for c_batch in (2, 3, 100):
        normalised = normalise_params(
            "logistic", {"engine": "torch", "C": [0.1, 1.0], "c_batch": c_batch}, y_train
        )
        assert normalised == plain


def test_layer_batch_beyond_layers_clamped() -> None:
    """A layer_batch above the number of layers makes the same batches as that number; with
    one layer every layer_batch, and none, fits it alone."""
    y_train = np.repeat(np.arange(4), 25)

    def normalised(layer_batch: int, n_layers: int) -> dict:
        params = {"engine": "torch", "layer_batch": layer_batch}
        return normalise_params("logistic", params, y_train, n_layers=n_layers)

    assert normalised(5, 5) == normalised(128, 5) == {"engine": "torch", "layer_batch": 5}
    assert normalised(2, 5) == {"engine": "torch", "layer_batch": 2}
    assert normalised(1, 1) == normalised(64, 1) == {"engine": "torch"}


def test_train_eval_items_beyond_train_dropped() -> None:
    """kNN scores at most every train item, so any train_eval_items from the train size on
    reads as the default does on a train set of that size."""
    y_train = np.repeat(np.arange(4), 25)

    for items in (100, 101, 4999, 10**6):
        assert normalise_params("knn", {"train_eval_items": items}, y_train) == {}
    assert normalise_params("knn", {"train_eval_items": 99}, y_train) == {"train_eval_items": 99}


@pytest.mark.parametrize("engine", ["banana", [1, 2], None])
def test_adapter_engine_must_be_torch(engine: Any) -> None:
    with pytest.raises(ProbeError) as caught:
        read_adapter_settings({"engine": engine})

    assert caught.value.field == "engine"
    assert "torch" in caught.value.message


def test_huge_integral_float_echoed_as_sent() -> None:
    """1e300 is integral, but a grid of k reports it as sent, not as a 301-digit int."""
    with pytest.raises(ProbeError) as caught:
        read_grid({"k": [1e300]}, "k", (1,), integer=True)

    assert caught.value.value == 1e300
    assert "k=1e+300 is out of range" in caught.value.message
    assert len(caught.value.message) < 200
