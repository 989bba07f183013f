"""Direct shard reads of the features: the same values as zarr, zarr for any other layout, and
a clear error for every kind of damage instead of fill values."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from service.client import Client, ClientError
from store import DamagedChunkError, FeatureSet, StoreError
from store.chunks import ShardReader
from tests.store.test_read_path import BLOCK_ROWS, N_ITEMS, _complete_featureset


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_reads_match_zarr(tmp_path: Path, dtype: str) -> None:
    featureset, features = _complete_featureset(tmp_path / "store", dtype=dtype)
    assert featureset._reader is not None
    plain = np.asarray(
        zarr.open_array(featureset.store.zarr_store, path=featureset.path + "/features")
    )
    for position, layer in enumerate(featureset.layers):
        np.testing.assert_array_equal(featureset.read_layer(layer), plain[position])
        for start, stop in [(0, 1), (63, 65), (100, N_ITEMS), (N_ITEMS - 1, N_ITEMS), (5, 5)]:
            got = featureset.read_layer(layer, start, stop)
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, plain[position, start:stop])
        pieces = list(featureset.iter_layer(layer, 10, N_ITEMS))
        assert [len(p) for p in pieces] == [BLOCK_ROWS - 10, BLOCK_ROWS, N_ITEMS - 2 * BLOCK_ROWS]
        np.testing.assert_array_equal(np.concatenate(pieces), plain[position, 10:])
    np.testing.assert_array_equal(featureset.read_layer(5).astype(np.float32), features[2])


def _array(root: Path, **kwargs: Any) -> zarr.Array:
    """A (5 layers, 30 items, 4 dim) array, filled with random values."""
    options: dict[str, Any] = {
        "shape": (5, 30, 4),
        "chunks": (1, 8, 4),
        "shards": (2, 8, 4),
        "dtype": "float32",
        "fill_value": np.nan,
        "compressors": [Crc32cCodec()],
    }
    options.update(kwargs)
    array = zarr.create_array(str(root), name="features", **options)
    array[:] = np.random.default_rng(1).standard_normal(options["shape"]).astype(options["dtype"])
    return array


def test_reader_several_shards_per_layer_axis(tmp_path: Path) -> None:
    array = _array(tmp_path)
    reader = ShardReader.for_array(array, "abc")
    assert reader is not None and reader.shard_layers == 2
    values = np.asarray(array)
    for position in range(5):
        for block in range(4):
            chunk = reader.read(position, block)
            assert chunk.shape == (8, 4)
            assert chunk.flags.writeable
            rows = values[position, block * 8 : (block + 1) * 8]
            np.testing.assert_array_equal(chunk[: len(rows)], rows)
    assert np.isnan(reader.read(4, 3)[6:]).all()  # rows past the end contain the fill value


@pytest.mark.parametrize(
    "options",
    [
        {"compressors": [ZstdCodec(), Crc32cCodec()]},
        {"compressors": None},
        {"shards": None},
        {"serializer": BytesCodec(endian="big")},
        {"chunks": (1, 4, 4)},
    ],
    ids=["zstd", "no-checksum", "unsharded", "big-endian", "split-block"],
)
def test_other_layouts_read_through_zarr(tmp_path: Path, options: dict[str, Any]) -> None:
    assert ShardReader.for_array(_array(tmp_path, **options), "abc") is None


def test_fsspec_store_reads_through_zarr() -> None:
    root = f"memory://layerbank-{uuid.uuid4().hex}"
    array = zarr.create_array(
        root, shape=(2, 8, 4), chunks=(1, 8, 4), shards=(2, 8, 4), dtype="float32"
    )
    assert ShardReader.for_array(array, "abc") is None


def _shard(featureset: FeatureSet, block: int) -> Path:
    assert featureset.store.local_root is not None
    return featureset.store.local_root / featureset.path / "features" / "c" / "0" / str(block) / "0"


def _flip(offset_from: str, at: int) -> Any:
    def damage(featureset: FeatureSet) -> None:
        shard = _shard(featureset, 1)
        data = bytearray(shard.read_bytes())
        data[at if offset_from == "start" else len(data) - at] ^= 0x40
        shard.write_bytes(bytes(data))

    return damage


def _truncate(featureset: FeatureSet) -> None:
    shard = _shard(featureset, 1)
    shard.write_bytes(shard.read_bytes()[:-10])


def _cut_short(featureset: FeatureSet) -> None:
    shard = _shard(featureset, 1)
    shard.write_bytes(shard.read_bytes()[:20])


def _delete(featureset: FeatureSet) -> None:
    _shard(featureset, 1).unlink()


def _drop_chunk(featureset: FeatureSet) -> None:
    # zarr leaves a chunk equal to the fill value out of its shard.
    raw = zarr.open_array(featureset.store.zarr_store, path=featureset.path + "/features")
    raw[1, BLOCK_ROWS : 2 * BLOCK_ROWS] = np.nan


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_flip("start", 7), "fails the checksum"),
        (_flip("end", 12), "index that fails its checksum"),
        (_truncate, "index that fails its checksum"),
        (_cut_short, "fewer than its index"),
        (_delete, "is missing"),
        (_drop_chunk, "contains no chunk for layer position 1"),
    ],
    ids=["flipped-data", "flipped-index", "truncated", "cut-short", "deleted", "chunk-dropped"],
)
def test_damage_raises_not_fill_values(tmp_path: Path, damage: Any, problem: str) -> None:
    featureset, _ = _complete_featureset(tmp_path / "store")
    damage(featureset)
    with pytest.raises(DamagedChunkError) as caught:
        for layer in featureset.layers:
            featureset.read_layer(layer)
    message = caught.value.message
    assert problem in message
    assert "'features/c/0/1/0'" in message
    assert f"POST /v1/featuresets/{featureset.id}/fsck/repair" in message
    assert caught.value.field == "featureset_id"
    # Blocks that are intact still read.
    plain = zarr.open_array(featureset.store.zarr_store, path=featureset.path + "/features")
    for position, layer in enumerate(featureset.layers):
        got = featureset.read_layer(layer, 0, BLOCK_ROWS)
        np.testing.assert_array_equal(got, np.asarray(plain[position, :BLOCK_ROWS]))


def test_api_damaged_chunk_is_500(api_url: str, stack_dirs: dict[str, Path]) -> None:
    featureset, _ = _complete_featureset(stack_dirs["store"], dtype="float32")
    _flip("start", 100)(featureset)
    response = httpx.get(
        f"{api_url}/v1/featuresets/{featureset.id}/layers/0",
        params={"start": BLOCK_ROWS, "stop": BLOCK_ROWS + 1, "format": "json"},
        timeout=30,
    )
    assert response.status_code == 500
    detail = response.json()["detail"]
    assert detail["field"] == "featureset_id"
    assert detail["value"] == featureset.id
    assert "fails the checksum" in detail["message"]
    assert "fsck/repair" in detail["message"]


def _flip_block(featureset: FeatureSet, block: int) -> None:
    shard = _shard(featureset, block)
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x40  # inside the chunk of layer position 0
    shard.write_bytes(bytes(data))


def test_api_stream_truncated_shard_is_500(api_url: str, stack_dirs: dict[str, Path]) -> None:
    featureset, _ = _complete_featureset(stack_dirs["store"], dtype="float32")
    shard = _shard(featureset, 2)
    shard.write_bytes(shard.read_bytes()[:1000])
    with Client(api_url) as client, pytest.raises(ClientError) as caught:
        client.layer_array(featureset.id, 0)
    assert caught.value.status_code == 500
    assert "'features/c/0/2/0'" in str(caught.value)
    assert "index that fails its checksum" in str(caught.value)


def test_api_stream_damaged_later_block_raises(api_url: str, stack_dirs: dict[str, Path]) -> None:
    featureset, features = _complete_featureset(stack_dirs["store"], dtype="float32")
    _flip_block(featureset, 2)
    with Client(api_url) as client:
        with pytest.raises(ClientError) as caught:
            client.layer_array(featureset.id, 0)
        assert "ended early" in str(caught.value)
        assert not str(caught.value).startswith("HTTP 200")
        assert f"layerbank fsck {featureset.id}" in str(caught.value)
        # The same client still reads an intact layer range afterwards.
        np.testing.assert_array_equal(
            client.layer_array(featureset.id, 2, start=0, stop=2 * BLOCK_ROWS),
            features[1, : 2 * BLOCK_ROWS],
        )


def test_read_position_matches_zarr(tmp_path: Path) -> None:
    featureset, _ = _complete_featureset(tmp_path / "store")
    plain = np.asarray(
        zarr.open_array(featureset.store.zarr_store, path=featureset.path + "/features")
    )
    view = featureset.by_position()
    assert view.shape == plain.shape
    for position in range(len(featureset.layers)):
        np.testing.assert_array_equal(view[position], plain[position])
    with pytest.raises(StoreError, match=r"layer position 3 is out of range .*\(0\.\.2\)"):
        featureset.read_position(3)


def test_probe_damaged_featureset_names_repair(tmp_path: Path) -> None:
    from workers.probes import fit_probes

    featureset, _ = _complete_featureset(tmp_path / "store")
    _flip_block(featureset, 1)
    labels = featureset.read_labels()
    view = featureset.by_position()
    with pytest.raises(DamagedChunkError, match="fsck/repair"):
        fit_probes("knn", view, labels, view, labels, layers=[0], params={}, seed=0)
