"""Overlap of input loading, the forward pass and the Zarr write during extraction.

Three threads share the work of `workers.extract.extract_blocks`:

- a loader thread (`Prefetcher`) prepares the next batches (slicing images, converting palette
  tokens to an int64 tensor) and hands them over through a bounded queue;
- the calling thread runs the forward pass of the current batch and fills the block buffer;
- a writer thread (`BlockWriter`) writes finished blocks, each block's features first and its
  done flag last, in the order they were submitted.

Both queues are bounded, so memory holds at most ``depth`` prepared batches and ``depth`` blocks
waiting for the writer, whatever the number of images. An exception in either background thread
is re-raised in the calling thread; the writer stops at its first failed block and writes no
later block, so no done flag is ever set after a failure.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a blocked put or get sleeps before it checks whether the other side stopped.
_POLL_SECONDS = 0.1


class _Stop:
    """Queue marker for the end of the items, optionally carrying the producer's exception."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate over ``items`` in a background thread, ``depth`` items ahead of the consumer.

    Parameters
    ----------
    items
        Iterator whose ``next`` does the loading work; it runs in the loader thread only.
    depth
        Maximum number of loaded items waiting in the queue.

    Attributes
    ----------
    wait_seconds
        Total time the consumer spent blocked on an empty queue: the model's idle wait.
    """

    def __init__(self, items: Iterator[T], *, depth: int = 2, name: str = "prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth!r}")
        self._items = items
        self._queue: queue.Queue[T | _Stop] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: T | _Stop) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer by __next__
            self._put(_Stop(exc))
            return
        self._put(_Stop())

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if isinstance(item, _Stop):
            self._queue.put(item)  # later calls stop or raise too
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the loader thread, dropping the items it prepared, and wait for it."""
        self._closed.set()
        self._thread.join()


@dataclass
class WriterStats:
    """Times of the writer thread, in seconds."""

    submit_wait: float = 0.0
    """Time the submitting thread waited for room in the writer's queue."""
    idle: float = 0.0
    """Time the writer thread waited for a block to write."""
    write: float = 0.0
    """Time spent writing blocks, done flags included."""
    blocks: list[int] = field(default_factory=list)
    """Blocks written, in order."""


class BlockWriter:
    """Write blocks in a background thread, in submission order, stopping at the first error.

    Parameters
    ----------
    write
        Called as ``write(block, features, token_features)`` in the writer thread. It must
        write the block's data before its done flag, as `store.FeatureSet.write_block` does.
    depth
        Maximum number of blocks waiting to be written.
    on_written
        Called in the writer thread after each successful write with the block, the seconds
        the write took and the seconds `submit` waited for room in the queue.
    """

    def __init__(
        self,
        write: Callable[[int, np.ndarray, np.ndarray | None], None],
        *,
        depth: int = 1,
        on_written: Callable[[int, float, float], None] | None = None,
        name: str = "block-writer",
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth!r}")
        self._write = write
        self._on_written = on_written
        # The semaphore bounds the blocks in flight; waiting on it before the put lets `submit`
        # record its wait before the writer thread can see the block.
        self._slots = threading.Semaphore(depth)
        self._queue: queue.Queue[tuple[int, np.ndarray, np.ndarray | None] | _Stop] = queue.Queue()
        self._submit_waits: dict[int, float] = {}
        self._error: BaseException | None = None
        self._failed = threading.Event()
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            self.stats.idle += time.perf_counter() - started
            if isinstance(item, _Stop):
                return
            try:
                self._handle(*item)
            finally:
                self._slots.release()

    def _handle(self, block: int, features: np.ndarray, token_features: np.ndarray | None) -> None:
        if self._failed.is_set():
            return  # drain without writing: no block after a failed one is written
        started = time.perf_counter()
        try:
            self._write(block, features, token_features)
        except BaseException as exc:  # re-raised in the submitting thread
            self._error = exc
            self._failed.set()
            logger.debug("block writer: block %d failed: %r", block, exc)
            return
        seconds = time.perf_counter() - started
        self.stats.write += seconds
        self.stats.blocks.append(block)
        if self._on_written is not None:
            self._on_written(block, seconds, self._submit_waits.pop(block, 0.0))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(
        self, block: int, features: np.ndarray, token_features: np.ndarray | None = None
    ) -> float:
        """Queue ``block`` for writing and return the seconds spent waiting for queue room.

        Raises the writer's exception if an earlier block failed to write.
        """
        self._raise_if_failed()
        started = time.perf_counter()
        while not self._slots.acquire(timeout=_POLL_SECONDS):
            self._raise_if_failed()
        waited = time.perf_counter() - started
        self.stats.submit_wait += waited
        self._submit_waits[block] = waited
        self._queue.put((block, features, token_features))
        return waited

    def close(self) -> None:
        """Wait until every submitted block is written; raise the writer's exception if any."""
        self._queue.put(_Stop())
        self._thread.join()
        self._raise_if_failed()

    def abandon(self) -> None:
        """Write the blocks already queued, then stop without raising; for error paths.

        Queued blocks are complete, so writing them loses less work than dropping them.
        """
        self._queue.put(_Stop())
        self._thread.join()
