"""The interface between the dataset sources and the loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workers.datasets.paths import FileStamp

__all__ = ["Source", "SourceSplit"]


@dataclass
class SourceSplit:
    """A whole split as a source reads it, before label checks and fingerprinting.

    Attributes
    ----------
    images
        C-contiguous uint8 array of shape (n_items, H, W, 3).
    labels
        Array of shape (n_items,) of label values, not yet checked.
    class_names
        Name of each label value, or None when the source has none (the loader then names
        labels ``"0"`` to ``"<max label>"``).
    item_ids
        Array of shape (n_items,): each item's position in the source dataset.
    ids_span_splits
        Whether one item id means the same item in every split of the dataset (the built-in
        digits, whose splits are subsets of one table). When False, ids number the items of
        this split only, and ids of two splits cannot be compared.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] | None
    item_ids: np.ndarray
    ids_span_splits: bool = False


class Source(Protocol):
    """A parsed dataset reference that can read its splits."""

    kind: str
    """Source kind recorded in fingerprints: the same data through two kinds hash apart."""

    def split_names(self) -> list[str] | None:
        """Return the splits this source offers, or None when only loading can tell."""
        ...

    def stamp(self) -> tuple[FileStamp, ...]:
        """Return stamps of the files the splits are read from, or () when there are none."""
        ...

    def read(self, split: str) -> SourceSplit:
        """Read one whole split, one of ``split_names()`` when those are known."""
        ...
