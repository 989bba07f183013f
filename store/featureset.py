"""Feature sets on disk: one Zarr group per spec with preallocated, block-aligned arrays.

Layout of ``featuresets/<id>/``:

``features``
    array of shape (n_layers, n_items, dim), NaN fill, chunks (1, block_rows, dim) inside shards
    (n_layers, block_rows, dim), so one block of rows is written as one object and one layer is
    read as one chunk per block.
``labels``, ``item_ids``
    arrays of shape (n_items,), written when the group is created.
``token_features``
    only when the spec lists ``token_layers``: array of shape (n_token_layers, n_items, seq, dim)
    of unpooled hidden states, NaN fill, one chunk (1, block_rows, seq, dim) per layer and block.
``blocks_done``
    bool array of shape (n_blocks,), one chunk per block. A block's flag is written only after its
    features, so a flag never covers missing data.

Group attributes hold the spec, the layer map, counts and ``status`` ("pending" or "complete").
Only `FeatureSet.mark_complete` sets "complete", after checking every block flag. The creation
writes all attributes in one object after the arrays, so a group that lacks any of
`CREATION_ATTRS` is one whose creation did not finish.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from store.arrays import group_array
from store.chunks import ShardReader, damaged_error
from store.errors import (
    DamagedCreationArrayError,
    DamagedMetadataError,
    IncompleteFeatureSetError,
    NonFiniteFeaturesError,
    NotReadyError,
    StoreError,
)
from store.spec import FeatureSetSpec

if TYPE_CHECKING:
    from store.root import Store

logger = logging.getLogger(__name__)

STATUS_PENDING = "pending"
STATUS_COMPLETE = "complete"
# Group attributes that every version of `create_featureset` writes. A group that lacks one of
# them was not completely created.
CREATION_ATTRS = (
    "featureset_id",
    "spec",
    "layer_map",
    "class_names",
    "block_rows",
    "n_blocks",
    "status",
    "created",
    "completed",
)


def missing_creation_attrs(attrs: Any) -> list[str]:
    """Return the names in `CREATION_ATTRS` that the group attributes ``attrs`` lack."""
    return [name for name in CREATION_ATTRS if name not in attrs]


def describe_incomplete(featureset_id: str, missing: list[str]) -> str:
    """Return the sentence stating that the creation of a feature set did not finish."""
    lacks = (
        "every creation attribute"
        if len(missing) == len(CREATION_ATTRS)
        else "the creation attributes " + ", ".join(missing)
    )
    return (
        f"feature set {featureset_id!r} was not completely created: its group metadata lacks "
        f"{lacks}, because the process creating it was killed or is still writing it, so it "
        "contains no usable data"
    )


def incomplete_error(
    featureset_id: str, missing: list[str], *, field: str = "featureset_id"
) -> IncompleteFeatureSetError:
    """Return the error for a feature set whose creation did not finish."""
    return IncompleteFeatureSetError(
        f"{describe_incomplete(featureset_id, missing)}; send the same POST /v1/extractions "
        f"again to recreate it, or delete it with DELETE /v1/featuresets/{featureset_id}",
        field=field,
        value=featureset_id,
    )


# Errors zarr 3.1 raises for a zarr.json it cannot use: json's JSONDecodeError and
# UnicodeDecodeError, zarr's MetadataValidationError and ContainsArrayError (all ValueError), and
# TypeError for JSON of another shape. PermissionError is a file the process may not read.
METADATA_ERRORS = (ValueError, TypeError, PermissionError)
# Errors zarr raises when a group's zarr.json is missing. NodeNotFoundError is also a
# ValueError, so these are caught before METADATA_ERRORS.
GROUP_NOT_FOUND_ERRORS = (FileNotFoundError, zarr.errors.GroupNotFoundError)


def damaged_metadata_error(
    featureset_id: str, key: str, cause: Exception | None
) -> DamagedMetadataError:
    """Return the error for the metadata file ``key`` (relative to the feature set's folder)
    that is missing (``cause`` None) or that zarr could not read (``cause``)."""
    if cause is None:
        problem = "is missing"
    else:
        problem = f"cannot be read as Zarr metadata ({type(cause).__name__}: {cause})"
    if key == "zarr.json":
        advice = (
            "its attributes (spec, layers, status) are lost, so `layerbank fsck "
            f"{featureset_id} --repair` deletes the set's folder, and the same POST "
            "/v1/extractions then creates it again"
        )
    elif key == "blocks_done/zarr.json":
        advice = (
            f"`layerbank fsck {featureset_id} --repair` rebuilds it from the group attributes "
            "and keeps the stored done flags"
        )
    else:
        advice = (
            f"`layerbank fsck {featureset_id}` reports it; a repair cannot rebuild it, so "
            f"delete the feature set (DELETE /v1/featuresets/{featureset_id}) and extract it "
            "again"
        )
    damage = (
        f"feature set {featureset_id!r} has damaged metadata: featuresets/{featureset_id}/{key} "
        f"{problem}"
    )
    return DamagedMetadataError(
        f"{damage}; {advice}",
        key=key,
        damage=damage,
        field="featureset_id",
        value=featureset_id,
    )


def open_featureset_group(store: Store, featureset_id: str, mode: Any = "r") -> zarr.Group:
    """Open the Zarr group of a feature set.

    Raises FileNotFoundError or zarr's GroupNotFoundError, as `zarr.open_group` does, when the
    group's zarr.json is missing, and `DamagedMetadataError` when it cannot be read.
    """
    try:
        return zarr.open_group(store.zarr_store, path=f"featuresets/{featureset_id}", mode=mode)
    except GROUP_NOT_FOUND_ERRORS:
        raise
    except METADATA_ERRORS as exc:
        raise damaged_metadata_error(featureset_id, "zarr.json", exc) from exc


def _open_array(group: zarr.Group, featureset_id: str, name: str) -> zarr.Array:
    """Return the array ``name`` of a feature set's group, or raise `DamagedMetadataError` when
    its zarr.json is missing or cannot be read."""
    try:
        return group_array(group, name)
    except KeyError as exc:
        raise damaged_metadata_error(featureset_id, f"{name}/zarr.json", None) from exc
    except METADATA_ERRORS as exc:
        raise damaged_metadata_error(featureset_id, f"{name}/zarr.json", exc) from exc


def _create_blocks_done(zarr_store: Any, path: str, n_blocks: int) -> None:
    """Create the ``blocks_done`` array of the feature set at ``path``: one bool chunk per block."""
    zarr.create_array(
        zarr_store,
        name=f"{path}/blocks_done",
        shape=(n_blocks,),
        chunks=(1,),
        dtype=bool,
        fill_value=False,
        dimension_names=("block",),
    )


def rebuild_blocks_done_metadata(store: Store, featureset_id: str) -> None:
    """Write blocks_done/zarr.json again from the group's ``n_blocks`` attribute.

    Only the metadata file is written, so the stored flag chunks are read again. The metadata
    is built the way `create_featureset` builds it now. NOTE: a set created with other codecs
    for its flags then fails to decode them, which fsck reports as damaged flags.
    """
    group = open_featureset_group(store, featureset_id)
    n_blocks = group.attrs.get("n_blocks")
    if not isinstance(n_blocks, int) or n_blocks < 1:
        damage = (
            f"feature set {featureset_id!r} has no valid n_blocks attribute ({n_blocks!r}), so "
            "blocks_done/zarr.json cannot be rebuilt"
        )
        raise DamagedMetadataError(
            f"{damage}; delete the feature set and extract it again",
            key="zarr.json",
            damage=damage,
            field="featureset_id",
            value=featureset_id,
        )
    scratch = MemoryStore()
    _create_blocks_done(scratch, "set", n_blocks)
    metadata = sync(scratch.get("set/blocks_done/zarr.json", default_buffer_prototype()))
    assert metadata is not None
    sync(store.zarr_store.set(f"featuresets/{featureset_id}/blocks_done/zarr.json", metadata))
    logger.warning("feature set %s: blocks_done/zarr.json rebuilt", featureset_id)


# Target size of one (1, block_rows, dim) chunk: large enough for fast layer reads, small enough
# that a killed worker loses little.
TARGET_CHUNK_BYTES = 2 * 1024 * 1024
MIN_BLOCK_ROWS = 64
MAX_BLOCK_ROWS = 8192
# Decoded (layer, block) chunks of a complete feature set kept in memory per handle, so a
# single-row read does not decode its whole chunk again. Complete feature sets never change,
# and a repair drops the handle (`Store.forget`) with its cache.
READ_CACHE_BYTES = 64 * 1024 * 1024
# Bytes of token-level features one block may hold, across its token layers: a worker keeps a
# whole block in memory before writing it.
TARGET_TOKEN_BLOCK_BYTES = 64 * 1024 * 1024


def default_block_rows(n_items: int, dim: int, dtype: str) -> int:
    """Return the rows per block for a (1, rows, dim) chunk of about 2 MiB, at most ``n_items``."""
    itemsize = np.dtype(dtype).itemsize
    rows = TARGET_CHUNK_BYTES // max(1, dim * itemsize)
    rows = 2 ** int(math.log2(max(rows, 1)))
    rows = min(max(rows, MIN_BLOCK_ROWS), MAX_BLOCK_ROWS)
    return max(1, min(rows, n_items))


@dataclass(frozen=True)
class Progress:
    """Blocks and items written so far."""

    blocks_done: int
    blocks_total: int
    items_done: int
    items_total: int

    def as_dict(self) -> dict[str, int]:
        return {
            "blocks_done": self.blocks_done,
            "blocks_total": self.blocks_total,
            "items_done": self.items_done,
            "items_total": self.items_total,
        }


class PositionView:
    """The features of a complete feature set, (layers, items, dim), read one layer position
    per index through :meth:`FeatureSet.read_position`."""

    def __init__(self, featureset: FeatureSet) -> None:
        self.featureset = featureset
        self.shape = tuple(featureset.features.shape)
        self.dtype = featureset.features.dtype

    def __getitem__(self, position: int) -> np.ndarray:
        return self.featureset.read_position(position)


class FeatureSet:
    """Handle on one feature set group; cheap to keep, re-reads only what can change."""

    def __init__(self, store: Store, featureset_id: str, group: zarr.Group) -> None:
        self.store = store
        self.id = featureset_id
        self._group = group
        self.features = _open_array(group, featureset_id, "features")
        self.labels_array = _open_array(group, featureset_id, "labels")
        self.item_ids_array = _open_array(group, featureset_id, "item_ids")
        self.blocks_done_array = _open_array(group, featureset_id, "blocks_done")
        self._attrs: dict[str, Any] = dict(group.attrs)
        # A set with token layers has the array, so its absence is a missing zarr.json.
        self.token_features: zarr.Array | None = None
        if self._attrs.get("spec", {}).get("token_layers"):
            self.token_features = _open_array(group, featureset_id, "token_features")
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._chunk_bytes = 0
        self._chunk_lock = threading.Lock()
        self._reader = ShardReader.for_array(self.features, featureset_id)

    # -- metadata ---------------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        if self._attrs.get("status") != STATUS_COMPLETE:
            # Pending groups change status when finalised; complete ones never change again.
            self._attrs = dict(open_featureset_group(self.store, self.id).attrs)
        return self._attrs

    @property
    def path(self) -> str:
        return f"featuresets/{self.id}"

    @property
    def spec(self) -> FeatureSetSpec:
        return FeatureSetSpec.model_validate(self.attrs["spec"])

    @property
    def layers(self) -> list[int]:
        return list(self.attrs["spec"]["layers"])

    @property
    def block_rows(self) -> int:
        return int(self.attrs["block_rows"])

    @property
    def n_items(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_blocks(self) -> int:
        return int(self.blocks_done_array.shape[0])

    @property
    def is_complete(self) -> bool:
        return self.attrs.get("status") == STATUS_COMPLETE

    @property
    def known_complete(self) -> bool:
        """Whether this handle has already seen status "complete"; reads nothing from the store."""
        return self._attrs.get("status") == STATUS_COMPLETE

    def block_range(self, block: int) -> tuple[int, int]:
        """Return the [start, stop) rows of ``block``."""
        if not 0 <= block < self.n_blocks:
            raise StoreError(
                f"block {block} is out of range for feature set {self.id!r} "
                f"(0..{self.n_blocks - 1})",
                field="block",
                value=block,
            )
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.n_items)

    def layer_position(self, layer: int) -> int:
        """Return the position along axis 0 of hidden-state index ``layer``."""
        layers = self.layers
        if layer not in layers:
            raise StoreError(
                f"layer {layer!r} is not in feature set {self.id!r}; stored layers are "
                f"{_describe_layers(layers)}",
                field="layer",
                value=layer,
            )
        return layers.index(layer)

    # -- progress ---------------------------------------------------------------------------

    def done_blocks(self) -> np.ndarray:
        """Return the bool array of shape (n_blocks,) of blocks whose data is written."""
        return np.asarray(self.blocks_done_array[:], dtype=bool)

    def missing_blocks(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.done_blocks())]

    def progress(self) -> Progress:
        if self.is_complete:
            # Every done flag is set: mark_complete checks them, and a repair that clears one
            # sets the status back to pending. Reading the flags costs one object per block.
            return Progress(self.n_blocks, self.n_blocks, self.n_items, self.n_items)
        done = self.done_blocks()
        items_done = sum(
            self.block_range(int(b))[1] - self.block_range(int(b))[0] for b in np.flatnonzero(done)
        )
        return Progress(int(done.sum()), self.n_blocks, int(items_done), self.n_items)

    # -- writing ----------------------------------------------------------------------------

    def write_block(
        self, block: int, features: np.ndarray, token_features: np.ndarray | None = None
    ) -> None:
        """Write the features of ``block``, then its done flag.

        Parameters
        ----------
        block
            Block index.
        features
            Array of shape (n_layers, block rows, dim); cast to the stored dtype.
        token_features
            Array of shape (n_token_layers, block rows, seq, dim), required when the feature
            set stores token-level features and rejected otherwise.
        """
        start, stop = self.block_range(block)
        self._check_token_block(block, token_features)
        expected = (self.features.shape[0], stop - start, self.features.shape[2])
        if features.shape != expected:
            raise StoreError(
                f"block {block} of feature set {self.id!r} needs features of shape {expected}, "
                f"got {features.shape}",
                field="features",
                value=features.shape,
            )
        stored = self._stored(block, features, self.features.dtype, "features")
        stored_tokens = None
        if self.token_features is not None and token_features is not None:
            stored_tokens = self._stored(
                block, token_features, self.token_features.dtype, "token features"
            )
        try:
            self.features[:, start:stop, :] = stored
            if self.token_features is not None and stored_tokens is not None:
                self.token_features[:, start:stop] = stored_tokens
            # The flag goes last: a worker killed before this line leaves the block marked missing.
            self.blocks_done_array[block] = True
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StoreError(
                f"no space left on the disk of store {self.store.root!r} while writing block "
                f"{block} of feature set {self.id!r} ({exc.strerror}); free space or enlarge the "
                "volume, then resume the job",
                field="store",
                value=self.store.root,
            ) from exc
        logger.debug("feature set %s: block %d rows %d..%d written", self.id, block, start, stop)

    def _stored(self, block: int, values: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
        """Return ``values`` cast to the stored ``dtype``, or raise NonFiniteFeaturesError if
        they contain NaN or infinity before or after the cast."""
        if not np.all(np.isfinite(values)):
            model = self.attrs["spec"]["model"]
            raise NonFiniteFeaturesError(
                f"block {block} of feature set {self.id!r} has non-finite {name}: model "
                f"{model!r} produced NaN or infinity in float32, so the block was not written; "
                "its weights or activations overflow, and no request value changes that, so "
                "check the checkpoint",
                field="model",
                value=model,
            )
        with np.errstate(over="ignore"):
            stored = values.astype(dtype, copy=False)
        if not np.all(np.isfinite(stored)):
            largest = float(np.abs(values).max())
            limit = float(np.finfo(dtype).max)
            raise NonFiniteFeaturesError(
                f"block {block} of feature set {self.id!r} has {name} up to {largest:.4g} in "
                f"magnitude, beyond the {limit:.0f} that dtype {dtype.name} holds, so the block "
                "was not written; send the extraction again with dtype float32",
                field="dtype",
                value=dtype.name,
            )
        return stored

    def _check_token_block(self, block: int, token_features: np.ndarray | None) -> None:
        if self.token_features is None:
            if token_features is not None:
                raise StoreError(
                    f"feature set {self.id!r} stores no token-level features, but "
                    f"block {block} came with some",
                    field="token_features",
                    value=block,
                )
            return
        start, stop = self.block_range(block)
        n_token_layers, _, seq, dim = self.token_features.shape
        expected = (n_token_layers, stop - start, seq, dim)
        if token_features is None or token_features.shape != expected:
            shape = None if token_features is None else token_features.shape
            raise StoreError(
                f"block {block} of feature set {self.id!r} needs token features of shape "
                f"{expected}, got {shape}",
                field="token_features",
                value=shape,
            )

    def mark_complete(self) -> bool:
        """Set status "complete" if every block is written; return whether it is complete."""
        # Read from the store, not this handle, because fsck with repair may have set it back
        # to pending.
        stored = open_featureset_group(self.store, self.id).attrs
        if stored.get("status") == STATUS_COMPLETE:
            self._attrs = dict(stored)
            return True  # A block job or an earlier finalize already marked it.
        missing = self.missing_blocks()
        if missing:
            logger.info("feature set %s: %d blocks still missing", self.id, len(missing))
            return False
        group = open_featureset_group(self.store, self.id, mode="r+")
        # One write of the group metadata, unlike group.attrs.update, which writes once per key.
        group.update_attributes(
            {"status": STATUS_COMPLETE, "completed": dt.datetime.now(dt.timezone.utc).isoformat()}
        )
        self._attrs = dict(group.attrs)
        self.store.forget(self.id)
        logger.info("feature set %s: complete", self.id)
        return True

    # -- reading ----------------------------------------------------------------------------

    def require_complete(self) -> None:
        if not self.is_complete:
            progress = self.progress()
            raise NotReadyError(
                f"feature set {self.id!r} is not complete yet ({progress.blocks_done}/"
                f"{progress.blocks_total} blocks written); wait for its job to finish",
                field="featureset_id",
                value=self.id,
                progress=progress.as_dict(),
            )

    def read_layer(
        self, layer: int, start: int | None = None, stop: int | None = None
    ) -> np.ndarray:
        """Return rows [start, stop) of hidden-state index ``layer``, array of shape (rows, dim).

        A range inside one block is served from an in-memory cache of blocks, because any
        row of a block costs a read and checksum of its whole (1, block_rows, dim) chunk.
        """
        self.require_complete()
        position = self.layer_position(layer)
        start, stop = self.check_rows(start, stop)
        block = self._inner_block(start, stop)
        if block is not None:
            chunk = self._cached_chunk(position, block)  # (block rows, dim)
            offset = block * self.block_rows
            return chunk[start - offset : stop - offset].copy()
        return self._read_rows(position, start, stop)

    def read_position(self, position: int) -> np.ndarray:
        """Return every row at ``position`` along the layer axis, shape (n_items, dim)."""
        self.require_complete()
        if not 0 <= position < self.features.shape[0]:
            raise StoreError(
                f"layer position {position} is out of range for feature set {self.id!r} "
                f"(0..{self.features.shape[0] - 1})",
                field="layer",
                value=position,
            )
        return self._read_rows(position, 0, self.n_items)

    def by_position(self) -> PositionView:
        """Return the features as an array-like of shape (layers, items, dim) that reads one
        layer position per index, for the probe engines."""
        return PositionView(self)

    def _read_rows(self, position: int, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.features.shape[2]), dtype=self.features.dtype)
        at = 0
        for piece in self._pieces(position, start, stop):
            out[at : at + len(piece)] = piece
            at += len(piece)
        return out

    def iter_layer(
        self, layer: int, start: int | None = None, stop: int | None = None
    ) -> Iterator[np.ndarray]:
        """Yield rows [start, stop) of ``layer`` as consecutive arrays of shape (rows, dim).

        Each array covers at most one block, so a whole layer is read one chunk at a time and
        memory holds one block whatever the layer's size. The checks run before the first
        array is yielded, when the generator is first advanced.
        """
        self.require_complete()
        position = self.layer_position(layer)
        start, stop = self.check_rows(start, stop)
        yield from self._pieces(position, start, stop)

    def check_layer(self, layer: int, start: int | None = None, stop: int | None = None) -> None:
        """Raise DamagedChunkError when a chunk of rows [start, stop) of ``layer`` is missing
        or truncated, from the shard indexes alone. The reads check the checksums. With a
        store other than a local directory this checks nothing."""
        position = self.layer_position(layer)
        start, stop = self.check_rows(start, stop)
        if self._reader is None or start == stop:
            return
        for block in range(start // self.block_rows, (stop - 1) // self.block_rows + 1):
            self._reader.check(position, block)

    def _pieces(self, position: int, start: int, stop: int) -> Iterator[np.ndarray]:
        """Yield rows [start, stop) at layer ``position``, one array per block."""
        rows = self.block_rows
        while start < stop:
            block = start // rows
            piece_stop = min((block + 1) * rows, stop)  # the end of start's block
            offset = block * rows
            if self._reader is not None:
                yield self._reader.read(position, block)[start - offset : piece_stop - offset]
            else:
                piece = np.asarray(self.features[position, start:piece_stop, :])
                # write_block accepts only finite values, so a NaN here is the fill value of a chunk
                # that zarr found missing.
                if not np.isfinite(piece).all():
                    raise damaged_error(
                        self.id,
                        f"block {block} at layer position {position}",
                        "contains values that are not finite, so a stored object is missing",
                    )
                yield piece
            start = piece_stop

    def cached_rows(self, position: int, start: int, stop: int) -> np.ndarray | None:
        """Return rows [start, stop) at layer ``position`` from the decoded-block cache, or None.

        None unless the range lies inside one block whose chunk is already decoded, so this
        never reads the store and may run on an event loop.
        """
        block = self._inner_block(start, stop)
        if block is None:
            return None
        with self._chunk_lock:
            chunk = self._chunks.get((position, block))
            if chunk is None:
                return None
            self._chunks.move_to_end((position, block))
        offset = block * self.block_rows
        return chunk[start - offset : stop - offset].copy()

    def _inner_block(self, start: int, stop: int) -> int | None:
        """Return the block that contains rows [start, stop) when they lie inside one block."""
        block = start // self.block_rows
        block_start = block * self.block_rows
        if start < stop <= block_start + self.block_rows:
            return block
        return None

    def _cached_chunk(self, position: int, block: int) -> np.ndarray:
        """Return the decoded rows of ``block`` at layer ``position``, shape (rows, dim)."""
        key = (position, block)
        with self._chunk_lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
                return chunk
        start, stop = self.block_range(block)
        (chunk,) = self._pieces(position, start, stop)
        chunk.flags.writeable = False
        with self._chunk_lock:
            if key not in self._chunks:
                self._chunks[key] = chunk
                self._chunk_bytes += chunk.nbytes
            while self._chunk_bytes > READ_CACHE_BYTES and len(self._chunks) > 1:
                _, evicted = self._chunks.popitem(last=False)
                self._chunk_bytes -= evicted.nbytes
        return chunk

    def read_labels(self, start: int | None = None, stop: int | None = None) -> np.ndarray:
        start, stop = self.check_rows(start, stop)
        return self._read_creation_array("labels", self.labels_array, start, stop)

    def read_item_ids(self) -> np.ndarray:
        """Return the dataset position of every item, int64 of shape (n_items,)."""
        return self._read_creation_array("item_ids", self.item_ids_array, 0, self.n_items)

    def _read_creation_array(self, name: str, array: Any, start: int, stop: int) -> np.ndarray:
        """Return rows [start, stop) of an array written when the set was created, or raise
        DamagedCreationArrayError when a stored object of it cannot be decoded."""
        try:
            return np.asarray(array[start:stop])
        except Exception as exc:  # any decode failure means a stored object is damaged
            raise DamagedCreationArrayError(
                f"{name} of rows {start} to {stop} of feature set {self.id!r} cannot be decoded "
                f"({type(exc).__name__}: {exc}); {name} are written once when the set is "
                "created and a resume cannot rewrite them, so delete the feature set and extract "
                f"it again (GET /v1/featuresets/{self.id}/fsck names the damaged object)",
                field="featureset_id",
                value=self.id,
            ) from exc

    @property
    def ids_span_splits(self) -> bool | None:
        """Whether an item id names the same item in every split of the dataset, or None for
        a feature set created before this was recorded."""
        recorded = self.attrs.get("item_ids_span_splits")
        return None if recorded is None else bool(recorded)

    def check_rows(self, start: int | None, stop: int | None) -> tuple[int, int]:
        """Return the validated [start, stop) row range; None means the ends."""
        n = self.n_items
        start = 0 if start is None else start
        stop = n if stop is None else stop
        if not 0 <= start <= n:
            raise StoreError(
                f"start {start} is out of range (0..{n}); feature set {self.id!r} has {n} items",
                field="start",
                value=start,
            )
        if not start <= stop <= n:
            raise StoreError(
                f"stop {stop} is out of range ({start}..{n}); feature set {self.id!r} "
                f"has {n} items",
                field="stop",
                value=stop,
            )
        return start, stop

    def summary(self) -> dict[str, Any]:
        """Return the public description: spec, layer map, shape, dtype, status, progress."""
        attrs = self.attrs
        progress = self.progress()
        return {
            "featureset_id": self.id,
            "status": attrs.get("status", STATUS_PENDING),
            "spec": attrs["spec"],
            "layer_map": attrs.get("layer_map", []),
            "shape": list(self.features.shape),
            "dtype": str(self.features.dtype),
            "n_items": self.n_items,
            "dim": int(self.features.shape[2]),
            "block_rows": self.block_rows,
            "class_names": attrs.get("class_names", []),
            "created": attrs.get("created"),
            "completed": attrs.get("completed"),
            "progress": progress.as_dict(),
            "token_layers": list(attrs["spec"].get("token_layers", [])),
            "token_shape": (
                list(self.token_features.shape) if self.token_features is not None else None
            ),
        }


def create_featureset(
    store: Store,
    spec: FeatureSetSpec,
    *,
    layer_map: list[dict[str, Any]],
    dim: int,
    labels: np.ndarray,
    item_ids: np.ndarray,
    class_names: list[str],
    block_rows: int | None = None,
    n_tokens: int | None = None,
    max_blocks: int | None = None,
    ids_span_splits: bool = False,
) -> FeatureSet:
    """Create the group of ``spec`` with preallocated arrays, or return the existing one.

    Parameters
    ----------
    layer_map
        One entry per stored layer, ``{"layer": i, "description": ...}``, in spec order.
    labels, item_ids
        Arrays of shape (n_items,).
    ids_span_splits
        Whether an item id names the same item in every split of the dataset, so that the
        items two feature sets of different splits share can be found.
    n_tokens
        Sequence length of the token-level features; required when ``spec.token_layers`` is
        not empty. Without ``block_rows``, blocks are then made small enough that one block of
        token features is about 64 MiB.
    max_blocks
        Without ``block_rows``, blocks are made large enough that the set has at most this
        many.
    """
    featureset_id = spec.featureset_id()
    existing = store.find_featureset(featureset_id)
    if existing is not None:
        return existing
    missing = store.missing_creation_attrs(featureset_id)
    if missing:
        logger.warning(
            "feature set %s: creating it again, because its earlier creation did not finish "
            "(missing attributes: %s)",
            featureset_id,
            ", ".join(missing),
        )

    n_items = int(labels.shape[0])
    n_layers = len(spec.layers)
    n_token_layers = len(spec.token_layers)
    if n_token_layers and not n_tokens:
        raise StoreError(
            "token_layers need the sequence length of the model (n_tokens)",
            field="token_layers",
            value=spec.token_layers,
        )
    rows = block_rows or default_block_rows(n_items, dim, spec.dtype)
    if n_token_layers and n_tokens and block_rows is None:
        token_row_bytes = n_token_layers * n_tokens * dim * np.dtype(spec.dtype).itemsize
        rows = min(rows, max(1, TARGET_TOKEN_BLOCK_BYTES // token_row_bytes))
    if max_blocks is not None and block_rows is None:
        rows = max(rows, -(-n_items // max_blocks))
    rows = max(1, min(rows, n_items))
    n_blocks = math.ceil(n_items / rows)
    path = f"featuresets/{featureset_id}"

    # Write an empty group first (mode "w" deletes what an interrupted creation left), then the
    # arrays, then every attribute in one write of the group metadata. A group that lacks any of
    # CREATION_ATTRS was therefore interrupted, so readers treat it as absent and the next
    # request for the spec creates it again.
    group = zarr.open_group(store.zarr_store, path=path, mode="w")
    zarr.create_array(
        store.zarr_store,
        name=f"{path}/features",
        shape=(n_layers, n_items, dim),
        chunks=(1, rows, dim),
        shards=(n_layers, rows, dim),
        dtype=spec.dtype,
        fill_value=np.nan,
        # A checksum per chunk makes flipped or truncated bytes fail to decode (see store.fsck).
        compressors=[Crc32cCodec()],
        dimension_names=("layer", "item", "dim"),
    )
    if n_token_layers and n_tokens:
        zarr.create_array(
            store.zarr_store,
            name=f"{path}/token_features",
            shape=(n_token_layers, n_items, n_tokens, dim),
            chunks=(1, rows, n_tokens, dim),
            dtype=spec.dtype,
            fill_value=np.nan,
            # A checksum per chunk makes flipped or truncated bytes fail to decode (see store.fsck).
            compressors=[Crc32cCodec()],
            dimension_names=("token_layer", "item", "position", "dim"),
        )
    zarr.create_array(
        store.zarr_store,
        name=f"{path}/labels",
        data=labels.astype(np.int64),
        chunks=(rows,),
        dimension_names=("item",),
    )
    zarr.create_array(
        store.zarr_store,
        name=f"{path}/item_ids",
        data=item_ids.astype(np.int64),
        chunks=(rows,),
        dimension_names=("item",),
    )
    _create_blocks_done(store.zarr_store, path, n_blocks)
    # group.attrs.update would write the group metadata once per key, so a kill between two
    # writes would leave a spec without block_rows.
    group.update_attributes(
        {
            "featureset_id": featureset_id,
            "spec": spec.model_dump(),
            "layer_map": layer_map,
            "class_names": class_names,
            "item_ids_span_splits": ids_span_splits,
            "block_rows": rows,
            "n_blocks": n_blocks,
            "status": STATUS_PENDING,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            "completed": None,
        }
    )
    logger.info(
        "feature set %s: created, %d layers x %d items x %d dim in %d blocks",
        featureset_id,
        n_layers,
        n_items,
        dim,
        n_blocks,
    )
    return FeatureSet(store, featureset_id, group)


def _describe_layers(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) if layers else False:
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(str(layer) for layer in layers)
