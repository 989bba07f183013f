"""Dataset references: parsing, loading, subsets and the in-process cache of loaded splits."""

from __future__ import annotations

import importlib.util
import logging
import numbers
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from store.ids import canonical_path
from store.logs import escape_nonprintable
from workers.datasets.cifar import CifarSource
from workers.datasets.digits import (
    DIGITS_CLASS_NAMES,
    DIGITS_SPLIT_SIZES,
    DigitsSource,
    find_digits_csv,
)
from workers.datasets.huggingface import HubSource, SavedSource, parse_hub_name
from workers.datasets.imagefolder import ImageFolderSource
from workers.datasets.npz import NpzSource
from workers.datasets.paths import resolve_dataset_path
from workers.datasets.source import Source, SourceSplit
from workers.datasets.split import DatasetSplit, compute_fingerprint, select_stratified
from workers.errors import DatasetError

__all__ = ["ACCEPTED_FORMS", "CACHE_MAX_BYTES", "clear_cache", "list_datasets", "load_split"]

logger = logging.getLogger(__name__)

ACCEPTED_FORMS = (
    "digits",
    "npz:/path/file.npz",
    "imagefolder:/path/folder",
    "cifar:/path/folder",
    "hf:<name>[/<config>]",
    "hf-disk:/path/folder",
)
# Loaded splits kept in memory, least recently used first out. CIFAR-10's train split is 150 MiB.
CACHE_MAX_BYTES = 2 * 1024**3
# Largest number of classes of a dataset without class names (ImageNet-21k has about 22,000).
MAX_CLASSES = 100_000


def load_split(
    dataset: str,
    split: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> DatasetSplit:
    """Load one split of a dataset as uint8 RGB images, int64 labels and a fingerprint.

    Parameters
    ----------
    dataset
        A reference in one of the forms of ``ACCEPTED_FORMS``; ``list_datasets`` describes
        them.
    split
        Split name, e.g. ``"train"``, ``"test"`` or ``"all"``.
    limit
        Keep a stratified random subset of this many items (all items when the split is not
        larger). Part of the fingerprint.
    seed
        Seed of the subset; ignored, and left out of the fingerprint, without a limit.
    image_column, label_column
        Column names for Hugging Face datasets, overriding detection. ``label_column`` also
        picks CIFAR-100's ``"fine_labels"`` (default) or ``"coarse_labels"``.
    allowed_roots
        Directories a local dataset path must resolve into (symlinks followed), or None to
        allow any path.

    Returns
    -------
    DatasetSplit
        Items in increasing ``item_ids`` order, in arrays the caller owns. Repeated calls with
        the same arguments and unchanged files are served from an in-process cache: they cost
        one copy of the arrays, not a second read.

    Raises
    ------
    DatasetError
        When the reference, split, limit, columns or an item cannot be loaded; ``field`` names
        the argument to change.
    PathNotAllowedError
        When a local path resolves outside ``allowed_roots``.
    """
    limit, seed = _check_arguments(dataset, split, limit, seed)
    source = open_source(
        dataset,
        image_column=image_column,
        label_column=label_column,
        allowed_roots=allowed_roots,
    )
    names = source.split_names()
    if names is not None and split not in names:
        raise DatasetError(
            f"split {split!r} does not exist in dataset {dataset!r}; available splits: "
            f"{', '.join(names)}",
            field="split",
            value=split,
        )

    whole_key = (dataset, split, image_column, label_column, source.stamp())
    whole = _cache.get(whole_key)
    if whole is None:
        whole = _load_whole(source, dataset, split)
        _cache.put(whole_key, whole)
    if limit is None or limit >= whole.n_items:
        return _copy(whole)

    subset_key = (*whole_key, limit, seed)
    subset = _cache.get(subset_key)
    if subset is None:
        subset = _select(whole, source.kind, limit, seed)
        _cache.put(subset_key, subset)
    return _copy(subset)


# Reference prefixes whose rest is a local path.
PATH_PREFIXES = ("npz", "imagefolder", "cifar", "hf-disk")


def canonical_reference(dataset: str) -> str:
    """Return ``dataset`` with the path of a local reference written one way.

    Repeated slashes and ``.`` segments are dropped, so ``npz:/data//./x.npz`` and
    ``npz:/data/x.npz`` name one dataset and one feature set. ``..`` segments are kept: with a
    symbolic link before them, dropping them could name another file.
    """
    prefix, colon, rest = dataset.partition(":")
    if not colon or prefix not in PATH_PREFIXES or not rest:
        return dataset
    return f"{prefix}:{canonical_path(rest)}"


def open_source(
    dataset: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    allowed_roots: Sequence[Path] | None = None,
) -> Source:
    """Parse a dataset reference into its source, checking local paths against the roots."""
    prefix, colon, rest = dataset.partition(":")
    if not colon and dataset == "digits":
        _reject_columns(dataset, image_column, label_column)
        return DigitsSource(dataset)
    if prefix in PATH_PREFIXES:
        path = resolve_dataset_path(rest, reference=dataset, allowed_roots=allowed_roots)
        if prefix == "hf-disk":
            return SavedSource(dataset, path, image_column=image_column, label_column=label_column)
        if prefix == "cifar":
            _reject_columns(dataset, image_column, None)
            return CifarSource(
                dataset, path, label_column=label_column, allowed_roots=allowed_roots
            )
        _reject_columns(dataset, image_column, label_column)
        if prefix == "npz":
            return NpzSource(dataset, path)
        return ImageFolderSource(dataset, path, allowed_roots=allowed_roots)
    if prefix == "hf":
        name, config = parse_hub_name(dataset, rest)
        return HubSource(
            dataset, name, config, image_column=image_column, label_column=label_column
        )
    raise DatasetError(
        f"dataset {dataset!r} is not a known dataset or reference; use one of: "
        f"{', '.join(ACCEPTED_FORMS)}",
        field="dataset",
        value=dataset,
    )


def list_datasets() -> list[dict[str, Any]]:
    """Describe what ``load_split`` accepts: the built-in datasets and the reference forms.

    Returns
    -------
    list of dict
        One entry per built-in dataset and per reference form, each with ``reference``,
        ``kind`` (``"builtin"`` or the reference prefix), ``description``, ``example``,
        ``splits`` (usual split names), ``sizes`` (items per split, for built-ins; else None),
        ``local_path`` (whether it names a path on the workers' file system) and
        ``available`` (whether this machine can load it without further installs).
    """
    return [
        {
            "reference": "digits",
            "kind": "builtin",
            "description": (
                "scikit-learn's 8x8 handwritten digits (1,797 real images, classes 0-9) as RGB; "
                "fixed stratified split of 500 test images, seed 0"
            ),
            "example": "digits",
            "splits": list(DIGITS_SPLIT_SIZES),
            "sizes": dict(DIGITS_SPLIT_SIZES),
            "image_shape": [8, 8, 3],
            "class_names": list(DIGITS_CLASS_NAMES),
            "local_path": False,
            "available": find_digits_csv() is not None,
        },
        _form(
            "npz:/path/file.npz",
            "arrays 'images' (or 'x') and 'labels' (or 'y'); 'train_'/'test_' prefixed arrays "
            "are splits, unprefixed ones the split 'all'",
            "npz:/data/shapes.npz",
            ["train", "test", "all"],
        ),
        _form(
            "imagefolder:/path/folder",
            "one sub-folder of images per class; train/ and test/ sub-folders are splits, "
            "else the split 'all'; all images the same size",
            "imagefolder:/data/pets",
            ["train", "test", "all"],
        ),
        _form(
            "cifar:/path/folder",
            "CIFAR-10 or CIFAR-100 python-pickle folder (cifar-10-batches-py, cifar-100-python)",
            "cifar:/data/cifar-10-batches-py",
            ["train", "test"],
        ),
        _form(
            "hf:<name>[/<config>]",
            "Hugging Face dataset by name, 'name' or 'owner/name' with an optional '/config'; "
            "needs Hub access or a cached copy",
            "hf:uoft-cs/cifar10",
            ["train", "test"],
            local_path=False,
        ),
        _form(
            "hf-disk:/path/folder",
            "Hugging Face Dataset or DatasetDict folder written by save_to_disk; a single "
            "Dataset is the split 'all'",
            "hf-disk:/data/cifar10-hf",
            ["train", "test", "all"],
        ),
    ]


def clear_cache() -> None:
    """Drop every cached split."""
    _cache.clear()


def _form(
    reference: str,
    description: str,
    example: str,
    splits: list[str],
    *,
    local_path: bool = True,
) -> dict[str, Any]:
    needs_datasets = reference.startswith("hf")
    return {
        "reference": reference,
        "kind": reference.split(":")[0],
        "description": description,
        "example": example,
        "splits": splits,
        "sizes": None,
        "local_path": local_path,
        "available": not needs_datasets or _has_module("datasets"),
    }


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _check_arguments(
    dataset: object, split: object, limit: object, seed: object
) -> tuple[int | None, int]:
    """Validated ``limit`` and ``seed`` as plain ints, after checking the two names."""
    if not isinstance(dataset, str) or not dataset:
        raise DatasetError(
            f"dataset must be a non-empty reference string, got {dataset!r}; use one of: "
            f"{', '.join(ACCEPTED_FORMS)}",
            field="dataset",
            value=dataset,
        )
    if not isinstance(split, str) or not split:
        raise DatasetError(
            f"split must be a non-empty string such as 'train' or 'test', got {split!r}",
            field="split",
            value=split,
        )
    checked_limit = None
    if limit is not None:
        checked_limit = _integer(limit, "limit", 1, "a positive integer, or null for all items")
    return checked_limit, _integer(seed, "seed", 0, "a non-negative integer")


def _integer(value: object, field: str, minimum: int, expected: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) >= minimum:
            return int(value)
    plain_value = value.item() if isinstance(value, np.generic) else value  # 0, not np.int64(0)
    raise DatasetError(
        f"{field} must be {expected}, got {plain_value!r}", field=field, value=plain_value
    )


def _reject_columns(dataset: str, image_column: str | None, label_column: str | None) -> None:
    for field, value in (("image_column", image_column), ("label_column", label_column)):
        if value is not None:
            raise DatasetError(
                f"{field} {value!r} does not apply to dataset {dataset!r}: columns are chosen "
                "only for hf: and hf-disk: datasets (and label_column for CIFAR-100), so leave "
                "it unset",
                field=field,
                value=value,
            )


def _load_whole(source: Source, dataset: str, split: str) -> DatasetSplit:
    started = time.perf_counter()
    raw = source.read(split)
    where = f"split {split!r} of dataset {dataset!r}"
    if len(raw.labels) == 0:
        raise DatasetError(f"{where} has no items; check the data", field="dataset", value=dataset)
    labels, class_names = _checked_labels(raw, dataset, where)
    _require_two_classes(
        labels, class_names, where, field="dataset", value=dataset, advice="add other classes"
    )

    result = _freeze(
        dataset=dataset,
        split=split,
        images=raw.images,
        labels=labels,
        class_names=class_names,
        item_ids=raw.item_ids,
        kind=source.kind,
        limit=None,
        seed=None,
        ids_span_splits=raw.ids_span_splits,
    )
    logger.info(
        "dataset %s[%s]: %d items of shape %s loaded in %.2fs",
        escape_nonprintable(dataset),
        escape_nonprintable(split),
        result.n_items,
        result.images.shape[1:],
        time.perf_counter() - started,
    )
    return result


def _select(whole: DatasetSplit, kind: str, limit: int, seed: int) -> DatasetSplit:
    positions = select_stratified(whole.labels, limit, seed)
    labels = whole.labels[positions]
    _require_two_classes(
        labels,
        whole.class_names,
        f"the {limit}-item subset of split {whole.split!r} of dataset {whole.dataset!r}",
        field="limit",
        value=limit,
        advice="raise the limit",
    )
    return _freeze(
        dataset=whole.dataset,
        split=whole.split,
        images=whole.images[positions],
        labels=labels,
        class_names=whole.class_names,
        item_ids=whole.item_ids[positions],
        kind=kind,
        limit=limit,
        seed=seed,
        ids_span_splits=whole.ids_span_splits,
    )


def _freeze(
    *,
    dataset: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    item_ids: np.ndarray,
    kind: str,
    limit: int | None,
    seed: int | None,
    ids_span_splits: bool,
) -> DatasetSplit:
    """Build a cacheable DatasetSplit: C-contiguous read-only arrays and their fingerprint."""
    arrays: list[np.ndarray] = [
        np.ascontiguousarray(images, dtype=np.uint8),
        np.ascontiguousarray(labels, dtype=np.int64),
        np.ascontiguousarray(item_ids, dtype=np.int64),
    ]
    for array in arrays:
        array.flags.writeable = False
    images, labels, item_ids = arrays
    fingerprint = compute_fingerprint(
        kind=kind,
        split=split,
        limit=limit,
        seed=seed,
        images=images,
        labels=labels,
        item_ids=item_ids,
        class_names=class_names,
    )
    return DatasetSplit(
        dataset=dataset,
        split=split,
        images=images,
        labels=labels,
        class_names=class_names,
        fingerprint=fingerprint,
        item_ids=item_ids,
        ids_span_splits=ids_span_splits,
    )


def _copy(cached: DatasetSplit) -> DatasetSplit:
    """Return a cached split with writable copies of its arrays, so no caller changes the cache."""
    return replace(
        cached,
        images=cached.images.copy(),
        labels=cached.labels.copy(),
        class_names=list(cached.class_names),
        item_ids=cached.item_ids.copy(),
    )


def _checked_labels(raw: SourceSplit, dataset: str, where: str) -> tuple[np.ndarray, list[str]]:
    """Labels as int64 in ``range(len(class_names))``, and the class names."""
    values = np.asarray(raw.labels)

    def fail(position: int, problem: str) -> DatasetError:
        return DatasetError(
            f"item {int(raw.item_ids[position])} of {where} {problem}; every item needs an "
            "integer class label from 0 to the number of classes minus 1",
            field="dataset",
            value=dataset,
        )

    if values.dtype.kind == "O":
        missing = [i for i, value in enumerate(values) if value is None]
        if missing:
            raise fail(missing[0], "has no label")
        values = _numeric(values, where, dataset)
    if values.dtype.kind not in "iuf" or values.ndim != 1:
        raise DatasetError(
            f"{where} has labels of dtype {values.dtype} and shape {values.shape}; labels must "
            "be one integer per item",
            field="dataset",
            value=dataset,
        )
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise fail(int(bad[0]), f"has the label {values[bad[0]].item()}, not an integer")
    if values.dtype.kind in "uf":
        huge = np.flatnonzero(values > np.iinfo(np.int64).max)
        if huge.size:
            raise fail(
                int(huge[0]), f"has the label {values[huge[0]]}, too large for a class index"
            )
    labels = values.astype(np.int64)
    negative = np.flatnonzero(labels < 0)
    if negative.size:
        raise fail(int(negative[0]), f"has the label {labels[negative[0]]} (unlabelled)")

    class_names = raw.class_names
    if class_names is None:
        # Without class names the labels are class indices. A label far above the number of
        # items is an id or a code, and one name per index up to it could fill the memory.
        too_large = np.flatnonzero(labels >= MAX_CLASSES)
        if too_large.size:
            raise fail(
                int(too_large[0]),
                f"has the label {labels[too_large[0]]}, but the largest allowed label is "
                f"{MAX_CLASSES - 1} (at most {MAX_CLASSES} classes); map the labels to 0, 1, "
                "2, ... and store the original values as class names",
            )
        class_names = [str(label) for label in range(int(labels.max()) + 1)]
    beyond = np.flatnonzero(labels >= len(class_names))
    if beyond.size:
        raise fail(
            int(beyond[0]),
            f"has the label {labels[beyond[0]]} but there are {len(class_names)} class names",
        )
    return labels, list(class_names)


def _numeric(values: np.ndarray, where: str, dataset: str) -> np.ndarray:
    try:
        return np.asarray(values.tolist(), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(
            f"{where} has labels that are not numbers ({exc}); labels must be one integer per item",
            field="dataset",
            value=dataset,
        ) from exc


def _require_two_classes(
    labels: np.ndarray, class_names: list[str], what: str, *, field: str, value: object, advice: str
) -> None:
    present = np.unique(labels)
    if present.size < 2:
        raise DatasetError(
            f"{what} contains one class only ({class_names[int(present[0])]!r}); every layerbank "
            "dataset needs at least two classes, pretraining included, because its feature sets "
            f"are made for probes; {advice}",
            field=field,
            value=value,
        )


class _SplitCache:
    """Thread-safe least-recently-used cache of loaded splits, bounded by array bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, DatasetSplit] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> DatasetSplit | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: DatasetSplit) -> None:
        size = _nbytes(entry)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= _nbytes(previous)
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _nbytes(entry: DatasetSplit) -> int:
    return entry.images.nbytes + entry.labels.nbytes + entry.item_ids.nbytes


_cache = _SplitCache(CACHE_MAX_BYTES)
