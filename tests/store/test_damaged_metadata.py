"""Feature sets whose zarr.json metadata files are damaged on disk: invalid JSON, JSON that is not
Zarr metadata, or a missing file, of the group and of each of its arrays. Reads raise one
error that names the set and the file, fsck reports the damage, and its repair rebuilds or
removes what it safely can."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store import DamagedMetadataError, NotFoundError, Store
from store.featureset import FeatureSet
from store.fsck import check_featureset
from tests.factories import pending_featureset

LAYERS, N_ITEMS, DIM, BLOCK_ROWS = (0, 1), 40, 8, 10
N_BLOCKS = N_ITEMS // BLOCK_ROWS

# Damages of one metadata file: the text written in its place, or None to delete it.
DAMAGES = {"not-json": "{not json", "not-metadata": "[]", "empty-object": "{}", "missing": None}
ARRAYS = ("features", "labels", "item_ids", "blocks_done")


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _complete(store: Store) -> FeatureSet:
    assert store.local_root is not None
    featureset = pending_featureset(
        store.local_root, n_items=N_ITEMS, dim=DIM, layers=LAYERS, block_rows=BLOCK_ROWS
    )
    features = np.random.default_rng(0).standard_normal((len(LAYERS), N_ITEMS, DIM))
    for block in range(N_BLOCKS):
        start, stop = featureset.block_range(block)
        featureset.write_block(block, features[:, start:stop])
    assert featureset.mark_complete()
    return featureset


def _damage(store: Store, featureset_id: str, key: str, damage: str) -> Path:
    assert store.local_root is not None
    path = store.local_root / "featuresets" / featureset_id / key
    text = DAMAGES[damage]
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    store.forget(featureset_id)
    return path


def _array_cases() -> list[tuple[str, str]]:
    return [(f"{name}/zarr.json", damage) for name in ARRAYS for damage in DAMAGES]


# A missing group zarr.json is a creation that did not finish, covered by its own tests.
GROUP_CASES = [("zarr.json", damage) for damage in ("not-json", "not-metadata")]


@pytest.mark.parametrize(("key", "damage"), GROUP_CASES + _array_cases())
def test_read_raises_damaged_metadata(store: Store, key: str, damage: str) -> None:
    featureset = _complete(store)
    _damage(store, featureset.id, key, damage)
    with pytest.raises(DamagedMetadataError) as caught:
        store.featureset(featureset.id)
    message = caught.value.message
    assert featureset.id in message
    assert key in message
    assert f"layerbank fsck {featureset.id}" in message
    assert caught.value.field == "featureset_id"
    assert caught.value.value == featureset.id
    assert caught.value.key == key
    with pytest.raises(DamagedMetadataError):
        store.find_featureset(featureset.id)


@pytest.mark.parametrize(("key", "damage"), GROUP_CASES + _array_cases())
def test_fsck_reports_damaged_metadata(store: Store, key: str, damage: str) -> None:
    featureset = _complete(store)
    _damage(store, featureset.id, key, damage)
    report = check_featureset(store, featureset.id)
    assert report["ok"] is False
    assert report["repaired"] == []
    assert len(report["problems"]) == 1
    assert key in report["problems"][0]
    assert "metadata" in report["problems"][0]


@pytest.mark.parametrize("damage", ["not-json", "not-metadata"])
def test_damaged_group_report_asks_repair_first(store: Store, damage: str) -> None:
    """The API returns 409 to the POST while the group is damaged, so the report does not
    offer the POST alone."""
    featureset = _complete(store)
    _damage(store, featureset.id, "zarr.json", damage)
    problem = check_featureset(store, featureset.id)["problems"][0]
    assert "run fsck with repair to delete its folder, then send the same POST" in problem
    assert "again to recreate it, or run fsck" not in problem


@pytest.mark.parametrize("damage", ["not-json", "not-metadata"])
def test_repair_deletes_set_with_damaged_group(store: Store, damage: str) -> None:
    featureset = _complete(store)
    _damage(store, featureset.id, "zarr.json", damage)
    report = check_featureset(store, featureset.id, repair=True)
    assert report["repaired"] == [f"deleted the folder featuresets/{featureset.id}"]
    assert "send the same POST /v1/extractions again" in report["problems"][0]
    assert store.local_root is not None
    assert not (store.local_root / "featuresets" / featureset.id).exists()
    with pytest.raises(NotFoundError):
        store.featureset(featureset.id)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_repair_rebuilds_blocks_done_metadata(store: Store, damage: str) -> None:
    featureset = _complete(store)
    _damage(store, featureset.id, "blocks_done/zarr.json", damage)
    report = check_featureset(store, featureset.id, repair=True)
    assert "rebuilt blocks_done/zarr.json from the group attributes" in report["repaired"]
    # The flags stored before the damage are read again, so no block has to be rewritten.
    assert report["missing_blocks"] == []
    assert report["status"] == "complete"
    reopened = store.featureset(featureset.id)
    assert reopened.is_complete
    assert reopened.missing_blocks() == []
    assert check_featureset(store, featureset.id)["ok"] is True


@pytest.mark.parametrize(
    ("key", "damage"), [case for case in _array_cases() if not case[0].startswith("blocks_done")]
)
def test_repair_keeps_data_arrays(store: Store, key: str, damage: str) -> None:
    featureset = _complete(store)
    path = _damage(store, featureset.id, key, damage)
    before = sorted(p.name for p in path.parent.rglob("*"))
    report = check_featureset(store, featureset.id, repair=True)
    assert report["repaired"] == []
    assert report["ok"] is False
    assert "delete the feature set and extract it again" in report["problems"][0]
    assert sorted(p.name for p in path.parent.rglob("*")) == before
