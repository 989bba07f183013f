"""The token cache under concurrent writers."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np

from store import Store
from workers.tokens import _write_cache, read_cached_tokens

WRITERS = 6
ROUNDS = 10


def test_concurrent_writers_of_one_cache(tmp_path: Path) -> None:
    """Workers that miss one cache at once all write it: none fails, and the cache is read
    back complete. Threads stand in for worker processes on one store."""
    store = Store(str(tmp_path / "store"))
    tokens = np.arange(64 * 16, dtype=np.uint16).reshape(64, 16)
    errors: list[BaseException] = []
    keys = [uuid.uuid4().hex for _ in range(ROUNDS)]
    for key in keys:
        barrier = threading.Barrier(WRITERS)

        def write(key: str = key, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                _write_cache(store, key, tokens, {"n_items": 64})
            except BaseException as exc:  # collected for the assert below
                errors.append(exc)

        threads = [threading.Thread(target=write) for _ in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert errors == []
    for key in keys:
        cached = read_cached_tokens(store, key)
        assert cached is not None
        np.testing.assert_array_equal(cached, tokens)
