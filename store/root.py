"""The store root: a local directory or any fsspec URL shared by every worker and API replica."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store as ZarrStore
from zarr.core.common import AccessModeLiteral
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from store.errors import NotFoundError
from store.featureset import (
    CREATION_ATTRS,
    GROUP_NOT_FOUND_ERRORS,
    FeatureSet,
    incomplete_error,
    missing_creation_attrs,
    open_featureset_group,
)
from store.ids import check_id

logger = logging.getLogger(__name__)

# The metadata files of a feature set whose change or loss makes an open handle stale: the
# group's, whose attributes change at finalising and repair, and those of its arrays.
METADATA_FILES = (
    "zarr.json",
    "features/zarr.json",
    "labels/zarr.json",
    "item_ids/zarr.json",
    "blocks_done/zarr.json",
    "token_features/zarr.json",
)
# (inode, mtime in ns) of each of METADATA_FILES, or None for a missing one.
MetadataStamp = tuple[tuple[int, int] | None, ...]


def is_local_url(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


class Store:
    """Entry point to everything stored under one root.

    Parameters
    ----------
    root
        A local directory (created if missing) or an fsspec URL such as ``s3://bucket/prefix``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        self.zarr_store: ZarrStore
        if is_local_url(self.root):
            local = Path(self.root.removeprefix("file://")).expanduser().resolve()
            local.mkdir(parents=True, exist_ok=True)
            self.local_root: Path | None = local
            self.zarr_store = LocalStore(local)
        else:
            self.local_root = None
            self.zarr_store = FsspecStore.from_url(self.root, read_only=False)
        # Open handles with the stamp of their group's metadata file when they were opened.
        self._open: dict[str, tuple[FeatureSet, MetadataStamp | None]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # -- feature sets -----------------------------------------------------------------------

    def find_featureset(self, featureset_id: str) -> FeatureSet | None:
        """Return the feature set ``featureset_id``, or None if it does not exist.

        Raises `DamagedMetadataError` when a zarr.json of the set's group or of one of its
        arrays is missing or cannot be read.
        """
        check_id(featureset_id, field="featureset_id")
        cached = self.open_featureset(featureset_id)
        if cached is not None:
            return cached
        stamp = self._metadata_stamp(featureset_id)
        try:
            group = open_featureset_group(self, featureset_id, mode="r+")
        except GROUP_NOT_FOUND_ERRORS:
            return None
        if missing_creation_attrs(group.attrs):
            # Creation was interrupted or is still running: absent for readers, and the next
            # request for the spec creates it again (see `featureset` for the error).
            return None
        featureset = FeatureSet(self, featureset_id, group)
        with self._lock:
            self._open[featureset_id] = (featureset, stamp)
        return featureset

    def missing_creation_attrs(self, featureset_id: str) -> list[str] | None:
        """Return the creation attributes that the group of ``featureset_id`` lacks: None when
        nothing is stored under its path, an empty list when its creation finished.

        Objects under the path without the group's metadata count as lacking every attribute:
        a creation killed before it wrote the metadata leaves them, and so does a delete in
        progress. Raises `DamagedMetadataError` when the group's zarr.json cannot be read.
        """
        check_id(featureset_id, field="featureset_id")
        path = f"featuresets/{featureset_id}"
        try:
            group = open_featureset_group(self, featureset_id)
        except GROUP_NOT_FOUND_ERRORS:
            return list(CREATION_ATTRS) if self._contains_objects(path) else None
        return missing_creation_attrs(group.attrs)

    def _contains_objects(self, path: str) -> bool:
        """Return whether any object is stored under ``path``."""
        store = self.zarr_store

        async def any_object() -> bool:
            async for _ in store.list_prefix(f"{path}/"):
                return True
            return False

        return sync(any_object())

    def open_featureset(self, featureset_id: str) -> FeatureSet | None:
        """Return the open handle of ``featureset_id``, or None if none is open and current.

        In a local store, a handle whose group or array metadata file changed or vanished since
        it was opened (another process deleted, re-created, finalised or repaired the set, or
        the file was damaged) is dropped, at the cost of one ``stat`` call per file.
        """
        with self._lock:
            entry = self._open.get(featureset_id)
        if entry is None:
            return None
        featureset, stamp = entry
        if self.local_root is not None and self._metadata_stamp(featureset_id) != stamp:
            self.forget(featureset_id)
            return None
        return featureset

    def _metadata_stamp(self, featureset_id: str) -> MetadataStamp | None:
        """Return the (inode, mtime in ns) of each of `METADATA_FILES` in a local store, else None.

        NOTE: handles on an fsspec store are not checked, so another process's delete or
        repair is seen only after `forget` or a restart.
        """
        if self.local_root is None:
            return None
        folder = self.local_root / "featuresets" / featureset_id
        stamp: list[tuple[int, int] | None] = []
        for name in METADATA_FILES:
            try:
                info = os.stat(folder / name)
            except FileNotFoundError:
                stamp.append(None)
                continue
            stamp.append((info.st_ino, info.st_mtime_ns))
        return tuple(stamp)

    def featureset(self, featureset_id: str, *, field: str = "featureset_id") -> FeatureSet:
        """Return the feature set ``featureset_id``, or raise `NotFoundError`, or
        `IncompleteFeatureSetError` when its creation did not finish.

        ``field`` is the request field that named the id, which the error names.
        """
        featureset = self.find_featureset(featureset_id)
        if featureset is None:
            missing = self.missing_creation_attrs(featureset_id)
            if missing:
                raise incomplete_error(featureset_id, missing, field=field)
            named_by = "" if field == "featureset_id" else f" (from {field})"
            raise NotFoundError(
                f"feature set {featureset_id!r}{named_by} not found; list feature sets with "
                "GET /v1/featuresets",
                field=field,
                value=featureset_id,
            )
        return featureset

    def forget(self, featureset_id: str) -> None:
        """Drop the cached handle so the next access re-reads the group."""
        with self._lock:
            self._open.pop(featureset_id, None)

    def featureset_ids(self) -> list[str]:
        return self._child_names("featuresets")

    def _child_names(self, prefix: str) -> list[str]:
        """Return the names of the groups under ``prefix``.

        A child without its zarr.json (a delete in progress) is skipped. zarr's own listing
        warns of such a child, and silencing that would change the process-wide warning
        filters, which other threads of the API change too.
        """
        store = self.zarr_store

        async def names() -> list[str]:
            found = []
            async for name in store.list_dir(prefix):
                if name != "zarr.json" and await store.exists(f"{prefix}/{name}/zarr.json"):
                    found.append(name)
            return found

        return sorted(sync(names()))

    # -- groups of other kinds --------------------------------------------------------------

    def write_result(self, kind: str, result_id: str, attrs: dict[str, Any]) -> None:
        """Create or update the attributes of ``<kind>/<result_id>``."""
        group = zarr.open_group(self.zarr_store, path=f"{kind}/{result_id}", mode="a")
        # One write of the group metadata: group.attrs.update writes once per key, and a kill
        # between two writes would leave, say, status "complete" without the rows.
        group.update_attributes(attrs)

    def read_result(self, kind: str, result_id: str) -> dict[str, Any] | None:
        try:
            group = zarr.open_group(self.zarr_store, path=f"{kind}/{result_id}", mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        return dict(group.attrs)

    def result_ids(self, kind: str) -> list[str]:
        return self._child_names(kind)

    def result_group(self, kind: str, result_id: str, mode: AccessModeLiteral = "a") -> zarr.Group:
        return zarr.open_group(self.zarr_store, path=f"{kind}/{result_id}", mode=mode)

    # -- models -----------------------------------------------------------------------------

    def models_dir(self) -> Path:
        """Return the local directory of checkpoints the service pretrained itself."""
        if self.local_root is None:
            # Pretrained checkpoints are plain directories that the model loader reads from
            # local disk, so only a store on local disk keeps them.
            raise NotFoundError(
                f"store root {self.root!r} is not a local directory, and pretrained models "
                "(store:<name>) live in a local store only; pretrain with a local "
                "LAYERBANK_STORE, then copy the model's directory into a folder listed in "
                "LAYERBANK_MODEL_ROOTS and extract it by that path",
                field="store",
                value=self.root,
            )
        path = self.local_root / "models"
        path.mkdir(parents=True, exist_ok=True)
        return path
