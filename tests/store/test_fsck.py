"""store.fsck on real Zarr files damaged on disk: truncated, garbled and deleted shards, temporary
files of killed writers, and the repair that lets a resume rewrite the damaged block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import Store
from store.featureset import FeatureSet, create_featureset
from store.fsck import check_featureset
from store.spec import FeatureSetSpec

LAYERS, N_ITEMS, DIM, BLOCK_ROWS = [0, 1, 2], 40, 8, 10
N_BLOCKS = N_ITEMS // BLOCK_ROWS


def _features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(LAYERS), N_ITEMS, DIM))


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _written(store: Store, blocks: range = range(N_BLOCKS)) -> FeatureSet:
    spec = FeatureSetSpec(
        model="tiny-igpt",
        model_revision="rev-1",
        model_family="imagegpt",
        dataset="digits",
        dataset_fingerprint="0" * 16,
        split="test",
        layers=LAYERS,
        pooling="mean",
    )
    featureset = create_featureset(
        store,
        spec,
        layer_map=[{"layer": i, "description": f"h{i}"} for i in LAYERS],
        dim=DIM,
        labels=np.arange(N_ITEMS) % 3,
        item_ids=np.arange(N_ITEMS),
        class_names=["a", "b", "c"],
        block_rows=BLOCK_ROWS,
    )
    features = _features()
    for block in blocks:
        start, stop = featureset.block_range(block)
        featureset.write_block(block, features[:, start:stop])
    if len(blocks) == N_BLOCKS:
        featureset.mark_complete()
    return store.featureset(featureset.id)


def _shard(store: Store, featureset: FeatureSet, block: int) -> Path:
    assert store.local_root is not None
    return store.local_root / featureset.path / "features" / "c" / "0" / str(block) / "0"


def test_check_featureset_clean_is_ok(store: Store) -> None:
    report = check_featureset(store, _written(store).id)
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["missing_blocks"] == []
    assert report["corrupt_chunks"] == []
    assert report["partial_files"] == []
    assert report["status"] == "complete"


def test_check_featureset_pending_lists_missing(store: Store) -> None:
    report = check_featureset(store, _written(store, range(2)).id)
    assert report["ok"] is True
    assert report["missing_blocks"] == [2, 3]
    assert report["status"] == "pending"


def test_check_featureset_truncated_shard(store: Store) -> None:
    featureset = _written(store)
    shard = _shard(store, featureset, 2)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert report["corrupt_chunks"] == ["features/c/0/2/0"]
    assert report["corrupt_blocks"] == [2]
    assert "block 2" in report["problems"][0]


def test_check_featureset_flipped_bytes(store: Store) -> None:
    featureset = _written(store)
    shard = _shard(store, featureset, 1)
    data = bytearray(shard.read_bytes())
    # Bytes inside the first chunk's data, not the shard index at the end.
    for offset in range(16, 24):
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert report["corrupt_chunks"] == ["features/c/0/1/0"]
    assert report["corrupt_blocks"] == [1]


def test_check_featureset_deleted_shard(store: Store) -> None:
    featureset = _written(store)
    _shard(store, featureset, 3).unlink()
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert report["corrupt_blocks"] == [3]
    assert "its object is missing" in report["problems"][0]


def test_check_featureset_garbled_label_chunk(store: Store) -> None:
    featureset = _written(store)
    assert store.local_root is not None
    chunk = store.local_root / featureset.path / "labels" / "c" / "1"
    chunk.write_bytes(b"not a zstd frame")
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert report["corrupt_chunks"] == ["labels/c/1"]
    assert "extract it again" in report["problems"][0]


def test_repair_skips_garbled_labels(store: Store) -> None:
    """A resume rewrites features only, so a repair must not make a damaged labels chunk look
    fixable. It keeps the block's flag and the status, and reads name the damage."""
    from store import DamagedChunkError

    featureset = _written(store)
    assert store.local_root is not None
    chunk = store.local_root / featureset.path / "labels" / "c" / "1"
    chunk.write_bytes(b"not a zstd frame")

    report = check_featureset(store, featureset.id, repair=True)

    assert report["ok"] is False
    assert report["corrupt_chunks"] == ["labels/c/1"]
    assert report["corrupt_blocks"] == []
    assert report["missing_blocks"] == []
    assert report["repaired"] == []
    assert report["status"] == "complete"
    reopened = store.featureset(featureset.id)
    assert reopened.missing_blocks() == []
    with pytest.raises(DamagedChunkError) as caught:
        reopened.read_labels(BLOCK_ROWS, 2 * BLOCK_ROWS)
    assert "labels" in caught.value.message
    assert "delete the feature set and extract it again" in caught.value.message
    assert caught.value.field == "featureset_id"
    assert caught.value.permanent


def test_garbled_item_ids_read_names_the_fix(store: Store) -> None:
    from store import DamagedChunkError

    featureset = _written(store)
    assert store.local_root is not None
    (store.local_root / featureset.path / "item_ids" / "c" / "2").write_bytes(b"not zstd")
    with pytest.raises(DamagedChunkError) as caught:
        store.featureset(featureset.id).read_item_ids()
    assert "item_ids" in caught.value.message
    assert "delete the feature set and extract it again" in caught.value.message
    # A rerun reads the same damaged object, so the worker does not retry it.
    assert caught.value.permanent


def test_repair_report_advises_the_resume_only(store: Store) -> None:
    """After its own repair, the report's advice is the step left: the resume."""
    featureset = _written(store)
    shard = _shard(store, featureset, 2)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = check_featureset(store, featureset.id, repair=True)
    assert report["repaired"]
    assert all("run fsck with repair" not in problem for problem in report["problems"])
    assert "resume the job to rewrite the block" in report["problems"][0]


def test_check_featureset_partial_file(store: Store) -> None:
    featureset = _written(store)
    leftover = _shard(store, featureset, 0).with_suffix(".3f2a9c.partial")
    leftover.write_bytes(b"\x00" * 100)
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert report["partial_files"] == ["features/c/0/0/0.3f2a9c.partial"]
    assert report["corrupt_chunks"] == []


def test_check_featureset_complete_but_flag_missing(store: Store) -> None:
    featureset = _written(store)
    featureset.blocks_done_array[1] = False
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert report["missing_blocks"] == [1]


def test_check_featureset_repair_then_rewrite(store: Store) -> None:
    featureset = _written(store)
    shard = _shard(store, featureset, 2)
    shard.write_bytes(shard.read_bytes()[:40])
    leftover = shard.with_suffix(".77.partial")
    leftover.write_bytes(b"x")

    repaired = check_featureset(store, featureset.id, repair=True)
    assert repaired["ok"] is False
    assert repaired["missing_blocks"] == [2]
    assert "cleared the done flag of block 2" in repaired["repaired"]
    assert not leftover.exists()
    reopened = store.featureset(featureset.id)
    assert reopened.is_complete is False
    assert reopened.missing_blocks() == [2]
    # The progress of a complete set is not read from the flags, so a repair must reopen it.
    assert reopened.progress().blocks_done == reopened.n_blocks - 1

    # What a resumed block job does: write the block again, then finalize.
    start, stop = reopened.block_range(2)
    reopened.write_block(2, _features()[:, start:stop])
    assert reopened.mark_complete() is True
    assert check_featureset(store, featureset.id)["ok"] is True
    np.testing.assert_array_equal(reopened.read_layer(1), _features()[1].astype(np.float32))


def test_check_featureset_missing_array_reported(store: Store) -> None:
    featureset = _written(store)
    assert store.local_root is not None
    import shutil

    shutil.rmtree(store.local_root / featureset.path / "item_ids")
    store.forget(featureset.id)
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert "item_ids" in report["problems"][0]
