"""A store whose root is an fsspec URL, as a team's ``s3://bucket/prefix`` store is.

fsspec's in-memory file system replaces object storage here: ``Store`` sends every URL with a
scheme other than ``file://`` through zarr's ``FsspecStore``, the path an S3 root takes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import numpy as np
import pytest
import zarr

from store import DamagedChunkError, NotFoundError, NotReadyError, Store
from store.featureset import FeatureSet, create_featureset
from store.spec import FeatureSetSpec

N_LAYERS, N_ITEMS, DIM, BLOCK_ROWS = 3, 10, 4, 4


@pytest.fixture()
def memory_root() -> Iterator[str]:
    """A fresh ``memory://`` root, removed afterwards (the memory file system is per process)."""
    root = f"memory://layerbank-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def make_spec() -> FeatureSetSpec:
    return FeatureSetSpec(
        model="tiny-igpt",
        model_revision="rev-1",
        model_family="imagegpt",
        dataset="digits",
        dataset_fingerprint="0" * 16,
        split="test",
        layers=list(range(N_LAYERS)),
        pooling="mean",
    )


def make_featureset(store: Store) -> FeatureSet:
    return create_featureset(
        store,
        make_spec(),
        layer_map=[{"layer": i, "description": f"hidden state {i}"} for i in range(N_LAYERS)],
        dim=DIM,
        labels=np.arange(N_ITEMS) % 3,
        item_ids=np.arange(N_ITEMS),
        class_names=["zero", "one", "two"],
        block_rows=BLOCK_ROWS,
    )


def features(seed: int = 0) -> np.ndarray:
    """Array of shape (n_layers, n_items, dim)."""
    return np.random.default_rng(seed).standard_normal((N_LAYERS, N_ITEMS, DIM)).astype(np.float32)


def test_fsspec_store_uses_fsspec_backend(memory_root: str) -> None:
    store = Store(memory_root)
    assert store.local_root is None
    assert isinstance(store.zarr_store, zarr.storage.FsspecStore)


def test_fsspec_store_round_trip(memory_root: str) -> None:
    expected = features()
    featureset = make_featureset(Store(memory_root))
    for block in range(featureset.n_blocks):
        start, stop = featureset.block_range(block)
        featureset.write_block(block, expected[:, start:stop])
    assert featureset.mark_complete()

    # A second Store on the same URL stands for another worker or API replica.
    reopened = Store(memory_root).featureset(featureset.id)
    assert reopened.is_complete
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(reopened.read_layer(layer), expected[layer])
    np.testing.assert_array_equal(reopened.read_labels(), np.arange(N_ITEMS) % 3)


def test_fsspec_store_deleted_shard_is_an_error(memory_root: str) -> None:
    featureset = make_featureset(Store(memory_root))
    for block in range(featureset.n_blocks):
        start, stop = featureset.block_range(block)
        featureset.write_block(block, features()[:, start:stop])
    assert featureset.mark_complete()
    fs = fsspec.filesystem("memory")
    fs.rm(f"{memory_root.removeprefix('memory://')}/{featureset.path}/features/c/0/1/0")

    # zarr reads a missing shard as fill values (NaN); a complete feature set has none.
    reopened = Store(memory_root).featureset(featureset.id)
    np.testing.assert_array_equal(reopened.read_layer(0, 0, BLOCK_ROWS), features()[0, :BLOCK_ROWS])
    with pytest.raises(
        DamagedChunkError,
        match=r"block 1 at layer position 2 .* contains values that are not finite",
    ):
        reopened.read_layer(2)
    with pytest.raises(DamagedChunkError, match="fsck/repair"):
        list(reopened.iter_layer(0, BLOCK_ROWS))


def test_fsspec_store_lists_featuresets(memory_root: str) -> None:
    store = Store(memory_root)
    featureset = make_featureset(store)
    assert Store(memory_root).featureset_ids() == [featureset.id]


def test_fsspec_store_partial_featureset_not_complete(memory_root: str) -> None:
    featureset = make_featureset(Store(memory_root))
    featureset.write_block(0, features()[:, :BLOCK_ROWS])
    assert featureset.mark_complete() is False
    reopened = Store(memory_root).featureset(featureset.id)
    assert reopened.missing_blocks() == [1, 2]
    with pytest.raises(NotReadyError):
        reopened.read_layer(0)


def test_fsspec_store_objects_under_prefix(memory_root: str) -> None:
    featureset = make_featureset(Store(memory_root))
    featureset.write_block(0, features()[:, :BLOCK_ROWS])
    fs = fsspec.filesystem("memory")
    prefix = memory_root.removeprefix("memory://")
    names = fs.find(f"{prefix}/featuresets/{featureset.id}")
    assert any(name.endswith("features/zarr.json") for name in names)
    # One shard object per written block of the features array.
    assert sum("/features/c/" in name for name in names) == 1


def test_fsspec_store_results_round_trip(memory_root: str) -> None:
    Store(memory_root).write_result("probes", "p1", {"status": "complete", "rows": [1, 2]})
    assert Store(memory_root).read_result("probes", "p1") == {"status": "complete", "rows": [1, 2]}


def test_fsspec_store_models_dir_rejected(memory_root: str) -> None:
    with pytest.raises(NotFoundError) as info:
        Store(memory_root).models_dir()
    assert info.value.field == "store"
    # No setting moves pretrained models elsewhere; the message names what works.
    assert "LAYERBANK_MODELS_DIR" not in info.value.message
    assert "LAYERBANK_MODEL_ROOTS" in info.value.message
