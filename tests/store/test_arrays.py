"""Typed access to the arrays of a Zarr group."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.storage import MemoryStore

from store import LayoutError
from store.arrays import group_array


def _group() -> zarr.Group:
    group = zarr.open_group(MemoryStore(), path="projections/p1", mode="w")
    group.create_array("coords", data=np.zeros((3, 2)))
    group.create_group("labels")
    return group


def test_group_array_returns_array() -> None:
    array = group_array(_group(), "coords")
    assert isinstance(array, zarr.Array)
    assert array.shape == (3, 2)


def test_group_array_rejects_subgroup() -> None:
    with pytest.raises(LayoutError, match="projections/p1/labels") as caught:
        group_array(_group(), "labels")
    assert caught.value.field == "labels"
    assert caught.value.value == "projections/p1/labels"


def test_group_array_missing_raises_key_error() -> None:
    with pytest.raises(KeyError):
        group_array(_group(), "item_indices")
