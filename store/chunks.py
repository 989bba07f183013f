"""Direct reads of the feature chunks from the shard files of a local store.

Every feature set's ``features`` array has one layout. Shards have shape
(layers per shard, block rows, dim) and inner chunks (1, block rows, dim). Each chunk is stored
as raw little-endian bytes followed by its CRC-32C. The shard index, one (offset, length) pair
of uint64 per inner chunk and then its own CRC-32C, ends the shard file. That is the Zarr v3
``sharding_indexed`` codec with the ``bytes`` and ``crc32c`` codecs.

A :class:`ShardReader` reads a chunk with two ``pread`` calls (index, then chunk), checks
both checksums and returns the rows without another copy. It read layers at about 5 times the
speed of zarr's ``Array`` on the same files (6,861 against 1,250 MB/s, 2-core AMD EPYC, zarr
3.1.6, ``OMP_NUM_THREADS=1 .venv/bin/python -m bench.store --skip api``).

It only reads arrays with exactly that layout in a local directory. For any other array
(another store, compression, another codec chain) ``ShardReader.for_array`` returns None,
so the caller reads through zarr instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.storage import LocalStore

from store.errors import DamagedChunkError

# Index entries of an inner chunk that was never written (all fill value).
_EMPTY = np.uint64(2**64 - 1)
_CRC_BYTES = 4


class ShardReader:
    """Reads (block rows, dim) chunks of one sharded 3-D array on a local disk.

    Use :meth:`for_array`, which checks the layout. Safe to share between threads: every
    read opens its own file descriptor.
    """

    def __init__(
        self,
        directory: Path,
        shard_layers: int,
        rows: int,
        dim: int,
        dtype: np.dtype,
        featureset_id: str,
    ) -> None:
        self.directory = directory
        self.featureset_id = featureset_id
        self.shard_layers = shard_layers
        self.rows = rows
        self.dim = dim
        self.dtype = dtype
        self.chunk_bytes = rows * dim * dtype.itemsize + _CRC_BYTES
        self.index_bytes = shard_layers * 16 + _CRC_BYTES

    @classmethod
    def for_array(cls, array: zarr.Array, featureset_id: str) -> ShardReader | None:
        """Return a reader for ``array``, the features of ``featureset_id``, or None when its
        layout or store is not the one above."""
        store = array.store
        meta = array.metadata
        if not isinstance(store, LocalStore) or meta.zarr_format != 3 or array.ndim != 3:
            return None
        encoding = meta.chunk_key_encoding
        if not isinstance(encoding, DefaultChunkKeyEncoding) or encoding.separator != "/":
            return None
        if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
            return None
        sharding = meta.codecs[0]
        little = BytesCodec(endian="little")
        raw_chain = (little, Crc32cCodec())
        if (
            tuple(sharding.codecs) != raw_chain
            or tuple(sharding.index_codecs) != raw_chain
            or sharding.index_location != ShardingCodecIndexLocation.end
        ):
            return None
        shard_shape = tuple(array.shards or ())
        chunk_shape = tuple(sharding.chunk_shape)
        if len(shard_shape) != 3 or chunk_shape != (1, *shard_shape[1:]):
            return None
        if shard_shape[2] != array.shape[2]:
            return None
        dtype = np.dtype(array.dtype).newbyteorder("<")
        directory = Path(store.root) / array.path / "c"
        return cls(directory, shard_shape[0], shard_shape[1], shard_shape[2], dtype, featureset_id)

    def key(self, position: int, block: int) -> str:
        """Return the shard's store key relative to the feature set, as ``fsck`` reports it."""
        return f"features/c/{position // self.shard_layers}/{block}/0"

    def read(self, position: int, block: int) -> np.ndarray:
        """Return the chunk at layer ``position`` and ``block``, shape (block rows, dim).

        Rows past the end of the array (in the last block) contain the fill value. Raises
        DamagedChunkError when the shard file or the chunk is missing, truncated or fails a
        checksum: layerbank writes every chunk of a block before it marks the block done,
        so a missing chunk in a complete feature set means lost data, not fill values.
        """
        key = self.key(position, block)
        fd = self._open(key)
        try:
            offset = self._chunk_offset(fd, key, position)
            buffer = np.empty(self.chunk_bytes, dtype=np.uint8)
            got = os.preadv(fd, [buffer.data], offset)
        finally:
            os.close(fd)
        if got != self.chunk_bytes or _checked(buffer) is None:
            raise self._damaged(key, f"fails the checksum of layer position {position}")
        chunk = buffer[:-_CRC_BYTES].view(self.dtype).reshape(self.rows, self.dim)
        return chunk.astype(self.dtype.newbyteorder("="), copy=False)

    def check(self, position: int, block: int) -> None:
        """Raise DamagedChunkError when the chunk at ``position`` and ``block`` is missing or
        lies outside its shard file, reading only the shard's index (not the chunk's data)."""
        key = self.key(position, block)
        fd = self._open(key)
        try:
            self._chunk_offset(fd, key, position)
        finally:
            os.close(fd)

    def _open(self, key: str) -> int:
        try:
            return os.open(self.directory / key.removeprefix("features/c/"), os.O_RDONLY)
        except FileNotFoundError:
            raise self._damaged(key, "is missing") from None

    def _chunk_offset(self, fd: int, key: str, position: int) -> int:
        """Return the offset of the chunk at ``position`` in the open shard file ``fd``."""
        size = os.fstat(fd).st_size
        if size < self.index_bytes:
            raise self._damaged(key, f"has {size} bytes, fewer than its index")
        index = _checked(os.pread(fd, self.index_bytes, size - self.index_bytes))
        if index is None:
            raise self._damaged(key, "has an index that fails its checksum")
        entries = np.frombuffer(index, dtype="<u8").reshape(self.shard_layers, 2)
        offset, length = entries[position % self.shard_layers]
        if offset == _EMPTY and length == _EMPTY:
            raise self._damaged(key, f"contains no chunk for layer position {position}")
        if length != self.chunk_bytes or offset + length > size - self.index_bytes:
            raise self._damaged(key, f"has a chunk of {length} bytes at offset {offset}")
        return int(offset)

    def _damaged(self, key: str, problem: str) -> DamagedChunkError:
        return damaged_error(self.featureset_id, f"the stored object {key!r}", problem)


def damaged_error(featureset_id: str, subject: str, problem: str) -> DamagedChunkError:
    """Build the error for damaged data of a complete feature set, with the way to repair it."""
    return DamagedChunkError(
        f"{subject} of feature set {featureset_id!r} {problem}; repair the feature set with "
        f"POST /v1/featuresets/{featureset_id}/fsck/repair, then resume the job that "
        "extracted it",
        field="featureset_id",
        value=featureset_id,
    )


def _checked(data: bytes | np.ndarray) -> np.ndarray | None:
    """Return the payload of ``data`` (payload, then its little-endian CRC-32C) as uint8, or
    None when the checksum does not match."""
    raw = np.frombuffer(data, dtype=np.uint8)
    payload, stored = raw[:-_CRC_BYTES], raw[-_CRC_BYTES:]
    if google_crc32c.value(payload) != int.from_bytes(stored.tobytes(), "little"):
        return None
    return payload
