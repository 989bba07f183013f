"""Consistency check of a feature set on disk: decode every chunk, compare data with the flags.

`check_featureset` reads every shard and chunk of every array of a feature set block by block,
so a truncated, garbled or deleted object is reported with the block it belongs to instead of
failing a reader later. The features are stored with a CRC-32C checksum per chunk, so flipped
bytes fail to decode. With ``repair=True`` it clears the done flag of every damaged block and
deletes the damaged objects, so resuming the feature set's job writes those blocks again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.core.sync import sync

from store.errors import DamagedMetadataError, IncompleteFeatureSetError, LayoutError
from store.featureset import (
    STATUS_PENDING,
    FeatureSet,
    describe_incomplete,
    open_featureset_group,
    rebuild_blocks_done_metadata,
)

if TYPE_CHECKING:
    from store.root import Store

logger = logging.getLogger(__name__)

# zarr's LocalStore writes each object to "<name>.<uuid hex>.partial" and renames it; a writer
# killed between the two steps leaves the temporary file behind.
PARTIAL_SUFFIX = ".partial"
# At every group creation, zarr 3.1 writes the metadata of the store root and of featuresets/ to
# a temporary file, links it into place only when the metadata is missing, then removes it. Such
# a file younger than this many seconds may belong to a write that another process is doing now.
STORE_PARTIAL_MIN_AGE_S = 60.0
# Arrays whose rows are written by block jobs; a damaged block of these is rewritten by resume.
BLOCK_ARRAYS = ("features", "token_features")
# Arrays written once when the feature set is created; resume cannot rewrite them.
CREATION_ARRAYS = ("labels", "item_ids")


def check_featureset(store: Store, featureset_id: str, *, repair: bool = False) -> dict[str, Any]:
    """Check that every object of a feature set decodes and every done block holds finite data.

    Parameters
    ----------
    store
        The store that contains the feature set.
    featureset_id
        Id of the feature set; `NotFoundError` if it does not exist.
    repair
        Clear the done flag of each block whose data is damaged, delete its damaged objects
        and ``*.partial`` files, and set the status back to "pending", so that resuming the
        job rewrites those blocks. Run it only while no job writes the feature set.

    Returns
    -------
    dict
        ``ok`` (no damage found in the feature set), ``status``, ``missing_blocks`` (blocks
        not written yet), ``corrupt_blocks``, ``corrupt_chunks`` (store keys relative to the
        feature set), ``partial_files``, ``problems`` (one sentence each; stray files of the
        store's own metadata are listed without making ``ok`` false), ``repaired`` (actions
        taken).
    """
    # Read the metadata from the store, not from a handle opened before the damage.
    store.forget(featureset_id)
    try:
        featureset = store.featureset(featureset_id)
    except IncompleteFeatureSetError:
        return _incomplete_report(store, featureset_id, repair=repair)
    except DamagedMetadataError as exc:
        return _damaged_metadata_report(store, featureset_id, exc, repair=repair)
    except LayoutError as exc:
        return _layout_report(featureset_id, exc)
    report: dict[str, Any] = {
        "featureset_id": featureset_id,
        "ok": True,
        "status": featureset.attrs.get("status", STATUS_PENDING),
        "n_blocks": featureset.n_blocks,
        "missing_blocks": [],
        "corrupt_blocks": [],
        "corrupt_chunks": [],
        "partial_files": [],
        "problems": [],
        "repaired": [],
    }
    checker = _Checker(featureset, report)
    checker.check_flags()
    for block in range(featureset.n_blocks):
        checker.check_block(block)
    report["partial_files"] = _partial_files(store, featureset.path)
    for name in report["partial_files"]:
        report["problems"].append(
            f"temporary file {name!r} was left by a writer that stopped mid-write; the object "
            "it was replacing is unchanged, and fsck with repair deletes the file"
        )
    if report["status"] == "complete" and report["missing_blocks"]:
        report["problems"].append(
            f"status is 'complete' but blocks {report['missing_blocks']} are not flagged done; "
            + _REPAIR_THEN_RESUME
        )
    report["corrupt_blocks"] = sorted(set(report["corrupt_blocks"]))
    report["ok"] = not report["problems"]
    # Stray files of the store's own metadata are listed and repaired here, but no feature set
    # depends on them, so they leave ok as it is.
    _add_store_partial_files(store, report)
    if repair and report["problems"]:
        _repair(store, featureset, report)
        # The problems stay as found; their advice now starts at the step left to do.
        report["problems"] = [
            problem.replace(_REPAIR_THEN_RESUME, "resume the job") for problem in report["problems"]
        ]
    logger.info(
        "feature set %s: fsck %s, %d missing blocks, %d corrupt chunks, %d partial files",
        featureset_id,
        "ok" if report["ok"] else "found problems",
        len(report["missing_blocks"]),
        len(report["corrupt_chunks"]),
        len(report["partial_files"]),
    )
    return report


def _incomplete_report(store: Store, featureset_id: str, *, repair: bool) -> dict[str, Any]:
    """Return the report of a feature set whose creation did not finish.

    With ``repair``, delete its folder, so that the same extraction request creates it from
    scratch.
    """
    missing = store.missing_creation_attrs(featureset_id) or []
    problem = describe_incomplete(featureset_id, missing)
    report = _folder_report(store, featureset_id, problem, repair=repair)
    logger.info("feature set %s: fsck found an unfinished creation", featureset_id)
    return report


def _folder_report(
    store: Store, featureset_id: str, problem: str, *, repair: bool, damaged: bool = False
) -> dict[str, Any]:
    """Return the report of a feature set that has no usable group attributes, with
    ``problem`` first. With ``repair``, delete its folder. ``damaged`` marks a group whose
    metadata file is damaged rather than one whose creation did not finish."""
    path = f"featuresets/{featureset_id}"
    report = _unreadable_report(featureset_id, partial_files=_partial_files(store, path))
    _add_store_partial_files(store, report)
    if repair:
        _delete_partial_files(store, path, report)
        sync(store.zarr_store.delete_dir(path))
        store.forget(featureset_id)
        report["repaired"].append(f"deleted the folder {path}")
        advice = "fsck deleted its folder, so send the same POST /v1/extractions again to create it"
        logger.warning(
            "feature set %s: fsck repaired: %s", featureset_id, "; ".join(report["repaired"])
        )
    elif damaged:
        # The API reads a damaged group as a damaged set (409), not as an unfinished one, so
        # the POST recreates it only after the repair.
        advice = (
            "run fsck with repair to delete its folder, then send the same POST "
            "/v1/extractions again to create it"
        )
    else:
        advice = (
            "send the same POST /v1/extractions again to recreate it, or run fsck with repair "
            "to delete its folder"
        )
    report["problems"].insert(0, f"{problem}; {advice}")
    return report


def _damaged_metadata_report(
    store: Store, featureset_id: str, exc: DamagedMetadataError, *, repair: bool
) -> dict[str, Any]:
    """Return the report of a feature set with a damaged zarr.json.

    With ``repair``: a damaged group metadata file loses the attributes, so the folder is
    deleted as for an unfinished creation. The metadata of ``blocks_done`` is rebuilt from the
    group attributes and the set is checked again. The metadata of the data arrays is left as
    it is, because their shape, width and codecs are recorded nowhere else.
    """
    logger.info("feature set %s: fsck found damaged metadata: %s", featureset_id, exc.message)
    if exc.key == "zarr.json":
        problem = exc.damage + ", so its attributes (spec, layers, status) are lost"
        return _folder_report(store, featureset_id, problem, repair=repair, damaged=True)
    if exc.key == "blocks_done/zarr.json" and repair:
        rebuild_blocks_done_metadata(store, featureset_id)
        store.forget(featureset_id)
        report = check_featureset(store, featureset_id, repair=True)
        report["ok"] = False
        report["problems"].insert(0, exc.damage)
        report["repaired"].insert(0, "rebuilt blocks_done/zarr.json from the group attributes")
        return report
    report = _unreadable_report(featureset_id, partial_files=[])
    if exc.key == "blocks_done/zarr.json":
        advice = "run fsck with repair to rebuild it from the group attributes"
    else:
        advice = (
            "a repair cannot rebuild it, because the array's shape and codecs are recorded only "
            "there, so delete the feature set and extract it again"
        )
    report["problems"].append(f"{exc.damage}; {advice}")
    return report


def _layout_report(featureset_id: str, exc: LayoutError) -> dict[str, Any]:
    """Return the report of a feature set whose group lacks one of its arrays."""
    report = _unreadable_report(featureset_id, partial_files=[])
    report["problems"].append(
        f"{exc.message.split(';')[0]}; delete the feature set and extract it again"
    )
    return report


def _unreadable_report(featureset_id: str, *, partial_files: list[str]) -> dict[str, Any]:
    """Return a failed report without block figures, for a set whose blocks cannot be read."""
    return {
        "featureset_id": featureset_id,
        "ok": False,
        "status": None,
        "n_blocks": None,
        "missing_blocks": [],
        "corrupt_blocks": [],
        "corrupt_chunks": [],
        "partial_files": partial_files,
        "problems": [],
        "repaired": [],
    }


class _Checker:
    """Reads one feature set block by block and records what fails in ``report``."""

    def __init__(self, featureset: FeatureSet, report: dict[str, Any]) -> None:
        self.featureset = featureset
        self.report = report
        self.done = np.zeros(featureset.n_blocks, dtype=bool)
        self.arrays: dict[str, Any] = {
            "features": featureset.features,
            "labels": featureset.labels_array,
            "item_ids": featureset.item_ids_array,
        }
        if featureset.token_features is not None:
            self.arrays["token_features"] = featureset.token_features

    def check_flags(self) -> None:
        """Read the done flags chunk by chunk; an unreadable flag counts as not done."""
        flags: Any = self.featureset.blocks_done_array
        for block in range(self.featureset.n_blocks):
            try:
                self.done[block] = bool(flags[block])
            except Exception as exc:  # any decode failure means the object is damaged
                self._corrupt("blocks_done", flags, (block,), block, exc)
        self.report["missing_blocks"] = [int(b) for b in np.flatnonzero(~self.done)]

    def check_block(self, block: int) -> None:
        start, stop = self.featureset.block_range(block)
        for name, array in self.arrays.items():
            for coords, selection in _block_chunks(array, block, start, stop):
                try:
                    values = np.asarray(array[selection])
                except Exception as exc:  # any decode failure means the object is damaged
                    self._corrupt(name, array, coords, block, exc)
                    continue
                if name in BLOCK_ARRAYS and self.done[block] and not np.isfinite(values).all():
                    self._not_finite(name, array, coords, block)

    def _corrupt(
        self, name: str, array: zarr.Array, coords: tuple[int, ...], block: int, exc: Exception
    ) -> None:
        key = _chunk_key(name, array, coords)
        self.report["corrupt_chunks"].append(key)
        if name not in CREATION_ARRAYS:
            # A resume rewrites only the blocks of these arrays, so only their flags are cleared.
            self.report["corrupt_blocks"].append(block)
        self.report["problems"].append(
            f"{key} of block {block} cannot be decoded ({type(exc).__name__}: {exc}); "
            f"{_advice(name)}"
        )

    def _not_finite(
        self, name: str, array: zarr.Array, coords: tuple[int, ...], block: int
    ) -> None:
        key = _chunk_key(name, array, coords)
        self.report["corrupt_chunks"].append(key)
        self.report["corrupt_blocks"].append(block)
        exists = sync(self.featureset.store.zarr_store.exists(f"{self.featureset.path}/{key}"))
        reason = "its object is missing" if not exists else "it contains NaN or infinity"
        self.report["problems"].append(
            f"block {block} is flagged done but {key} is not finite because {reason}; "
            f"{_advice(name)}"
        )


# The advice for damage a repair and a resume fix.
_REPAIR_THEN_RESUME = "run fsck with repair, then resume the job"


def _block_chunks(
    array: zarr.Array, block: int, start: int, stop: int
) -> list[tuple[tuple[int, ...], tuple[Any, ...]]]:
    """Return (chunk-grid coordinates, selection) of every stored object holding rows of ``block``.

    Rows are axis 1 of ``features`` and ``token_features`` and axis 0 of the 1-D arrays. A
    sharded array stores one object per shard, any other array one per chunk.
    """
    if array.ndim == 1:
        return [((block,), (slice(start, stop),))]
    grid = array.shards or array.chunks
    per_object = grid[0]
    objects = []
    for first in range(0, array.shape[0], per_object):
        coords = (first // per_object, block, *([0] * (array.ndim - 2)))
        objects.append((coords, (slice(first, first + per_object), slice(start, stop))))
    return objects


def _chunk_key(name: str, array: zarr.Array, coords: tuple[int, ...]) -> str:
    return f"{name}/{array.metadata.encode_chunk_key(coords)}"


def _advice(name: str) -> str:
    if name in CREATION_ARRAYS:
        return "resume cannot rewrite it, so delete the feature set and extract it again"
    return f"{_REPAIR_THEN_RESUME} to rewrite the block"


def _partial_files(store: Store, path: str) -> list[str]:
    """Return the ``*.partial`` files under the feature set, relative to it (local roots only)."""
    if store.local_root is None:
        # NOTE: object stores write whole objects, so only local roots can hold partial files.
        return []
    directory = Path(store.local_root) / path
    return sorted(
        str(file.relative_to(directory))
        for file in directory.rglob(f"*{PARTIAL_SUFFIX}")
        if file.is_file()
    )


def _add_store_partial_files(store: Store, report: dict[str, Any]) -> None:
    """Add the abandoned temporary files of the store's own metadata to ``report``, as paths
    relative to the feature set's folder (``../zarr.<hex>.partial`` lies in featuresets/)."""
    for name in _store_partial_files(store):
        group = "the store root's" if name.startswith("../../") else "the featuresets folder's"
        report["partial_files"].append(name)
        report["problems"].append(
            f"temporary file {name!r} was left by a write of {group} group metadata that "
            "stopped midway; no feature set depends on it, and fsck with repair deletes it"
        )


def _store_partial_files(store: Store) -> list[str]:
    """Return the ``*.partial`` files in the store root and in featuresets/ that are older than
    `STORE_PARTIAL_MIN_AGE_S`, relative to a feature set's folder (local roots only)."""
    if store.local_root is None:
        return []
    root = Path(store.local_root)
    now = time.time()
    found = []
    for directory, prefix in ((root, "../../"), (root / "featuresets", "../")):
        if not directory.is_dir():
            continue
        for file in sorted(directory.glob(f"*{PARTIAL_SUFFIX}")):
            try:
                info = file.stat()
            except FileNotFoundError:
                continue  # the write finished, or another fsck deleted it
            if file.is_file() and now - info.st_mtime >= STORE_PARTIAL_MIN_AGE_S:
                found.append(prefix + file.name)
    return found


def _delete_partial_files(store: Store, path: str, report: dict[str, Any]) -> None:
    """Delete the temporary files that ``report`` lists relative to the folder ``path``."""
    if store.local_root is None:
        return
    folder = Path(store.local_root) / path
    for name in report["partial_files"]:
        # normpath resolves the ../ of the store's own files, also once the folder is gone.
        Path(os.path.normpath(folder / name)).unlink(missing_ok=True)
        report["repaired"].append(f"deleted {name}")


def _repair(store: Store, featureset: FeatureSet, report: dict[str, Any]) -> None:
    """Clear the flags of damaged blocks, delete damaged objects and partial files."""
    zarr_store = store.zarr_store
    for key in report["corrupt_chunks"]:
        if key.split("/", 1)[0] in (*BLOCK_ARRAYS, "blocks_done"):
            # zarr reads an existing shard before overwriting it, so a damaged shard would make
            # the rewrite fail: delete it and let the block job write a fresh one.
            sync(zarr_store.delete(f"{featureset.path}/{key}"))
            report["repaired"].append(f"deleted {key}")
    for block in report["corrupt_blocks"]:
        featureset.blocks_done_array[block] = False
        report["repaired"].append(f"cleared the done flag of block {block}")
    _delete_partial_files(store, featureset.path, report)
    if report["corrupt_blocks"] or report["missing_blocks"]:
        group = open_featureset_group(store, featureset.id, mode="r+")
        if group.attrs.get("status") != STATUS_PENDING:
            group.update_attributes({"status": STATUS_PENDING, "completed": None})
            report["repaired"].append("set status to 'pending'")
            report["status"] = STATUS_PENDING
        store.forget(featureset.id)
    report["missing_blocks"] = sorted(set(report["missing_blocks"]) | set(report["corrupt_blocks"]))
    logger.warning(
        "feature set %s: fsck repaired: %s", featureset.id, "; ".join(report["repaired"])
    )
