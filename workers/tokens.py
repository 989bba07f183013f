"""Palette-token cache: the ImageGPT tokens of a dataset, computed once per palette.

ImageGPT small, medium and large share one 512-colour palette, so the quantised pixels of a
dataset are the same for all three. They are stored once under
``tokens/<key>/tokens``, an array of shape (n_items, seq) uint16, where the key hashes the
dataset fingerprint, the palette and the processor size. The array is written first and the
group's ``complete`` attribute last, so a reader never uses a half-written cache.

This module imports no torch: the API lists the cache with `list_token_caches`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from store import Store
from store.arrays import group_array

logger = logging.getLogger(__name__)

TOKENS_KIND = "tokens"
# Rows quantised per call: bounds the (rows, H, W, 3) copy of resized images.
QUANTIZE_ROWS = 1024


def token_cache_key(dataset_fingerprint: str, palette_sha256: str, size: tuple[int, int]) -> str:
    """Return the cache key of a dataset quantised with a palette at a processor size."""
    text = f"{dataset_fingerprint}:{palette_sha256}:{size[0]}x{size[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_cached_tokens(store: Store, key: str) -> np.ndarray | None:
    """Return the cached tokens of ``key``, array of shape (n_items, seq) uint16, or None."""
    try:
        group = zarr.open_group(store.zarr_store, path=f"{TOKENS_KIND}/{key}", mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if not group.attrs.get("complete"):
        return None
    return np.asarray(group_array(group, "tokens")[:])


def cached_tokens(
    store: Store,
    images: np.ndarray,
    *,
    dataset_fingerprint: str,
    palette_sha256: str,
    size: tuple[int, int],
    quantize: Callable[[np.ndarray], np.ndarray],
    description: dict[str, Any] | None = None,
) -> np.ndarray:
    """Return the palette tokens of every image, computing and caching them on first use.

    Parameters
    ----------
    images
        Array of shape (n_items, H, W, 3) uint8: the whole dataset split whose content
        ``dataset_fingerprint`` identifies.
    quantize
        Maps images of shape (rows, H, W, 3) uint8 to tokens of shape (rows, seq).
    description
        Extra attributes stored with the cache (dataset reference, split), for listings.

    Returns
    -------
    np.ndarray
        Array of shape (n_items, seq) uint16.
    """
    key = token_cache_key(dataset_fingerprint, palette_sha256, size)
    cached = read_cached_tokens(store, key)
    if cached is not None and cached.shape[0] == len(images):
        logger.debug("token cache %s: reused, %d items", key, len(images))
        return cached

    started = dt.datetime.now(dt.timezone.utc)
    parts = [
        np.asarray(quantize(images[start : start + QUANTIZE_ROWS]))
        for start in range(0, len(images), QUANTIZE_ROWS)
    ]
    tokens = np.concatenate(parts).astype(np.uint16)  # (n_items, seq)
    _write_cache(
        store,
        key,
        tokens,
        {
            **(description or {}),
            "dataset_fingerprint": dataset_fingerprint,
            "palette_sha256": palette_sha256,
            "size": list(size),
            "n_items": int(tokens.shape[0]),
            "seq": int(tokens.shape[1]),
            "created": started.isoformat(),
        },
    )
    logger.info("token cache %s: %d items x %d tokens written", key, *tokens.shape)
    return tokens


def _write_cache(store: Store, key: str, tokens: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write the cache of ``key``; leave it to another writer that creates it at the same time.

    Two workers that miss the cache at once both write it. Quantisation is deterministic, so
    both write identical values. The one whose create of the group or array comes second gets
    zarr's error and stops, and the first one sets the complete flag.
    """
    try:
        _write_cache_once(store, key, tokens, attrs)
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
        logger.info("token cache %s: another writer created it meanwhile (%s)", key, exc)


def _write_cache_once(store: Store, key: str, tokens: np.ndarray, attrs: dict[str, Any]) -> None:
    path = f"{TOKENS_KIND}/{key}"
    group = zarr.open_group(store.zarr_store, path=path, mode="a")
    if "tokens" in group and group_array(group, "tokens").shape != tokens.shape:
        del group["tokens"]
    if "tokens" not in group:
        zarr.create_array(
            store.zarr_store,
            name=f"{path}/tokens",
            shape=tokens.shape,
            dtype=np.uint16,
            chunks=(min(len(tokens), 4096), tokens.shape[1]),
            dimension_names=("item", "position"),
        )
    zarr.open_array(store.zarr_store, path=f"{path}/tokens", mode="r+")[:] = tokens
    # The flag goes last: a cache without it is recomputed, never read.
    group.update_attributes({**attrs, "complete": True})


def list_token_caches(store: Store) -> list[dict[str, Any]]:
    """Describe every complete token cache: key, dataset fingerprint, palette, shape."""
    caches = []
    for key in store.result_ids(TOKENS_KIND):
        attrs = store.read_result(TOKENS_KIND, key) or {}
        if attrs.get("complete"):
            caches.append({"key": key, **attrs})
    return caches
