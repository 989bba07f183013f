"""FeatureSet.write_block on real Zarr: values the stored dtype cannot hold are never written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import FeatureSet, NonFiniteFeaturesError
from tests.factories import pending_featureset

LAYERS, N_ITEMS, DIM, BLOCK_ROWS = [0, 1], 20, 4, 10


def _pending(tmp_path: Path, dtype: str) -> FeatureSet:
    return pending_featureset(
        tmp_path / "store",
        n_items=N_ITEMS,
        dim=DIM,
        layers=tuple(LAYERS),
        dtype=dtype,
        block_rows=BLOCK_ROWS,
    )


def _block(value: float) -> np.ndarray:
    features = np.ones((len(LAYERS), BLOCK_ROWS, DIM), dtype=np.float32)
    features[1, 3, 2] = value
    return features


def test_float16_overflow_names_dtype(tmp_path: Path) -> None:
    featureset = _pending(tmp_path, "float16")
    with pytest.raises(NonFiniteFeaturesError) as caught:
        featureset.write_block(0, _block(1.0e5))
    assert caught.value.field == "dtype"
    assert caught.value.value == "float16"
    assert "65504" in caught.value.message
    assert "float32" in caught.value.message
    assert caught.value.permanent
    assert featureset.missing_blocks() == [0, 1]


def test_float16_in_range_is_written(tmp_path: Path) -> None:
    featureset = _pending(tmp_path, "float16")
    featureset.write_block(0, _block(6.0e4))
    assert featureset.missing_blocks() == [1]
    assert featureset.features[1, 3, 2] == np.float16(6.0e4)


def test_model_nan_is_permanent(tmp_path: Path) -> None:
    featureset = _pending(tmp_path, "float32")
    with pytest.raises(NonFiniteFeaturesError) as caught:
        featureset.write_block(1, _block(float("nan")))
    assert caught.value.field == "model"
    assert caught.value.value == "tiny-vit"
    assert "NaN or infinity" in caught.value.message
    assert "check the checkpoint" in caught.value.message
    assert caught.value.permanent
    assert featureset.missing_blocks() == [0, 1]
