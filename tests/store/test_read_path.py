"""Read path of complete feature sets: cached single rows, block-wise layer reads, .npy streams."""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zarr

import store.featureset
from store import FeatureSet, Store
from store.featureset import create_featureset
from store.spec import FeatureSetSpec

LAYERS, N_ITEMS, DIM, BLOCK_ROWS = [0, 2, 5], 150, 6, 64


def _complete_featureset(root: Path, dtype: str = "float16") -> tuple[FeatureSet, np.ndarray]:
    """Write a complete feature set of random features; return it and the float32 values."""
    # Each call stands for a different dataset: its own name and its own content fingerprint.
    token = uuid.uuid4().hex[:16]
    spec = FeatureSetSpec(
        model="tiny-igpt",
        model_revision="rev-1",
        model_family="imagegpt",
        dataset=f"digits-{token[:8]}",
        dataset_fingerprint=token,
        split="test",
        layers=LAYERS,
        pooling="mean",
        dtype=dtype,
    )
    features = np.random.default_rng(0).standard_normal((len(LAYERS), N_ITEMS, DIM))
    features = features.astype(dtype).astype(np.float32)
    featureset = create_featureset(
        Store(root),
        spec,
        layer_map=[{"layer": layer, "description": "test"} for layer in LAYERS],
        dim=DIM,
        labels=np.arange(N_ITEMS) % 10,
        item_ids=np.arange(N_ITEMS),
        class_names=[str(i) for i in range(10)],
        block_rows=BLOCK_ROWS,
    )
    for block in range(featureset.n_blocks):
        start, stop = featureset.block_range(block)
        featureset.write_block(block, features[:, start:stop])
    assert featureset.mark_complete()
    return featureset, features


@pytest.fixture()
def written(tmp_path: Path) -> tuple[FeatureSet, np.ndarray]:
    return _complete_featureset(tmp_path / "store")


@pytest.mark.parametrize("row", [0, 63, 64, 127, 128, 149])
def test_read_layer_single_row_matches_zarr(
    written: tuple[FeatureSet, np.ndarray], row: int
) -> None:
    featureset, features = written
    plain = zarr.open_array(featureset.store.zarr_store, path=f"{featureset.path}/features")
    got = featureset.read_layer(2, row, row + 1)
    assert got.shape == (1, DIM)
    np.testing.assert_array_equal(got, np.asarray(plain[1, row : row + 1]))


def test_read_layer_row_cached_once_per_block(
    written: tuple[FeatureSet, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    featureset, _ = written
    featureset.read_layer(5, 3, 4)
    cached = dict(featureset._chunks)
    featureset.read_layer(5, 10, 12)
    assert list(featureset._chunks) == [(2, 0)]
    assert featureset._chunks[(2, 0)] is cached[(2, 0)]


def test_cached_rows_none_until_block_decoded(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, features = written
    assert featureset.known_complete
    assert featureset.cached_rows(1, 70, 71) is None
    featureset.read_layer(2, 64, 65)
    np.testing.assert_array_equal(featureset.cached_rows(1, 70, 72), features[1, 70:72])
    assert featureset.cached_rows(1, 60, 70) is None  # spans two blocks
    assert featureset.cached_rows(0, 70, 71) is None  # another layer


def test_cached_rows_is_a_copy(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, features = written
    featureset.read_layer(0, 0, 1)
    rows = featureset.cached_rows(0, 5, 6)
    assert rows is not None
    rows[:] = 0
    np.testing.assert_array_equal(featureset.cached_rows(0, 5, 6), features[0, 5:6])


def test_open_featureset_only_returns_open_handles(
    written: tuple[FeatureSet, np.ndarray],
) -> None:
    featureset, _ = written
    fresh = Store(featureset.store.root)
    assert fresh.open_featureset(featureset.id) is None
    opened = fresh.featureset(featureset.id)
    assert fresh.open_featureset(featureset.id) is opened


def test_read_layer_whole_block_cached(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, features = written
    got = featureset.read_layer(0, BLOCK_ROWS, 2 * BLOCK_ROWS)
    np.testing.assert_array_equal(got, features[0, BLOCK_ROWS : 2 * BLOCK_ROWS])
    assert list(featureset._chunks) == [(0, 1)]


def test_read_layer_row_is_a_copy(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, features = written
    row = featureset.read_layer(0, 5, 6)
    row[:] = 0
    np.testing.assert_array_equal(featureset.read_layer(0, 5, 6), features[0, 5:6].astype("f2"))


def test_read_cache_evicts_oldest(
    written: tuple[FeatureSet, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    featureset, _ = written
    one_block = BLOCK_ROWS * DIM * 2  # float16
    monkeypatch.setattr(store.featureset, "READ_CACHE_BYTES", 2 * one_block)
    for block in range(3):
        featureset.read_layer(0, block * BLOCK_ROWS, block * BLOCK_ROWS + 1)
    assert list(featureset._chunks) == [(0, 1), (0, 2)]
    assert featureset._chunk_bytes <= 2 * one_block


def test_read_layer_across_blocks_skips_cache(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, features = written
    got = featureset.read_layer(2, 60, 70)
    np.testing.assert_array_equal(got, features[1, 60:70].astype("f2"))
    assert featureset._chunks == {}


def test_read_layer_empty_range_at_end(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, _ = written
    assert featureset.read_layer(0, N_ITEMS, N_ITEMS).shape == (0, DIM)


@pytest.mark.parametrize(("start", "stop"), [(0, N_ITEMS), (10, 140), (64, 128), (130, 131)])
def test_iter_layer_pieces_concatenate(
    written: tuple[FeatureSet, np.ndarray], start: int, stop: int
) -> None:
    featureset, features = written
    pieces = list(featureset.iter_layer(5, start, stop))
    assert all(len(piece) <= BLOCK_ROWS for piece in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), features[2, start:stop].astype("f2"))


def test_store_handle_reused_between_requests(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, _ = written
    reopened = featureset.store.featureset(featureset.id)
    assert featureset.store.featureset(featureset.id) is reopened


@pytest.fixture()
def served(api_url: str, stack_dirs: dict[str, Path]) -> dict[str, Any]:
    """A complete float32 feature set in the session API's store."""
    featureset, features = _complete_featureset(stack_dirs["store"], dtype="float32")
    return {"url": api_url, "featureset": featureset, "features": features}


def test_layer_npy_stream_matches_array(served: dict[str, Any]) -> None:
    featureset = served["featureset"]
    response = httpx.get(f"{served['url']}/v1/featuresets/{featureset.id}/layers/2", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(response.content))
    array = np.load(io.BytesIO(response.content), allow_pickle=False)
    np.testing.assert_array_equal(array, served["features"][1])


def test_layer_npy_stream_row_range(served: dict[str, Any]) -> None:
    featureset = served["featureset"]
    response = httpx.get(
        f"{served['url']}/v1/featuresets/{featureset.id}/layers/5",
        params={"start": 3, "stop": 141},
        timeout=30,
    )
    array = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, served["features"][2, 3:141])


def test_layer_single_row_json(served: dict[str, Any]) -> None:
    featureset = served["featureset"]
    response = httpx.get(
        f"{served['url']}/v1/featuresets/{featureset.id}/layers/0",
        params={"start": 64, "stop": 65, "format": "json"},
        timeout=30,
    )
    body = response.json()
    assert body["shape"] == [1, DIM]
    np.testing.assert_allclose(body["data"], served["features"][0, 64:65])


def test_layer_row_from_warm_cache_matches(served: dict[str, Any]) -> None:
    featureset = served["featureset"]
    url = f"{served['url']}/v1/featuresets/{featureset.id}/layers/2"
    params = {"start": 70, "stop": 72, "format": "json"}
    cold = httpx.get(url, params=params, timeout=30).json()
    warm = httpx.get(url, params=params, timeout=30).json()
    assert warm == cold
    np.testing.assert_allclose(warm["data"], served["features"][1, 70:72])


@pytest.mark.parametrize(
    ("layer", "params", "field"),
    [
        (7, {"start": 0, "stop": 1}, "layer"),
        (0, {"start": 5, "stop": 4}, "stop"),
        (0, {"start": 0, "stop": N_ITEMS + 1}, "stop"),
    ],
)
def test_layer_bad_request_after_warm_cache(
    served: dict[str, Any], layer: int, params: dict[str, int], field: str
) -> None:
    featureset = served["featureset"]
    base = f"{served['url']}/v1/featuresets/{featureset.id}/layers"
    assert httpx.get(f"{base}/0", params={"start": 0, "stop": 1}, timeout=30).status_code == 200
    response = httpx.get(f"{base}/{layer}", params={**params, "format": "json"}, timeout=30)
    assert 400 <= response.status_code < 500
    assert response.json()["detail"]["field"] == field


def test_layer_stream_client_leaves_early(served: dict[str, Any]) -> None:
    featureset = served["featureset"]
    url = f"{served['url']}/v1/featuresets/{featureset.id}/layers/2"
    with httpx.stream("GET", url, timeout=30) as response:
        first = next(response.iter_raw(128))
    assert first.startswith(b"\x93NUMPY")
    again = httpx.get(url, timeout=30)
    array = np.load(io.BytesIO(again.content), allow_pickle=False)
    np.testing.assert_array_equal(array, served["features"][1])


def test_handle_dropped_after_delete_elsewhere(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, _ = written
    store = Store(featureset.store.root)
    opened = store.featureset(featureset.id)
    opened.read_layer(0, 0, 1)  # decoded block cached in this handle
    # Another process deletes the group.
    shutil.rmtree(Path(store.root) / "featuresets" / featureset.id)
    assert store.open_featureset(featureset.id) is None
    assert store.find_featureset(featureset.id) is None


def test_handle_reopened_after_metadata_change(written: tuple[FeatureSet, np.ndarray]) -> None:
    featureset, _ = written
    store = Store(featureset.store.root)
    opened = store.featureset(featureset.id)
    # Another process rewrites the group's attributes (as finalising or a repair does).
    group = zarr.open_group(Store(store.root).zarr_store, path=featureset.path, mode="r+")
    group.attrs.update({"note": "rewritten"})
    reopened = store.featureset(featureset.id)
    assert reopened is not opened
    assert reopened.attrs["note"] == "rewritten"
