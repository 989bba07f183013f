"""Hugging Face datasets, from the Hub (or its local cache) or from a ``save_to_disk`` folder.

The ``datasets`` library is imported only when a split is read, so parsing a reference, and
serving a cached split, never pays for the import.

Columns: the image column is the first one with the ``Image`` feature type, else one named
``img`` or ``image``; the label column is the first ``ClassLabel`` one, else one named
``label``, ``labels`` or ``fine_label``. ``image_column`` and ``label_column`` override both.
Class names come from the ``ClassLabel`` feature when there is one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from workers.datasets.images import stack_images, to_rgb_uint8
from workers.datasets.paths import FileStamp, stamp_tree
from workers.datasets.source import SourceSplit
from workers.errors import BusyError, DatasetError

__all__ = ["HubSource", "SavedSource", "parse_hub_name"]

_IMAGE_NAMES = ("img", "image")
_LABEL_NAMES = ("label", "labels", "fine_label")
_SINGLE_SPLIT = "all"
_BATCH_ROWS = 256
# Seconds for which a Hub dataset that failed to load fails again at once. Without Hub access
# a load waited 24 s for the library's network timeouts on the 2-core development machine,
# and every waiting request occupies one of the API's request threads.
HUB_FAILURE_SECONDS = 60.0
# (name, config, split) -> (time.monotonic() of the failure, the error), per process.
_hub_failures: dict[tuple[str, str | None, str], tuple[float, DatasetError]] = {}
# Max Hub loads that one process runs at once. A load can take minutes (a first download) and
# occupies one of the API's request threads. So a second request for the same split, or one
# beyond this many, gets BusyError (503 in the API) instead of another thread.
HUB_LOADS_AT_ONCE = 2
_hub_loads: set[tuple[str, str | None, str]] = set()
_hub_loads_lock = threading.Lock()
# A Hub dataset name: "name" or "owner/name", then an optional "/config".
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*){0,2}")


def parse_hub_name(reference: str, text: str) -> tuple[str, str | None]:
    """Split the part after ``hf:`` into a dataset name and an optional config.

    ``cifar10`` and ``uoft-cs/cifar10`` are names; a third segment is the config, as in
    ``ylecun/mnist/mnist``. Text that could be a local path is rejected, because local folders go
    through ``hf-disk:``, which checks the allowed roots.
    """
    if not _HUB_NAME.fullmatch(text) or ".." in text or os.path.exists(text):
        raise DatasetError(
            f"dataset {reference!r} is not a Hugging Face dataset name; write hf:<name>, "
            "hf:<owner>/<name> or hf:<owner>/<name>/<config>, and use hf-disk:/path for a "
            "folder written by save_to_disk",
            field="dataset",
            value=reference,
        )
    parts = text.split("/")
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2]
    return text, None


class HubSource:
    """A dataset on the Hugging Face Hub, loaded with ``datasets.load_dataset``."""

    kind = "hf"

    def __init__(
        self,
        reference: str,
        name: str,
        config: str | None,
        *,
        image_column: str | None,
        label_column: str | None,
    ) -> None:
        self.reference = reference
        self.name = name
        self.config = config
        self.columns = _Columns(reference, image_column, label_column)

    def split_names(self) -> None:
        return None

    def stamp(self) -> tuple[FileStamp, ...]:
        return ()

    def read(self, split: str) -> SourceSplit:
        key = (self.name, self.config, split)
        failed = _hub_failures.get(key)
        if failed is not None and time.monotonic() - failed[0] < HUB_FAILURE_SECONDS:
            raise failed[1]
        with _hub_loads_lock:
            if key in _hub_loads or len(_hub_loads) >= HUB_LOADS_AT_ONCE:
                loading = "this split" if key in _hub_loads else f"{len(_hub_loads)} Hub datasets"
                raise BusyError(
                    f"dataset {self.reference!r}: this process is already loading {loading}; "
                    "retry in a minute, when the load has finished or failed",
                    field="dataset",
                    value=self.reference,
                )
            _hub_loads.add(key)
        try:
            return self._read(split)
        except DatasetError as exc:
            if exc.field == "dataset":
                _hub_failures[key] = (time.monotonic(), exc)
            raise
        finally:
            with _hub_loads_lock:
                _hub_loads.discard(key)

    def _read(self, split: str) -> SourceSplit:
        datasets = _import_datasets(self.reference)
        try:
            table = datasets.load_dataset(self.name, self.config, split=split)
        except ValueError as exc:
            # The library reports an unknown split as "Unknown split ... Should be one of [...]".
            raise DatasetError(
                f"dataset {self.reference!r} cannot load split {split!r}: {exc}",
                field="split",
                value=split,
            ) from exc
        except OSError as exc:
            raise DatasetError(
                f"dataset {self.reference!r} cannot be loaded ({exc}); check the name, or, on a "
                "machine without Hub access, save it elsewhere with save_to_disk and use "
                f"hf-disk:/path. Requests for it fail at once for {HUB_FAILURE_SECONDS:.0f} s",
                field="dataset",
                value=self.reference,
            ) from exc
        return self.columns.to_split(table, split)


class SavedSource:
    """A ``Dataset`` or ``DatasetDict`` folder written by ``save_to_disk``.

    A ``DatasetDict`` offers its own splits; a single ``Dataset`` is the split ``"all"``.
    """

    kind = "hf"

    def __init__(
        self,
        reference: str,
        path: Path,
        *,
        image_column: str | None,
        label_column: str | None,
    ) -> None:
        self.reference = reference
        self.path = path
        self.columns = _Columns(reference, image_column, label_column)
        # The folder's own index files name the splits, so listing them needs no import.
        if (path / "dataset_dict.json").is_file():
            index = json.loads((path / "dataset_dict.json").read_text())
            self.splits = [str(name) for name in index.get("splits", [])]
        elif (path / "state.json").is_file():
            self.splits = [_SINGLE_SPLIT]
        else:
            raise DatasetError(
                f"dataset {reference!r}: {path} is not a folder written by save_to_disk "
                "(no dataset_dict.json or state.json); save the dataset with "
                "Dataset.save_to_disk or DatasetDict.save_to_disk",
                field="dataset",
                value=reference,
            )

    def split_names(self) -> list[str]:
        return list(self.splits)

    def stamp(self) -> tuple[FileStamp, ...]:
        return stamp_tree(self.path)

    def read(self, split: str) -> SourceSplit:
        datasets = _import_datasets(self.reference)
        try:
            loaded = datasets.load_from_disk(str(self.path))
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"dataset {self.reference!r}: {self.path} cannot be loaded ({exc}); save it "
                "again with save_to_disk",
                field="dataset",
                value=self.reference,
            ) from exc
        table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return self.columns.to_split(table, split)


class _Columns:
    """Finds the image and label columns of a ``datasets.Dataset`` and reads them."""

    def __init__(self, reference: str, image_column: str | None, label_column: str | None) -> None:
        self.reference = reference
        self.image_column = image_column
        self.label_column = label_column

    def to_split(self, table: Any, split: str) -> SourceSplit:
        datasets = _import_datasets(self.reference)
        features = table.features
        image_column = self._image_column(features, datasets)
        label_column = self._label_column(features, datasets)
        label_feature = features[label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            class_names: list[str] | None = list(label_feature.names)
        else:
            class_names = None

        n_items = len(table)
        labels = np.asarray(list(table[label_column]))
        if n_items == 0:
            images = np.zeros((0, 2, 2, 3), dtype=np.uint8)  # the loader reports it empty
        else:
            rows = self._images(table.select_columns([image_column]), image_column, split)
            images = stack_images(rows, n_items, where=f"{self.reference}[{split}]")
        return SourceSplit(
            images=images,
            labels=labels,
            class_names=class_names,
            item_ids=np.arange(n_items, dtype=np.int64),
        )

    def _images(self, table: Any, column: str, split: str) -> Iterator[tuple[str, np.ndarray]]:
        position = 0
        for batch in table.iter(batch_size=_BATCH_ROWS):
            for value in batch[column]:
                item = f"{self.reference}[{split}][{position}]"
                if value is None:
                    raise DatasetError(
                        f"{item} has no image; remove the row or fill it",
                        field="dataset",
                        value=self.reference,
                    )
                image = value if isinstance(value, Image.Image) else np.asarray(value)
                yield item, to_rgb_uint8(image, item=item)
                position += 1

    def _image_column(self, features: Any, datasets: ModuleType) -> str:
        if self.image_column is not None:
            return self._check_column(features, self.image_column, "image_column")
        typed = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        named = [name for name in _IMAGE_NAMES if name in features]
        if typed or named:
            return (typed + named)[0]
        raise DatasetError(
            f"dataset {self.reference!r} has no column of Image type and none named "
            f"{' or '.join(_IMAGE_NAMES)} (columns: {list(features)}); pass image_column",
            field="image_column",
            value=None,
        )

    def _label_column(self, features: Any, datasets: ModuleType) -> str:
        if self.label_column is not None:
            return self._check_column(features, self.label_column, "label_column")
        typed = [n for n, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        named = [name for name in _LABEL_NAMES if name in features]
        if typed or named:
            return (typed + named)[0]
        raise DatasetError(
            f"dataset {self.reference!r} has no labels: no ClassLabel column and none named "
            f"{', '.join(_LABEL_NAMES)} (columns: {list(features)}); pass label_column",
            field="label_column",
            value=None,
        )

    def _check_column(self, features: Any, column: str, field: str) -> str:
        if column not in features:
            raise DatasetError(
                f"{field} {column!r} is not a column of {self.reference!r}; its columns are "
                f"{list(features)}",
                field=field,
                value=column,
            )
        return column


def _import_datasets(reference: str) -> ModuleType:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError(
            f"dataset {reference!r} needs the Hugging Face 'datasets' package, which is not "
            "installed here; pip install datasets, or export the data to .npz or an image folder",
            field="dataset",
            value=reference,
        ) from exc
    return datasets
