"""The loaded form of a dataset split, its fingerprint and stratified subsets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

__all__ = ["FINGERPRINT_FORMAT", "DatasetSplit", "compute_fingerprint", "select_stratified"]

# Bump only with a reason: every feature-set id built on a fingerprint changes with it.
FINGERPRINT_FORMAT = 1


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """One split of a dataset, normalised and fingerprinted.

    Two splits hold the same data when their fingerprints are equal; ``==`` compares identity.

    Attributes
    ----------
    dataset
        The reference as given, e.g. ``"digits"`` or ``"npz:/data/x.npz"``.
    split
        The split name, e.g. ``"train"``, ``"test"`` or ``"all"``.
    images
        C-contiguous uint8 array of shape (n_items, H, W, 3).
    labels
        int64 array of shape (n_items,), each in ``range(len(class_names))``.
    class_names
        Name of each label value.
    fingerprint
        Hex sha256 over the split's definition (source kind, split, limit, seed), the array
        shapes, the class names, and the image, label and item-id bytes. It does not depend on
        where the files are, only on what they hold.
    item_ids
        int64 array of shape (n_items,): the position of each item in the source dataset, in
        increasing order.
    ids_span_splits
        Whether an item id names the same item in every split of the dataset; when False,
        only ids of the same split can be compared.
    """

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    fingerprint: str
    item_ids: np.ndarray
    ids_span_splits: bool = False

    @property
    def n_items(self) -> int:
        """Number of items in the split."""
        return int(self.labels.shape[0])


def compute_fingerprint(
    *,
    kind: str,
    split: str,
    limit: int | None,
    seed: int | None,
    images: np.ndarray,
    labels: np.ndarray,
    item_ids: np.ndarray,
    class_names: list[str],
) -> str:
    """Hash a split's definition and content into a hex sha256.

    Parameters
    ----------
    kind
        Source kind (``"digits"``, ``"npz"``, ``"imagefolder"``, ``"cifar"``, ``"hf"``).
    split, limit, seed
        The split definition; pass ``limit=None, seed=None`` for a whole split.
    images
        uint8 array of shape (n_items, H, W, 3).
    labels, item_ids
        Integer arrays of shape (n_items,).
    class_names
        Name of each label value.
    """
    header = {
        "format": FINGERPRINT_FORMAT,
        "kind": kind,
        "split": split,
        "limit": limit,
        "seed": seed,
        "shape": list(images.shape),
        "dtype": "uint8",
        "class_names": class_names,
    }
    digest = hashlib.sha256()
    digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).data)
    digest.update(np.ascontiguousarray(labels, dtype="<i8").data)
    digest.update(np.ascontiguousarray(item_ids, dtype="<i8").data)
    return digest.hexdigest()


def select_stratified(labels: np.ndarray, n_select: int, seed: int) -> np.ndarray:
    """Choose a seeded subset of positions with the class balance of ``labels``.

    When ``n_select`` is at least the number of classes, every class gets one item and the
    rest are shared in proportion to each class's remaining items (largest remainder,
    ties to the lower label). With fewer, the largest classes get one item each. Within a
    class, the items with the smallest seeded keys are taken. The keys are raw outputs of
    numpy's PCG64 bit generator, whose stream numpy keeps stable across releases, so a
    subset never changes for the same labels, size and seed.

    Parameters
    ----------
    labels
        Integer array of shape (n_items,).
    n_select
        Subset size, from 1 to ``n_items``.
    seed
        Non-negative seed of the keys.

    Returns
    -------
    numpy.ndarray
        Sorted int64 positions into ``labels``, of shape (n_select,).
    """
    n_items = len(labels)
    if not 0 < n_select <= n_items:
        raise ValueError(f"n_select must be in 1..{n_items}, got {n_select}")
    classes, counts = np.unique(labels, return_counts=True)
    quotas = _allocate(counts, n_select)

    keys = np.random.PCG64(seed).random_raw(n_items)
    chosen = []
    for label, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(labels == label)
        order = np.argsort(keys[members], kind="stable")
        chosen.append(members[order[:quota]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _allocate(counts: np.ndarray, n_select: int) -> np.ndarray:
    """Items per class: one each when possible, the rest by largest remainder."""
    n_classes = len(counts)
    if n_select < n_classes:
        largest_first = np.lexsort((np.arange(n_classes), -counts))
        quotas = np.zeros(n_classes, dtype=np.int64)
        quotas[largest_first[:n_select]] = 1
        return quotas
    base = np.ones(n_classes, dtype=np.int64)
    weights = counts.astype(np.int64) - 1
    extra = n_select - n_classes
    total = int(weights.sum())
    if extra == 0:
        return base
    # Integer arithmetic keeps the shares exact, so no float rounding can move an item.
    shares = weights * extra
    quotas = shares // total
    remainders = shares % total
    missing = extra - int(quotas.sum())
    order = np.lexsort((np.arange(n_classes), -remainders))
    quotas[order[:missing]] += 1
    return base + quotas
