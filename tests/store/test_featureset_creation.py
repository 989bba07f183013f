"""Feature set creation stopped midway, as a killed API process leaves it on disk.

Each state is built deterministically: the set is created completely, then its group metadata
and arrays are cut back to what a process killed at that point leaves. Before the creation
attributes were written in one object, zarr wrote them one key at a time, in the order of
`CREATION_ORDER`, so every prefix of that order is a state found in stores written back then.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from store import NotFoundError, Store
from store.errors import IncompleteFeatureSetError
from store.featureset import CREATION_ATTRS, FeatureSet, create_featureset
from store.fsck import check_featureset
from store.spec import FeatureSetSpec
from tests.factories import MetadataWrites

LAYERS, N_ITEMS, DIM, BLOCK_ROWS = [0, 1], 30, 4, 10
# The keys in the order the creation wrote them when each key was a write of its own.
CREATION_ORDER = [
    "featureset_id",
    "spec",
    "layer_map",
    "class_names",
    "item_ids_span_splits",
    "block_rows",
    "n_blocks",
    "status",
    "created",
    "completed",
]
# The arrays in the order the creation writes them.
ARRAY_ORDER = ["features", "labels", "item_ids", "blocks_done"]


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _spec() -> FeatureSetSpec:
    return FeatureSetSpec(
        model="pixels",
        model_revision="rev-1",
        model_family="pixels",
        dataset="digits",
        dataset_fingerprint="0" * 16,
        split="test",
        layers=LAYERS,
        pooling="mean",
    )


def _create(store: Store) -> FeatureSet:
    return create_featureset(
        store,
        _spec(),
        layer_map=[{"layer": i, "description": f"h{i}"} for i in LAYERS],
        dim=DIM,
        labels=np.arange(N_ITEMS) % 3,
        item_ids=np.arange(N_ITEMS),
        class_names=["a", "b", "c"],
        block_rows=BLOCK_ROWS,
    )


def _folder(store: Store, featureset_id: str) -> Path:
    assert store.local_root is not None
    return store.local_root / "featuresets" / featureset_id


def _cut_back(store: Store, featureset_id: str, n_attrs: int, arrays: list[str]) -> None:
    """Leave the first ``n_attrs`` creation attributes and only the arrays ``arrays``."""
    folder = _folder(store, featureset_id)
    metadata_file = folder / "zarr.json"
    metadata = json.loads(metadata_file.read_text())
    written = CREATION_ORDER[:n_attrs]
    metadata["attributes"] = {k: v for k, v in metadata["attributes"].items() if k in written}
    metadata_file.write_text(json.dumps(metadata))
    for name in ARRAY_ORDER:
        if name not in arrays:
            shutil.rmtree(folder / name)
    store.forget(featureset_id)


def _half_written_labels(store: Store, featureset_id: str) -> None:
    """Leave the group with no attributes and labels with their last chunk missing."""
    _cut_back(store, featureset_id, 0, ["features", "labels"])
    (_folder(store, featureset_id) / "labels" / "c" / "2").unlink()


# (name, state builder): every state a process killed during creation can leave.
STATES: list[tuple[str, Callable[[Store, str], None]]] = [
    ("group only", lambda s, i: _cut_back(s, i, 0, [])),
    ("features only", lambda s, i: _cut_back(s, i, 0, ["features"])),
    ("labels half written", _half_written_labels),
    ("all arrays, no attributes", lambda s, i: _cut_back(s, i, 0, ARRAY_ORDER)),
    ("id only", lambda s, i: _cut_back(s, i, 1, ARRAY_ORDER)),
    ("spec without block_rows", lambda s, i: _cut_back(s, i, 2, ARRAY_ORDER)),
    ("spec and maps", lambda s, i: _cut_back(s, i, 5, ARRAY_ORDER)),
    ("no status", lambda s, i: _cut_back(s, i, 7, ARRAY_ORDER)),
    ("no completed", lambda s, i: _cut_back(s, i, 9, ARRAY_ORDER)),
]
STATE_IDS = [name for name, _ in STATES]


@pytest.fixture(params=STATES, ids=STATE_IDS)
def interrupted(request: pytest.FixtureRequest, store: Store) -> str:
    """The id of a feature set left in one of `STATES`."""
    featureset_id = _create(store).id
    _, cut_back = request.param
    cut_back(store, featureset_id)
    return featureset_id


def test_interrupted_creation_is_not_found(store: Store, interrupted: str) -> None:
    assert store.find_featureset(interrupted) is None
    # The folder is still listed, so the list route can report it.
    assert interrupted in store.featureset_ids()


def test_interrupted_creation_error_names_fix(store: Store, interrupted: str) -> None:
    with pytest.raises(IncompleteFeatureSetError) as raised:
        store.featureset(interrupted)
    message = raised.value.message
    assert interrupted in message
    assert "send the same POST /v1/extractions again" in message
    assert f"DELETE /v1/featuresets/{interrupted}" in message
    assert raised.value.field == "featureset_id"
    assert raised.value.value == interrupted


def test_interrupted_creation_error_keeps_field(store: Store, interrupted: str) -> None:
    with pytest.raises(IncompleteFeatureSetError) as raised:
        store.featureset(interrupted, field="train_featureset")
    assert raised.value.field == "train_featureset"


def test_interrupted_creation_recreated(store: Store, interrupted: str) -> None:
    featureset = _create(store)
    assert featureset.id == interrupted
    attrs = zarr.open_group(store.zarr_store, path=featureset.path, mode="r").attrs.asdict()
    assert set(CREATION_ATTRS) <= set(attrs)
    assert featureset.block_rows == BLOCK_ROWS
    assert featureset.n_blocks == N_ITEMS // BLOCK_ROWS
    assert featureset.missing_blocks() == [0, 1, 2]
    np.testing.assert_array_equal(featureset.read_labels(), np.arange(N_ITEMS) % 3)
    np.testing.assert_array_equal(featureset.read_item_ids(), np.arange(N_ITEMS))
    assert store.featureset(interrupted).summary()["status"] == "pending"
    assert check_featureset(store, interrupted)["ok"] is True


def test_fsck_reports_interrupted_creation(store: Store, interrupted: str) -> None:
    report = check_featureset(store, interrupted)
    assert report["ok"] is False
    assert report["status"] is None
    assert report["n_blocks"] is None
    assert len(report["problems"]) == 1
    problem = report["problems"][0]
    assert interrupted in problem
    assert "send the same POST /v1/extractions again" in problem
    assert "repair" in problem
    assert report["repaired"] == []
    assert _folder(store, interrupted).is_dir()


def test_fsck_repair_deletes_interrupted_creation(store: Store, interrupted: str) -> None:
    report = check_featureset(store, interrupted, repair=True)
    assert report["ok"] is False
    assert report["repaired"] == [f"deleted the folder featuresets/{interrupted}"]
    assert not _folder(store, interrupted).exists()
    assert interrupted not in store.featureset_ids()
    with pytest.raises(NotFoundError):
        store.featureset(interrupted)
    # A new request creates the set from scratch.
    assert _create(store).block_rows == BLOCK_ROWS


def test_complete_creation_is_found(store: Store) -> None:
    featureset_id = _create(store).id
    store.forget(featureset_id)
    found = store.find_featureset(featureset_id)
    assert found is not None
    assert found.block_rows == BLOCK_ROWS
    assert check_featureset(store, featureset_id)["ok"] is True


def test_set_without_span_flag_is_complete(store: Store) -> None:
    """A set created before ``item_ids_span_splits`` was recorded is complete, not recreated."""
    featureset_id = _create(store).id
    group = zarr.open_group(store.zarr_store, path=f"featuresets/{featureset_id}", mode="r+")
    attrs = group.attrs.asdict()
    del attrs["item_ids_span_splits"]
    group.attrs.put(attrs)
    store.forget(featureset_id)
    featureset = store.find_featureset(featureset_id)
    assert featureset is not None
    assert featureset.ids_span_splits is None


def test_creation_writes_attributes_at_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    featureset_id = _spec().featureset_id()
    writes = MetadataWrites(store, f"featuresets/{featureset_id}/zarr.json", monkeypatch)
    _create(store)
    # An empty group first, then every attribute in one write: a kill leaves one of the two.
    assert writes.attribute_keys[0] == set()
    assert writes.attribute_keys[-1] >= set(CREATION_ATTRS)
    assert len(writes.attribute_keys) == 2


def test_mark_complete_writes_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    featureset = _create(store)
    for block in range(featureset.n_blocks):
        start, stop = featureset.block_range(block)
        featureset.write_block(block, np.ones((len(LAYERS), stop - start, DIM)))
    writes = MetadataWrites(store, f"{featureset.path}/zarr.json", monkeypatch)
    assert featureset.mark_complete() is True
    assert len(writes.attribute_keys) == 1


def test_write_result_writes_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = MetadataWrites(store, "probes/" + "a" * 24 + "/zarr.json", monkeypatch)
    store.write_result("probes", "a" * 24, {"spec": {"kinds": ["logistic"]}, "status": "pending"})
    store.write_result("probes", "a" * 24, {"status": "complete", "rows": [], "best": None})
    # The group's creation, then one write per call.
    assert [keys for keys in writes.attribute_keys if keys] == [
        {"spec", "status"},
        {"spec", "status", "rows", "best"},
    ]
    assert store.read_result("probes", "a" * 24) == {
        "spec": {"kinds": ["logistic"]},
        "status": "complete",
        "rows": [],
        "best": None,
    }


def _stale_partial(path: Path) -> Path:
    path.write_bytes(b'{"attributes": {}')
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


def test_store_partial_files_not_listed(store: Store) -> None:
    featureset_id = _create(store).id
    assert store.local_root is not None
    _stale_partial(store.local_root / "featuresets" / "zarr.0123abcd.partial")
    assert store.featureset_ids() == [featureset_id]


def test_fsck_repairs_store_partial_files(store: Store) -> None:
    featureset = _create(store)
    assert store.local_root is not None
    in_featuresets = _stale_partial(store.local_root / "featuresets" / "zarr.0123abcd.partial")
    in_root = _stale_partial(store.local_root / "zarr.4567ef.partial")

    report = check_featureset(store, featureset.id)
    # No feature set depends on these files, so the set itself stays ok.
    assert report["ok"] is True
    assert report["partial_files"] == ["../../zarr.4567ef.partial", "../zarr.0123abcd.partial"]
    assert len(report["problems"]) == 2
    assert all("fsck with repair deletes" in problem for problem in report["problems"])
    assert "the store root's group metadata" in report["problems"][0]
    assert "the featuresets folder's group metadata" in report["problems"][1]

    repaired = check_featureset(store, featureset.id, repair=True)
    assert sorted(repaired["repaired"]) == [
        "deleted ../../zarr.4567ef.partial",
        "deleted ../zarr.0123abcd.partial",
    ]
    assert not in_featuresets.exists()
    assert not in_root.exists()
    assert check_featureset(store, featureset.id)["problems"] == []


def test_fsck_skips_new_store_partial_file(store: Store) -> None:
    """A temporary file of the store's metadata younger than a minute may belong to a write in
    progress by another process, so fsck neither reports nor deletes it."""
    featureset = _create(store)
    assert store.local_root is not None
    recent = store.local_root / "featuresets" / "zarr.89ab.partial"
    recent.write_bytes(b"{")
    report = check_featureset(store, featureset.id, repair=True)
    assert report["ok"] is True
    assert report["partial_files"] == []
    assert recent.exists()


def test_fsck_interrupted_lists_partial_files(store: Store) -> None:
    featureset_id = _create(store).id
    _cut_back(store, featureset_id, 0, ["features"])
    leftover = _folder(store, featureset_id) / "labels" / "zarr.5f5f.partial"
    leftover.parent.mkdir()
    leftover.write_bytes(b"{")
    report = check_featureset(store, featureset_id)
    assert report["partial_files"] == ["labels/zarr.5f5f.partial"]


def test_folder_without_metadata_is_interrupted(store: Store) -> None:
    """A creation killed before the group metadata was renamed into place leaves a folder that
    contains only the temporary file."""
    featureset_id = _spec().featureset_id()
    folder = _folder(store, featureset_id)
    folder.mkdir(parents=True)
    (folder / "zarr.7d7d.partial").write_bytes(b"{")

    assert store.find_featureset(featureset_id) is None
    assert store.missing_creation_attrs(featureset_id) == list(CREATION_ATTRS)
    with pytest.raises(IncompleteFeatureSetError):
        store.featureset(featureset_id)
    report = check_featureset(store, featureset_id)
    assert report["partial_files"] == ["zarr.7d7d.partial"]
    assert "send the same POST /v1/extractions again" in report["problems"][0]
    check_featureset(store, featureset_id, repair=True)
    assert not folder.exists()
    assert store.missing_creation_attrs(featureset_id) is None


def test_folder_without_metadata_recreated(store: Store) -> None:
    featureset_id = _spec().featureset_id()
    folder = _folder(store, featureset_id)
    (folder / "labels").mkdir(parents=True)
    (folder / "labels" / "zarr.json").write_text("{}")
    assert _create(store).block_rows == BLOCK_ROWS
    assert store.missing_creation_attrs(featureset_id) == []
